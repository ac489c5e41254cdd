#!/usr/bin/env bash
# Create or update the project's virtualenv: torch, the pinned requirements, detectron2 (only when it is
# missing) and mvit-det itself in editable mode. Safe to re-run: when nothing changed it returns at once.
#
# Usage: scripts/setup_env.sh [--test] [VENV_DIR]
#   --test     also install what the tests need: requirements-test.txt and mmpretrain (reference code)
#   VENV_DIR   the virtualenv (default: $VENV, else .venv in the repository root)
#   PYTHON     interpreter for a new virtualenv (default: python3.11, else python3)
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_PIN="2.14.1"
TORCHVISION_PIN="0.29.1"
DETECTRON2_SPEC="sal-detectron2==0.7.2"
MM_PACKAGES=(mmpretrain==1.2.0 mmengine==0.10.7 mmcv-lite==2.2.0)
# What mmpretrain/mmengine/mmcv-lite import, minus opencv-python (opencv-python-headless provides cv2).
MM_PURE_DEPS=(addict==2.4.0 rich==15.0.0 mat4py==0.6.0 modelindex==0.0.2 einops==0.8.2 yapf==0.43.0
  importlib_metadata==10.2.0)

say() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }
trap 'echo "[setup] FAILED at line $LINENO: $BASH_COMMAND" >&2
      echo "[setup] Fix the error above and run this script again (to start over: rm -rf $VENV)." >&2' ERR

TEST=0
VENV_ARG=""
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    -h | --help) sed -n '2,8p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) die "unknown option '$arg' (expected --test and/or a virtualenv directory)" ;;
    *) VENV_ARG="$arg" ;;
  esac
done
VENV="${VENV_ARG:-${VENV:-$ROOT/.venv}}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
PY="$VENV/bin/python"
STAMP="$VENV/.mvit-det-setup"
MODE=$([ "$TEST" = 1 ] && echo test || echo base)

# The stamp records what was installed from which inputs; the repository path is part of it because the
# editable install points there.
inputs_hash() {
  (
    cd "$ROOT"
    cat setup.py requirements.txt requirements-test.txt scripts/setup_env.sh mvit_det/__init__.py
    echo "$ROOT"
  ) | sha256sum | cut -c1-16
}
HASH="$(inputs_hash)"
if [ -x "$PY" ] && [ -f "$STAMP" ]; then
  read -r old_hash old_mode <"$STAMP" || true
  if [ "${old_hash:-}" = "$HASH" ] && { [ "${old_mode:-}" = test ] || [ "$MODE" = base ]; }; then
    say "$VENV is up to date ($old_mode)"
    exit 0
  fi
fi
rm -f "$STAMP"

# This machine's pip config names local index folders that do not exist for most packages; pip warns
# once per package. Those lines are dropped; every other warning and error is shown.
pip_install() {
  "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
}

# pip fails half-way with "[Errno 28] No space left on device" and leaves a broken virtualenv; say it first.
# torch's x86_64 wheel is a CUDA build: torch, triton and the nvidia-* libraries take about 5.4 GB of the 6.3 GB a
# whole virtualenv took here (the check asks for 5.6 and 6.3).
need_free_mb() {
  local need="$1" what="$2" dir="$VENV" free
  while [ ! -d "$dir" ]; do dir="$(dirname "$dir")"; done
  free="$(df -Pk "$dir" 2>/dev/null | awk 'NR == 2 { print int($4 / 1024) }')"
  if [ -n "$free" ] && [ "$free" -lt "$need" ]; then
    die "$what needs about $need MB free on the disk of $dir, which has $free MB. Free some space" \
        "(old virtualenvs; pip's cache: 'pip cache purge') or put the virtualenv elsewhere: VENV=/bigger/disk/venv"
  fi
}
TORCH_MB=5600
VENV_MB=6300
# torch and torchvision at the pins, after checking for room; $1 says why.
install_torch() {
  need_free_mb "$TORCH_MB" "torch $TORCH_PIN"
  say "$1"
  pip_install "torch==$TORCH_PIN" "torchvision==$TORCHVISION_PIN"
}

# 1. The virtualenv.
if [ ! -x "$PY" ]; then
  need_free_mb "$VENV_MB" "a new virtualenv with torch $TORCH_PIN"
  if [ -n "${PYTHON:-}" ]; then
    BASE_PY="$PYTHON"
  elif command -v python3.11 >/dev/null 2>&1 && python3.11 -c "" 2>/dev/null; then
    BASE_PY=python3.11
  elif command -v python3 >/dev/null 2>&1; then
    BASE_PY=python3
  else
    die "no python3.11 or python3 on PATH; install Python >= 3.9 or set PYTHON=/path/to/python"
  fi
  "$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
    die "$BASE_PY is $("$BASE_PY" --version 2>&1); mvit-det needs Python >= 3.9 (set PYTHON=...)"
  say "creating $VENV with $("$BASE_PY" --version 2>&1)"
  "$BASE_PY" -m venv "$VENV" || die "'$BASE_PY -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
  pip_install --upgrade pip
