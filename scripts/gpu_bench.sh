#!/usr/bin/env bash
# The GPU benchmark (issue 16) in one command, on a bare GPU machine that has python3 with torch and timm but
# neither detectron2 nor the other pure-Python pieces: they travel as wheels in .whl/ (scripts/gpu_wheels.sh
# downloads them on a machine with PyPI). Writes gpu.json and gpu.md into OUT_DIR after every row.
#
# Usage: scripts/gpu_bench.sh OUT_DIR [--dry-run] [extra args of python -m benchmarks.gpu]
#   --dry-run   every row on the CPU at toy sizes (run it here before spending GPU minutes)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: scripts/gpu_bench.sh OUT_DIR [--dry-run]}"
shift
PY="${PYTHON:-python3}"
if ! "$PY" -c "import detectron2, fvcore, pycocotools, omegaconf" 2>/dev/null &&
  [ -d "$ROOT/.whl" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  SITE=/tmp/mvit-site
  echo "[gpu-bench] installing $(ls "$ROOT"/.whl/*.whl | wc -l) carried wheels into $SITE"
  mkdir -p "$SITE"
  # sal-detectron2's wheel is tagged cp310 (for its unused _C); its sources are unpacked as they are.
  for w in "$ROOT"/.whl/sal_detectron2-*.whl; do [ -e "$w" ] && "$PY" -m zipfile -e "$w" "$SITE"; done
  others=$(ls "$ROOT"/.whl/*.whl | grep -v /sal_detectron2- || true)
  [ -n "$others" ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" $others
  rm -rf "$SITE/tools"  # sal-detectron2 drops a top-level `tools` package that would shadow nothing we use
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import torch, timm, detectron2, mvit_det.detection" ||
  { echo "[gpu-bench] ERROR: a dependency is missing (above); run scripts/gpu_wheels.sh where PyPI is reachable" >&2; exit 1; }
"$PY" -c "import torch; print('[gpu-bench] torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
exec "$PY" -m benchmarks.gpu "$OUT" "$@"
