"""scripts/avx2_cpu_test.sh: pytest on an emulated AVX2-only CPU (QEMU's user mode, a Haswell CPU model).

QEMU itself is replaced by shims on PATH, so that what the script decides (which QEMU, which CPU model, whether torch
really sees an AVX2-only CPU) is tested on any host without QEMU: a shim that stands for an AVX2-only CPU runs its
command with torch's and oneDNN's ISA caps, one that does not runs it with ATen's plain kernels. ``--fetch`` is
tested against a local HTTP server that serves a Debian package index and a package holding such a shim.
"""
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from test_cpu_paths import CAPPED
from test_download import LocalServer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "avx2_cpu_test.sh"
VENV = Path(sys.prefix)


def _shim(version: str, env: str, log: Path) -> str:
    """A qemu-x86_64 that reports ``version``, logs its arguments and runs the command with ``env`` set, handing it
    the argv[0] that QEMU's ``-0`` names, as QEMU does."""
    return (f'#!/bin/bash\nif [ "$1" = "--version" ]; then echo "qemu-x86_64 version {version}"; exit 0; fi\n'
            f'echo "$@" >> "{log}"\nargv0=\n'
            'while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do [ "$1" = -0 ] && argv0="$2"; shift 2; done\n'
            f'export {env}\nexec -a "${{argv0:-$1}}" "$@"\n')


AVX2_ONLY = " ".join(f"{k}={v}" for k, v in CAPPED.items())
# The commands the script uses, and no others: a QEMU installed on the host stays out of sight.
TOOLS = ("bash", "sh", "env", "sed", "head", "awk", "cat", "dirname", "basename", "mktemp", "mkdir", "mv", "rm",
         "cp", "ln", "chmod", "curl", "xz", "sha256sum", "dpkg-deb", "ar", "tar")


def _run(tmp_path, *args, qemu=None, extra_env=None):
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        for tool in TOOLS:
            if shutil.which(tool):
                (bin_dir / tool).symlink_to(shutil.which(tool))
    if qemu is not None:
        (bin_dir / "qemu-x86_64").write_text(qemu)
        (bin_dir / "qemu-x86_64").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("QEMU", "CPU_MODEL", "DEBIAN_MIRROR")}
    env.update(PATH=str(bin_dir), VENV=str(VENV), XDG_CACHE_HOME=str(tmp_path / "cache"), **(extra_env or {}))
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)


def _calls(log: Path) -> list[str]:
    """The shim's invocations (a ``-c`` program of several lines spans several lines of its log)."""
    return [line for line in log.read_text().splitlines() if line.startswith("-cpu ")]


def _a_test_file(tmp_path) -> Path:
    test = tmp_path / "test_sees_avx2.py"
    test.write_text("import torch\n\ndef test_kernel_level():\n"
                    "    assert torch.backends.cpu.get_cpu_capability() == 'AVX2'\n")
    return test


