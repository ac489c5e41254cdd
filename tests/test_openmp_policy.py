"""The tools choose OpenMP's wait policy from the load at their start, before torch loads OpenMP."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tools import openmp_policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wait_policy_follows_the_load_and_the_process_count(monkeypatch):
    """Spinning OpenMP threads are faster on an idle CPU and collapse on a busy or shared one."""
    env: dict[str, str] = {}
    monkeypatch.setattr(openmp_policy, "busy_cpus", lambda: 0)
    assert "idle" in openmp_policy.choose_omp_wait_policy(env) and "OMP_WAIT_POLICY" not in env
    assert openmp_policy.choose_omp_wait_policy(env, processes=2).startswith("OMP_WAIT_POLICY=PASSIVE (2 training")
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"LOCAL_WORLD_SIZE": "3"}  # a torchrun worker
    assert "3 training processes" in openmp_policy.choose_omp_wait_policy(env) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setattr(openmp_policy, "busy_cpus", lambda: os.cpu_count() or 1)
    env = {}
    assert openmp_policy.choose_omp_wait_policy(env).startswith("OMP_WAIT_POLICY=PASSIVE (")
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setattr(openmp_policy, "busy_cpus", lambda: None)  # no /proc/loadavg: the safe choice
    env = {}
    assert "no /proc/loadavg" in openmp_policy.choose_omp_wait_policy(env) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}  # the caller's setting wins
    assert openmp_policy.choose_omp_wait_policy(env, processes=4) == "OMP_WAIT_POLICY=ACTIVE (set by the caller)"
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
    monkeypatch.undo()
    if os.path.exists("/proc/loadavg"):
        assert openmp_policy.busy_cpus(samples=3, interval=0.0) >= 0


def test_choice_is_left_alone_once_torch_is_loaded(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch", object()))  # loaded, as by the tests
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(openmp_policy, "busy_cpus", lambda: os.cpu_count() or 1)  # would choose PASSIVE
    assert openmp_policy.choose_before_torch(processes=2) == "the policy torch was loaded with"
    assert "OMP_WAIT_POLICY" not in os.environ


def test_process_count_is_read_before_argparse():
    read = openmp_policy.processes_from_argv
    assert read(["--data", "d", "--num-procs", "2"]) == 2 and read(["--num-procs=3"]) == 3
    assert read(["--data", "d"]) == 1 and read(["--num-procs"]) == 1 and read(["--num-procs", "x"]) == 1


def test_module_is_torch_free():
    code = "import sys; import tools.openmp_policy; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.parametrize("tool", ["main_job", "cls_train"])
def test_wait_policy_is_chosen_before_torch_loads(tool):
    code = (
        f"import os, sys; import tools.{tool} as m; "
        "print(repr(os.environ.get('OMP_WAIT_POLICY')), 'torch' in sys.modules, m.OMP_CHOICE, sep='|')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "LOCAL_WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    policy, torch_loaded, choice = out.stdout.strip().splitlines()[-1].split("|")
    assert torch_loaded == "True"  # the tool loads torch, after the choice
    assert (policy, choice.startswith("OMP_WAIT_POLICY=PASSIVE")) in {("'PASSIVE'", True), ("None", False)}, choice


def test_tools_run_as_scripts_find_the_module():
    """``python tools/cls_train.py`` has tools/, not the repository, on sys.path: the import must work there too."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "cls_train.py"), "--help"], cwd="/",
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "--num-procs" in out.stdout, out.stderr[-2000:]