fi

# 2. torch + torchvision.
torch_state="$("$PY" - "$TORCH_PIN" "$TORCHVISION_PIN" 2>/dev/null <<'EOF' || echo missing
import sys
import torch, torchvision

def release(v):
    return tuple(int(x) for x in v.split("+")[0].split(".")[:2])

if (torch.__version__.split("+")[0], torchvision.__version__.split("+")[0]) == tuple(sys.argv[1:3]):
    print("pinned")
elif release(torch.__version__) >= (2, 1) and release(torchvision.__version__) >= (0, 16):
    print("other " + torch.__version__)
else:
    print("old " + torch.__version__)
EOF
)"
has_detectron2() { "$PY" -W ignore -c "import detectron2" >/dev/null 2>&1; }
case "$torch_state" in
  pinned) say "torch $TORCH_PIN / torchvision $TORCHVISION_PIN already installed" ;;
  other*)
    if has_detectron2; then
      # A detectron2 built from source is compiled against this torch: replacing torch would break it.
      say "keeping torch ${torch_state#other } (the installed detectron2 was built against it)"
    else
      install_torch "replacing torch ${torch_state#other } with torch $TORCH_PIN / torchvision $TORCHVISION_PIN"
    fi
    ;;
  *)
    install_torch "installing torch $TORCH_PIN / torchvision $TORCHVISION_PIN (large; about a minute from a local mirror)"
    ;;
esac

# 3. Pinned requirements.
say "installing requirements.txt$([ "$TEST" = 1 ] && echo ' + requirements-test.txt')"
REQS=(-r "$ROOT/requirements.txt")
[ "$TEST" = 1 ] && REQS+=(-r "$ROOT/requirements-test.txt")
pip_install "${REQS[@]}"

# 4. detectron2: keep any existing one (it may be a source build with CUDA ops); otherwise install the
#    pure-Python copy from PyPI (sal-detectron2 ships a _C only for CPython 3.10, so it is not used).
if has_detectron2; then
  say "keeping detectron2 $("$PY" -W ignore -c 'import detectron2, os; print(detectron2.__version__, "at", os.path.dirname(detectron2.__file__))')"
elif "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('detectron2') is None)"; then
  "$PY" -W ignore -c "import detectron2" || true
  die "detectron2 is installed in $VENV but fails to import (error above). Repair or uninstall it, then re-run."
else
  SITE="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
  had_tools=0
  [ -e "$SITE/tools" ] && had_tools=1
  say "installing detectron2 from $DETECTRON2_SPEC (pure Python, no compiled ops)"
  pip_install --no-deps --only-binary=:all: --python-version 3.10 --target "$SITE" "$DETECTRON2_SPEC"
  # The wheel also drops a top-level `tools` package into site-packages, which would shadow ours.
  if [ "$had_tools" = 0 ]; then
    rm -rf "$SITE/tools"
  else
    say "warning: $SITE/tools existed before and was left in place"
  fi
  has_detectron2 || die "detectron2 was installed into $SITE but does not import: run '$PY -c \"import detectron2\"' to see why"
fi

# 5. Reference implementations for the tests that pip cannot install plainly (see requirements-test.txt).
if [ "$TEST" = 1 ]; then
  mm_ok() { "$PY" -W ignore -c "from mmpretrain.models.backbones import MViT" >/dev/null 2>&1; }
  if mm_ok; then
    say "mmpretrain already importable"
  else
    say "installing ${MM_PACKAGES[*]} (--no-deps) and their pure-Python dependencies"
    # Dependencies first: pip's resolver would otherwise complain that mmengine wants opencv-python.
    pip_install "${MM_PURE_DEPS[@]}"
    pip_install --no-deps "${MM_PACKAGES[@]}"
    mm_ok || {
      "$PY" -W ignore -c "from mmpretrain.models.backbones import MViT" || true
      die "mmpretrain was installed but 'from mmpretrain.models.backbones import MViT' fails (error above)"
    }
  fi
fi

# 6. The project itself, editable. Its dependencies are all installed above (detectron2 deliberately outside
#    pip's resolver), hence --no-deps; the venv's setuptools<81 builds it, hence --no-build-isolation.
say "installing mvit-det (editable) from $ROOT"
# (setuptools warns that a folder named like the package may shadow it: that folder is the package.)
PYTHONWARNINGS="ignore:Editable installation" pip_install --no-deps --no-build-isolation -e "$ROOT"
(cd /tmp && "$PY" -W ignore -c "import mvit_det, detectron2") ||
  die "'import mvit_det, detectron2' fails in $VENV (error above)"

echo "$HASH $MODE" >"$STAMP"
say "done in ${SECONDS}s: $VENV ($MODE)"
