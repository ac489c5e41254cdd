#!/usr/bin/env bash
# Run tests on an emulated AVX2-only CPU: QEMU's user mode with a Haswell CPU model (AVX2 and FMA; no AVX-512, no
# native bf16), so that torch and oneDNN choose their AVX2 kernels from CPUID themselves, as on a real laptop or an
# AMD before Zen 4, not because ONEDNN_MAX_CPU_ISA/ATEN_CPU_CAPABILITY cap them (what tests/test_cpu_paths.py does).
# It proves correctness only: emulated code runs tens of times slower, so nothing here is timed.
#
# Usage: scripts/avx2_cpu_test.sh [--fetch] [PYTEST_ARGS...]
#   PYTEST_ARGS  what pytest runs, from the repository root (default: the precision tests of issue 11, below)
#   --fetch      when no usable QEMU is found, download Debian 13's static qemu-user (about 70 MB, checked against
#                the SHA-256 in Debian's package index) into $CACHE_DIR and use it
#   QEMU         the qemu-x86_64 binary (default: qemu-x86_64 on PATH, else the one --fetch stored)
#   VENV         the virtualenv (default: .venv in the repository root)
#   CPU_MODEL    QEMU's CPU model (default: Haswell-v4)
# Processes that a test starts (tools run as commands, torchrun's workers) run emulated too: QEMU's user mode does not
# follow exec, so the tests see as sys.executable a wrapper that starts the virtualenv's python under the same QEMU.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/mvit_det/qemu"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CPU_MODEL="${CPU_MODEL:-Haswell-v4}"
# The tests that crashed on the issue's AVX2-only Zen 3, and the fast-path numerics of every precision.
DEFAULT_TESTS=(
  tests/test_cls_eval.py::test_bf16_agrees_with_fp32
  tests/test_model.py::test_bf16_inference_follows_weight_updates
  tests/test_robustness_tensors.py::test_inference_model_casts_the_image_to_the_model_dtype
  tests/test_robustness_tensors.py::test_bfloat16_autocast_is_the_supported_fast_path
  tests/test_robustness_tensors.py::test_detection_predictor_precision
  tests/test_cpu_paths.py
)

say() { echo "[avx2-cpu] $*"; }
die() { echo "[avx2-cpu] ERROR: $*" >&2; exit 2; }

FETCH=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --fetch) FETCH=1 ;;
    -h | --help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) ARGS+=("$arg") ;;
  esac
