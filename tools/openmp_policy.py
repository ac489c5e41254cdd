"""OpenMP's wait policy for a tool, chosen from the load at its start, before torch loads OpenMP (which reads
``OMP_WAIT_POLICY`` once). Torch-free on purpose: every ``mvit_det`` module imports torch through the package.

OpenMP's default lets a thread that waits between two parallel regions spin briefly before it sleeps. Measured on an
idle 2-vCPU AVX-512 machine: one toy-detector iteration 0.40 s with the default against 0.50 s with PASSIVE (threads
sleep at once), the digits pre-training 143 images/s against 110. On a CPU busy with other work, or shared by several
training processes, the spinning steals time from the threads doing the work: one pre-training step took 1.44 s
against 0.33 s with PASSIVE beside two other jobs, and MViTv2-T forward+backward (batch 32 at 32x32) 60 s against
0.8-1.8 s on a loaded machine. So: the default where the CPU is idle at the start and one process trains, else
PASSIVE; an ``OMP_WAIT_POLICY`` already set wins.
"""
from __future__ import annotations

import os
import sys
import time

__all__ = ["busy_cpus", "choose_before_torch", "choose_omp_wait_policy", "processes_from_argv"]


def busy_cpus(samples: int = 5, interval: float = 0.05) -> int | None:
    """Tasks runnable now besides this one (the median of ``samples`` reads of /proc/loadavg's running count, which
    counts the reader); None where there is no /proc/loadavg."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, IndexError, ValueError):
            return None
        if i + 1 < samples:
            time.sleep(interval)
    return sorted(counts)[len(counts) // 2]


def processes_from_argv(argv: list[str], flag: str = "--num-procs") -> int:
    """The value of ``flag`` in ``argv`` (``--num-procs 2`` or ``--num-procs=2``), 1 if absent or not a number: read
    before argparse runs, which is after torch is imported."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
        else:
            continue
        return int(value) if value.isdigit() and int(value) > 0 else 1
    return 1


def choose_omp_wait_policy(environ=os.environ, processes: int = 1) -> str:
    """Set ``OMP_WAIT_POLICY`` in ``environ`` unless the default suits (idle CPU, one process); return why.

    ``processes``: training processes this run starts on this machine (``--num-procs``, torchrun's
    ``LOCAL_WORLD_SIZE``); with more than one they share the CPUs, so PASSIVE.
    """
    if environ.get("OMP_WAIT_POLICY"):
        return f"OMP_WAIT_POLICY={environ['OMP_WAIT_POLICY']} (set by the caller)"
    processes = max(processes, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if processes > 1:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return f"OMP_WAIT_POLICY=PASSIVE ({processes} training processes share the CPUs)"
    busy, cpus = busy_cpus(), os.cpu_count() or 1
    if busy is None or busy >= max(1, cpus // 2):
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        found = "no /proc/loadavg" if busy is None else f"{busy} other runnable task(s) on {cpus} CPUs"
        return f"OMP_WAIT_POLICY=PASSIVE ({found})"
    return f"OpenMP's default wait policy (the CPU is idle: {busy} other runnable task(s) on {cpus} CPUs)"


def choose_before_torch(processes: int = 1) -> str:
    """``choose_omp_wait_policy`` for this process, if torch (and with it OpenMP) is not loaded yet; return why.

    Once torch is loaded (a tool imported by the tests) the environment no longer matters and is left alone."""
    if "torch" in sys.modules:
        return "the policy torch was loaded with"
    return choose_omp_wait_policy(processes=processes)
