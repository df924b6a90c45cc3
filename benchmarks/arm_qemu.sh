#!/usr/bin/env bash
# Run the cxr-edge runtime on aarch64 under QEMU user-mode emulation and compare it with x86.
#
# What it shows: the runtime-only dependencies (onnxruntime, numpy, opencv-python-headless, pillow,
# pydicom, pylibjpeg*) install on aarch64 from ordinary manylinux wheels, and cxr_edge (from this
# working tree, via PYTHONPATH) gives the same probabilities and CAMs on arm64 as on x86.
# What it does NOT show: speed. Under emulation every instruction is translated; timings printed
# here are not a benchmark of any ARM device.
#
# Usage: benchmarks/arm_qemu.sh BUNDLE.onnx [IMAGE ...]
#   default images: 3 of ../shared/data/nih-cxr14-sample/fullres (or CXR_EDGE_SHARED), else a synthetic PNG.
# Env: ARM_WORK (cache dir, default build/arm64), PYTHON (x86 python, default .venv/bin/python),
#      DEBIAN_MIRROR (default http://deb.debian.org/debian), ORT_AARCH64 (default 1.22.1),
#      ARM_BENCH=1 also runs `cxr-edge-bench --runs 2` under emulation (slow; shows machine detection).
# Needs (Debian/Ubuntu host, as root): apt-get install qemu-user-static debootstrap
# Not part of CI.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
BUNDLE="${1:?usage: benchmarks/arm_qemu.sh BUNDLE.onnx [IMAGE ...]}"
shift || true
WORK="${ARM_WORK:-$REPO/build/arm64}"
ROOT="$WORK/root"
WHEELS="$WORK/wheels"
SITE="$WORK/site"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ORT_VERSION="${ORT_AARCH64:-1.22.1}"  # 1.32 crashes under qemu-user 7.2
QEMU="$(command -v qemu-aarch64-static || true)"

say() { printf '\n== %s\n' "$*"; }

for tool in qemu-aarch64-static debootstrap dpkg; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install qemu-user-static debootstrap" >&2; exit 2; }
done
[ -f "$BUNDLE" ] || { echo "bundle not found: $BUNDLE" >&2; exit 2; }
mkdir -p "$WORK"

# 1. an arm64 Debian python3.11, unpacked without chroot (no binfmt needed: qemu runs it with -L ROOT)
if [ ! -x "$ROOT/usr/bin/python3.11" ]; then
  say "debootstrap arm64 bookworm (minbase + python3) into $ROOT"
  debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 bookworm "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg -x "$deb" "$ROOT"; done
fi
ARMPY=("$QEMU" -L "$ROOT" "$ROOT/usr/bin/python3.11")
say "arm64 interpreter"
"${ARMPY[@]}" -c 'import platform, sys; print(sys.version.split()[0], platform.machine(), platform.libc_ver())'

# 2. the runtime's aarch64 wheels, unpacked onto a PYTHONPATH folder
RUNTIME_PKGS=("onnxruntime==$ORT_VERSION" numpy opencv-python-headless pillow pydicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)
if [ ! -f "$SITE/.complete" ]; then
  say "pip download (aarch64 wheels): ${RUNTIME_PKGS[*]}"
  mkdir -p "$WHEELS" "$SITE"
  "$PYTHON" -m pip download --quiet --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    --platform any -d "$WHEELS" "${RUNTIME_PKGS[@]}"
  for whl in "$WHEELS"/*.whl; do "$PYTHON" -m zipfile -e "$whl" "$SITE"; done
  touch "$SITE/.complete"
fi
say "installed aarch64 wheels"
ls "$WHEELS" | sed 's/^/  /'

# 3. the same inference on x86 (host venv) and arm64 (emulated), then compare
IMAGES=("$@")
if [ ${#IMAGES[@]} -eq 0 ]; then
  SHARED="${CXR_EDGE_SHARED:-$REPO/../shared}"
  mapfile -t IMAGES < <(ls "$SHARED"/data/nih-cxr14-sample/fullres/*.png 2>/dev/null | head -3)
fi
if [ ${#IMAGES[@]} -eq 0 ]; then
  IMAGES=("$WORK/synthetic_1024.png")
  "$PYTHON" -c "import sys; from cxr_edge.bench.pipeline import write_synthetic_png; write_synthetic_png(sys.argv[1])" "${IMAGES[0]}"
fi

say "x86_64: $PYTHON benchmarks/arm_infer.py"
PYTHONPATH="$REPO" "$PYTHON" benchmarks/arm_infer.py --bundle "$BUNDLE" --out "$WORK/x86_64.npz" "${IMAGES[@]}"
say "aarch64 (qemu-user, emulated): python3.11 benchmarks/arm_infer.py"
PYTHONPATH="$SITE:$REPO" "${ARMPY[@]}" benchmarks/arm_infer.py --bundle "$BUNDLE" --out "$WORK/aarch64.npz" "${IMAGES[@]}"

say "comparison"
"$PYTHON" benchmarks/arm_infer.py --compare "$WORK/x86_64.npz" "$WORK/aarch64.npz"

if [ "${ARM_BENCH:-0}" = "1" ]; then
  say "cxr-edge-bench under emulation (machine detection only; the timings are NOT a benchmark)"
  PYTHONPATH="$SITE:$REPO" "${ARMPY[@]}" -m cxr_edge.bench.cli --model "$BUNDLE" --format fp32 --threads 1 --batch 1 \
    --runs 2 --warmup 1 --cold-repeats 0 --split-repeats 1  # qemu-user cannot spawn a child interpreter
fi