done
[ ${#ARGS[@]} -gt 0 ] || ARGS=("${DEFAULT_TESTS[@]}")
VENV="${VENV:-$ROOT/.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac  # relative to where it was called, as the caller meant
PY="$VENV/bin/python"
[ -x "$PY" ] || die "no virtualenv at $VENV: run 'make setup-test' first (or set VENV=/path/to/venv)."

# QEMU 7.2 (Debian 12's) segfaults in ATen's AVX2 grid_sample kernel, which runs natively when capped to AVX2, and
# under QEMU 10.0.
qemu_major() { "$1" --version 2>/dev/null | sed -n 's/.*version \([0-9][0-9]*\)\..*/\1/p' | head -n 1; }
usable() { local m; m="$(qemu_major "$1")"; [ -n "$m" ] && [ "$m" -ge 8 ]; }

fetch_qemu() {
  command -v curl >/dev/null || die "--fetch needs curl."
  command -v xz >/dev/null || die "--fetch needs xz (apt-get install xz-utils)."
  mkdir -p "$CACHE_DIR"
  local tmp entry file sum deb
  tmp="$(mktemp -d "$CACHE_DIR/.fetch.XXXXXX")"
  FETCH_TMP="$tmp"
  trap 'rm -rf "$FETCH_TMP"' EXIT  # also when die() stops the script half-way
  say "reading Debian 13's package index from $DEBIAN_MIRROR"
  curl -fsS -o "$tmp/Packages.xz" "$DEBIAN_MIRROR/dists/trixie/main/binary-amd64/Packages.xz" ||
    die "cannot download $DEBIAN_MIRROR/dists/trixie/main/binary-amd64/Packages.xz; install QEMU 8 or later (Debian 13 or Ubuntu 24.04: apt-get install qemu-user) and set QEMU=/path/to/qemu-x86_64."
  entry="$(xz -dc "$tmp/Packages.xz" | awk '/^Package: qemu-user$/{p=1} p&&/^(Filename|SHA256):/{print $2} /^$/{p=0}')"
  file="$(echo "$entry" | sed -n 1p)"
  sum="$(echo "$entry" | sed -n 2p)"
  [ -n "$file" ] && [ -n "$sum" ] || die "Debian's package index names no qemu-user package; set QEMU=/path/to/qemu-x86_64."
  deb="$tmp/$(basename "$file")"
  say "downloading $file"
  curl -fsS -o "$deb" "$DEBIAN_MIRROR/$file" || die "cannot download $DEBIAN_MIRROR/$file."
  echo "$sum  $deb" | sha256sum -c --quiet - >/dev/null 2>&1 ||
    die "$file does not match the SHA-256 in Debian's index (a broken download or a wrong mirror); run again."
  mkdir -p "$tmp/x"
  if command -v dpkg-deb >/dev/null; then
    dpkg-deb -x "$deb" "$tmp/x"
  else
    (cd "$tmp" && ar x "$deb" && tar -xf data.tar.* -C x)
  fi
  [ -x "$tmp/x/usr/bin/qemu-x86_64" ] || die "$file holds no usr/bin/qemu-x86_64."
  mv -f "$tmp/x/usr/bin/qemu-x86_64" "$CACHE_DIR/qemu-x86_64"
  say "stored $CACHE_DIR/qemu-x86_64"
  rm -rf "$tmp"
}

if [ -z "${QEMU:-}" ]; then
  for candidate in "$(command -v qemu-x86_64 || true)" "$CACHE_DIR/qemu-x86_64"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && usable "$candidate"; then QEMU="$candidate"; break; fi
  done
  if [ -z "${QEMU:-}" ] && [ "$FETCH" = 1 ]; then fetch_qemu; QEMU="$CACHE_DIR/qemu-x86_64"; fi
  [ -n "${QEMU:-}" ] || die "no QEMU 8 or later found (qemu-x86_64 on PATH or in $CACHE_DIR). Run again with --fetch to download Debian 13's, or install it (Debian 13 or Ubuntu 24.04: apt-get install qemu-user) and set QEMU=/path/to/qemu-x86_64."
fi
[ -x "$QEMU" ] || die "QEMU=$QEMU is not an executable file."
usable "$QEMU" || die "$QEMU is QEMU $(qemu_major "$QEMU" || true) ('$QEMU --version'); it needs 8 or later (7.2 crashes in ATen's AVX2 grid_sample). Run again with --fetch, or set QEMU to a newer one."

# QEMU warns, once per process, of each feature of the model that its translator cannot give; none is a vector ISA.
RUN=("$QEMU" -cpu "$CPU_MODEL,-pcid,-x2apic,-tsc-deadline,-invpcid,-spec-ctrl")
unset ONEDNN_MAX_CPU_ISA ATEN_CPU_CAPABILITY MKL_ENABLE_INSTRUCTIONS  # the CPU model alone decides the kernels

# A virtualenv whose python is the real one under QEMU: Python takes sys.executable from argv[0] (QEMU's -0) and
# finds pyvenv.cfg and site-packages beside it, so every process started with sys.executable, or as python from
# PATH, runs on the emulated CPU as well.
EMU="$(mktemp -d "${TMPDIR:-/tmp}/avx2-cpu.XXXXXX")"
trap 'rm -rf "$EMU"' EXIT
mkdir "$EMU/bin"
cp "$VENV/pyvenv.cfg" "$EMU/pyvenv.cfg" 2>/dev/null || die "$VENV has no pyvenv.cfg: VENV must be a virtualenv (python -m venv)."
ln -s "$VENV/lib" "$EMU/lib"
{
  echo '#!/bin/sh'
  printf 'exec'; printf ' %q' "${RUN[@]}"; printf ' -0 "$0" %q "$@"\n' "$PY"
} > "$EMU/bin/python"
chmod +x "$EMU/bin/python"
ln -s python "$EMU/bin/python3"
export PATH="$EMU/bin:$PATH"
export MVIT_DET_EMULATED_CPU=qemu-user  # tests read it: hang guards stretch (conftest.py), page-fault counts skip

seen="$("$EMU/bin/python" -c '
import subprocess, sys, torch
from mvit_det.models.fastpath import native_bf16
child = [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"]
print(torch.backends.cpu.get_cpu_capability(), native_bf16(), subprocess.check_output(child, text=True).strip())')" ||
  die "$PY did not start under ${RUN[*]}."
read -r level bf16 child_level <<<"$seen"
say "the emulated $CPU_MODEL as torch sees it: kernel level $level, native bf16 $bf16; in a process it starts: kernel level $child_level"
[ "$seen" = "AVX2 False AVX2" ] ||
  die "torch sees '$seen' under QEMU, not 'AVX2 False AVX2' (kernel level, native bf16, a child's kernel level): this is no AVX2-only CPU. Set CPU_MODEL to a CPU without AVX-512 (Haswell-v4, Skylake-Client-v4)."
cd "$ROOT"
"$EMU/bin/python" -m pytest -q -p no:cacheprovider -rs "${ARGS[@]}"  # not exec: the EXIT trap removes $EMU
