#!/usr/bin/env bash
# Download into .whl/ the wheels that a bare GPU machine (python 3.12, torch and timm installed, no network)
# needs for scripts/gpu_bench.sh: detectron2 as pure Python and what it imports. Run where PyPI is reachable.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYV="${GPU_PYTHON_VERSION:-3.12}"
mkdir -p "$ROOT/.whl"
grep -qx '/.whl/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.whl/' >>"$ROOT/.git/info/exclude"
dl() { python3 -m pip download -q --no-deps --only-binary=:all: -d "$ROOT/.whl" "$@"; }
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# sal-detectron2 ships a _C only for CPython 3.10; its Python sources run anywhere.
dl --python-version 3.10 --implementation cp "${PLAT[@]}" sal-detectron2==0.7.2
dl --python-version "$PYV" --implementation cp "${PLAT[@]}" pycocotools==2.0.11
for pkg in fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 omegaconf==2.3.1 hydra-core==1.3.8 \
  antlr4-python3-runtime==4.9.3 termcolor==3.3.0; do
  dl --python-version "$PYV" "$pkg" 2>/dev/null || python3 -m pip wheel -q --no-deps -w "$ROOT/.whl" "$pkg"  # sdist only: build it
done
du -sh "$ROOT/.whl"; ls "$ROOT/.whl"