def test_no_qemu_is_refused_with_the_fix(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no QEMU 8 or later found" in proc.stderr and "--fetch" in proc.stderr and "QEMU=" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_qemu_7_is_refused(tmp_path):
    proc = _run(tmp_path, qemu=_shim("7.2.0", AVX2_ONLY, tmp_path / "qemu.log"))
    assert proc.returncode == 2 and "no QEMU 8 or later found" in proc.stderr, proc.stdout + proc.stderr
    proc = _run(tmp_path, extra_env={"QEMU": str(tmp_path / "bin" / "qemu-x86_64")})
    assert proc.returncode == 2 and "needs 8 or later" in proc.stderr, proc.stdout + proc.stderr
    assert not (tmp_path / "qemu.log").exists()  # nothing ran


def test_a_cpu_that_torch_does_not_see_as_avx2_only_is_refused(tmp_path):
    proc = _run(tmp_path, str(_a_test_file(tmp_path)),
                qemu=_shim("10.0.13", "ATEN_CPU_CAPABILITY=default", tmp_path / "qemu.log"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "not 'AVX2 False AVX2'" in proc.stderr and "CPU_MODEL" in proc.stderr
    assert len(_calls(tmp_path / "qemu.log")) == 2  # the check and its child ran, the tests did not


def test_runs_pytest_under_the_haswell_model(tmp_path):
    log = tmp_path / "qemu.log"
    proc = _run(tmp_path, str(_a_test_file(tmp_path)), qemu=_shim("10.0.13", AVX2_ONLY, log))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kernel level AVX2, native bf16 False" in proc.stdout and "1 passed" in proc.stdout
    calls = _calls(log)
    # The check, the process it starts, the tests.
    assert len(calls) == 3 and all(c.startswith("-cpu Haswell-v4,") and " -0 " in c for c in calls)
    assert f"-m pytest -q -p no:cacheprovider -rs {tmp_path / 'test_sees_avx2.py'}" in calls[2]
    assert "in a process it starts: kernel level AVX2" in proc.stdout


def test_processes_the_tests_start_run_under_qemu_too(tmp_path):
    """QEMU's user mode does not follow exec: the script's wrapper python must, for sys.executable and PATH."""
    test = tmp_path / "test_starts_tools.py"
    test.write_text(
        "import os, subprocess, sys\n\n"
        "def test_children():\n"
        "    assert os.environ['MVIT_DET_EMULATED_CPU'] == 'qemu-user'\n"
        "    for cmd in ([sys.executable, '-c', 'print(1)'], ['python', '-c', 'print(2)'],\n"
        "                ['python3', '-c', 'print(3)']):\n"
        "        assert subprocess.check_output(cmd, text=True).strip() == cmd[-1][-2]\n"
        f"    assert sys.executable != {str(VENV / 'bin' / 'python')!r}\n")
    log = tmp_path / "qemu.log"
    proc = _run(tmp_path, str(test), qemu=_shim("10.0.13", AVX2_ONLY, log))
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr
    calls = _calls(log)
    assert len(calls) == 6, calls  # the check and its child, the tests, the three processes they start
    assert [c.split()[-1] for c in calls[3:]] == ["print(1)", "print(2)", "print(3)"]
    assert all(f"{VENV / 'bin' / 'python'} -c" in c for c in calls[3:])
    # The wrapper lived in a temporary virtualenv that is gone.
    wrapper = calls[3].split(" -0 ")[1].split()[0]
    assert wrapper.endswith("/bin/python") and not Path(wrapper).exists()


def test_subprocess_hang_guards_stretch_only_on_the_emulated_cpu(tmp_path):
    """tests/conftest.py multiplies subprocess timeouts when the script's MVIT_DET_EMULATED_CPU is set, else not."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_guard.py").write_text(
        "import subprocess, sys\nimport pytest\n\n"
        "def test_slow_child_outlives_its_guard():\n"
        "    subprocess.run([sys.executable, '-c', 'import time; time.sleep(2)'], capture_output=True, timeout=1)\n\n"
        "def test_hung_child_is_still_stopped():\n"
        "    with pytest.raises(subprocess.TimeoutExpired):\n"
        "        subprocess.check_output([sys.executable, '-c', 'import time; time.sleep(60)'], timeout=0.1)\n")

    def outcome(**env) -> str:
        base = {k: v for k, v in os.environ.items() if k != "MVIT_DET_EMULATED_CPU"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                              cwd=tmp_path, env={**base, **env}, capture_output=True, text=True, timeout=300)
        return proc.stdout.strip().splitlines()[-1]

    assert outcome().startswith("1 failed, 1 passed")  # a real CPU: the guard fires on the slow child
    assert outcome(MVIT_DET_EMULATED_CPU="qemu-user").startswith("2 passed")


def _deb(payload: bytes) -> bytes:
    """A Debian package (an ar archive of debian-binary, control.tar.xz, data.tar.xz) with usr/bin/qemu-x86_64."""

    def tar_xz(files: dict[str, tuple[bytes, int]]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for name, (data, mode) in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), mode
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    control = b"Package: qemu-user\nVersion: 1:10.0.13\nArchitecture: amd64\nMaintainer: t <t@t>\nDescription: t\n"
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"./control": (control, 0o644)})),
               ("data.tar.xz", tar_xz({"./usr/bin/qemu-x86_64": (payload, 0o755)}))]
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    return out


def test_fetch_downloads_checks_and_stores_qemu(tmp_path):
    mirror = tmp_path / "mirror"
    pool = mirror / "pool" / "main" / "q" / "qemu"
    index = mirror / "dists" / "trixie" / "main" / "binary-amd64"
    pool.mkdir(parents=True)
    index.mkdir(parents=True)
    deb = _deb(_shim("10.0.13", AVX2_ONLY, tmp_path / "qemu.log").encode())
    (pool / "qemu-user_10.0.13_amd64.deb").write_bytes(deb)

    def publish(sha256: str) -> None:
        entry = ("Package: qemu-user-static\nFilename: pool/main/q/qemu/other.deb\nSHA256: 00\n\n"
                 f"Package: qemu-user\nVersion: 1:10.0.13\nFilename: pool/main/q/qemu/qemu-user_10.0.13_amd64.deb\n"
                 f"SHA256: {sha256}\n\n")
        (index / "Packages.xz").write_bytes(lzma.compress(entry.encode()))

    server = LocalServer(mirror)
    try:
        url = {"DEBIAN_MIRROR": server.url}
        stored = tmp_path / "cache" / "mvit_det" / "qemu" / "qemu-x86_64"
        publish("0" * 64)  # the index does not match the package: nothing is stored
        proc = _run(tmp_path, "--fetch", str(_a_test_file(tmp_path)), extra_env=url)
        assert proc.returncode == 2 and "does not match the SHA-256" in proc.stderr, proc.stdout + proc.stderr
        assert not stored.exists() and not list(stored.parent.glob(".fetch.*"))

        publish(hashlib.sha256(deb).hexdigest())
        proc = _run(tmp_path, "--fetch", str(_a_test_file(tmp_path)), extra_env=url)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"stored {stored}" in proc.stdout and "1 passed" in proc.stdout and os.access(stored, os.X_OK)
        assert not list(stored.parent.glob(".fetch.*"))  # the download's temporary folder is gone
    finally:
        server.stop()
    # The stored one is found again without --fetch (the mirror is gone).
    proc = _run(tmp_path, str(_a_test_file(tmp_path)))
    assert proc.returncode == 0 and "downloading" not in proc.stdout, proc.stdout + proc.stderr
