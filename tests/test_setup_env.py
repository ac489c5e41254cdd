"""scripts/setup_env.sh refuses, before it creates anything, a disk without room for torch's CUDA build.

A CI run once failed half-way through pip with "[Errno 28] No space left on device"; the script now says so first,
with the fix. ``df`` is replaced by a shim on PATH that reports a nearly full disk, so the real check runs.
"""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_setup(tmp_path, available_kb):
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "df").write_text("#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
                             f"echo '/dev/x 100000000 1 {available_kb} 99% /'\n")
    (shim / "df").chmod(0o755)
    venv = tmp_path / "new" / "venv"
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")
    env.pop("VENV", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "setup_env.sh"), str(venv)], env=env,
                          capture_output=True, text=True, timeout=60)
    return proc, venv


def test_a_full_disk_is_refused_before_the_virtualenv_is_made(tmp_path):
    proc, venv = _run_setup(tmp_path, available_kb=287 * 1024)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    message = proc.stderr.strip()
    assert "has 287 MB" in message and "6300 MB" in message, message
    assert "VENV=" in message and "Traceback" not in message, message
    assert not venv.exists() and not venv.parent.exists()
