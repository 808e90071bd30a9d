#!/usr/bin/env bash
# Set up hvd-easgd in .venv/: PyTorch + torchvision, Horovod 0.28.1 (PyTorch + Gloo, built once
# and cached), and this project in editable mode with its test extra. Idempotent: a second run
# with everything in place only checks and exits.
#
# Environment (all optional):
#   PYTHON=python3.11            interpreter for the venv (3.8-3.11: Horovod 0.28.1 needs distutils)
#   TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"   the pair installed when no torch is reused
#   HVD_EASGD_REUSE_TORCH=auto|1|0   reuse a torch+torchvision (and Horovod) that $PYTHON already
#                                has, e.g. a GPU cluster's (venv with --system-site-packages);
#                                auto (default) reuses when importable
#   HVD_EASGD_CACHE=~/.cache/hvd-easgd   where built Horovod wheels are kept, keyed by versions
#   HOROVOD_GPU_OPERATIONS=NCCL  (GPU clusters) build Horovod with NCCL; see docs/gpu-clusters.md
set -euo pipefail

HOROVOD_VERSION=0.28.1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
CACHE="${HVD_EASGD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvd-easgd}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
REUSE="${HVD_EASGD_REUSE_TORCH:-auto}"
START=$SECONDS

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
# pip here warns about every missing local index folder; keep real warnings and errors.
quiet_pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v '^WARNING: Location' >&2); }

# One interpreter start answers every question: importing torch is the slow part of a re-run.
probe() {
  [ -x "$VENV/bin/python" ] || return 0
  "$VENV/bin/python" - <<'PY' 2>/dev/null || true
import importlib
found = {}
for module in ("torch", "torchvision", "horovod", "hvd_easgd"):
    try:
        found[module] = importlib.import_module(module).__version__
    except Exception:
        pass
try:
    import horovod.torch as hvd  # loads the compiled extension against this torch
    found["horovod_torch"] = "gloo" if hvd.gloo_built() else "nogloo"
    found["horovod_nccl"] = int(bool(hvd.nccl_built()))
except Exception:
    pass
print(" ".join(f"{key}={value}" for key, value in found.items()))
PY
}
field() { tr ' ' '\n' <<<"$STATE" | sed -n "s/^$1=//p"; }

# ---------------------------------------------------------------- prerequisites
find_python() {
  local candidates=("${PYTHON:-}" python3.11 python3.10 python3.9 python3.8 python3)
  for py in "${candidates[@]}"; do
    [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c 'import sys; sys.exit(not ((3, 8) <= sys.version_info[:2] <= (3, 11)))' 2>/dev/null; then
      command -v "$py"; return 0
    fi
    [ -n "${PYTHON:-}" ] && [ "$py" = "$PYTHON" ] &&
      die "PYTHON=$PYTHON is $("$py" -V 2>&1); Horovod 0.28.1 builds on Python 3.8-3.11 only. Point PYTHON at one (e.g. 'pyenv install 3.11' or 'apt-get install python3.11-venv')."
  done
  die "no Python 3.8-3.11 found (Horovod 0.28.1 does not build on 3.12+). Install one (e.g. 'pyenv install 3.11' or 'apt-get install python3.11 python3.11-venv') and rerun, or set PYTHON=/path/to/python3.11."
}
PY=$(find_python)
"$PY" -c 'import venv, ensurepip' 2>/dev/null ||
  die "$PY has no venv/ensurepip module: install it (Debian: 'apt-get install python3-venv') and rerun."

# ---------------------------------------------------------------- venv and torch
reuse_torch=0
[ "$REUSE" = 1 ] && reuse_torch=1
if [ ! -x "$VENV/bin/python" ]; then
  if [ "$REUSE" = auto ] && "$PY" -c 'import torch, torchvision' >/dev/null 2>&1; then
    reuse_torch=1
  fi
  if [ "$reuse_torch" = 1 ]; then
    say "reusing the torch that $PY already has (venv with --system-site-packages)"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
STATE=$(probe)
if [ -z "$(field torch)" ] || [ -z "$(field torchvision)" ]; then
  [ "$reuse_torch" = 1 ] && die "HVD_EASGD_REUSE_TORCH=1 but torch/torchvision do not import from $PY"
  say "installing $TORCH_SPEC (a few minutes the first time)"
  # shellcheck disable=SC2086  # TORCH_SPEC is a list of requirement specifiers
  quiet_pip install $TORCH_SPEC
  STATE=$(probe)
fi
TORCH_VERSION=$(field torch)
[ -n "$TORCH_VERSION" ] || die "torch does not import in $VENV after installing it; remove $VENV and rerun"
say "torch $TORCH_VERSION, torchvision $(field torchvision)"

# ---------------------------------------------------------------- Horovod
# The toolkit root: explicit settings first, then where nvcc really lives (it may be a wrapper
# script, not a link), then the usual install prefixes.
find_cuda_root() {
  local nvcc_dir; nvcc_dir=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  local candidate
  for candidate in "${CUDA_HOME:-}" "${CUDAToolkit_ROOT:-}" "${CUDA_PATH:-}" "$nvcc_dir" \
      /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null | sort -rV) /opt/cuda; do
    [ -n "$candidate" ] && [ -f "$candidate/include/cuda_runtime.h" ] &&
      { [ -e "$candidate/lib64/libcudart.so" ] || [ -e "$candidate/lib/libcudart.so" ]; } &&
      { echo "$candidate"; return 0; }
  done
  return 1
}
ops="cpu"; [ -n "${HOROVOD_GPU_OPERATIONS:-}" ] && ops=$(echo "$HOROVOD_GPU_OPERATIONS" | tr 'A-Z' 'a-z')
horovod_ok() {
  [ "$(field horovod)" = "$HOROVOD_VERSION" ] && [ "$(field horovod_torch)" = gloo ] &&
    { [ "$ops" = cpu ] || [ "$(field horovod_nccl)" = 1 ]; }
}
if ! horovod_ok; then
  command -v cmake >/dev/null 2>&1 || die "cmake not found; Horovod's build needs it: 'apt-get install cmake' (or 'pip install cmake') and rerun."
  CXX_BASE="${CXX:-g++}"
  command -v "$CXX_BASE" >/dev/null 2>&1 || die "no C++ compiler ($CXX_BASE) found: 'apt-get install g++' (gcc >= 10 for C++20) and rerun."
  echo 'int main(){return 0;}' | "$CXX_BASE" -x c++ -std=c++20 -o /dev/null - 2>/dev/null ||
    die "$CXX_BASE cannot compile C++20, which torch $TORCH_VERSION's headers need: install gcc >= 10 and rerun (or set CXX)."

  pytag=$("$VENV/bin/python" -c 'import sys, platform; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")')
  key="horovod-$HOROVOD_VERSION/torch-$TORCH_VERSION/$pytag-$ops"
  wheeldir="$CACHE/wheels/$key"
  wheel=$(ls "$wheeldir"/horovod-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    say "building Horovod $HOROVOD_VERSION for torch $TORCH_VERSION ($ops; about 5 minutes on 2 cores)"
    quiet_pip install setuptools wheel packaging psutil cloudpickle cffi pyyaml
    build=$(mktemp -d)
    # Horovod 0.28.1 forces -std=c++14 and torch's headers need C++17/20: gcc honours the last
    # -std= it is given, so the wrapper appends the standard without touching Horovod's source.
    printf '#!/bin/sh\nexec %s "$@" -std=c++20\n' "$(command -v "$CXX_BASE")" > "$build/cxx"
    chmod +x "$build/cxx"
    export CXX="$build/cxx"
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    [ -n "${HOROVOD_WITH_MPI:-}" ] || export HOROVOD_WITHOUT_MPI=1
    export MAKEFLAGS="${MAKEFLAGS:--j$(nproc 2>/dev/null || echo 2)}"
    if command -v nvcc >/dev/null 2>&1; then
      # A CUDA build of torch makes Horovod's CMake look for the CUDA runtime next to nvcc.
      cuda_root=$(find_cuda_root) ||
        die "nvcc is on PATH but no CUDA toolkit root (with include/cuda_runtime.h and lib64/libcudart.so) was found: set CUDA_HOME and CUDAToolkit_ROOT to it and rerun."
      export CUDA_HOME="$cuda_root" CUDAToolkit_ROOT="$cuda_root"
      say "CUDA toolkit: $cuda_root"
    fi
    log="$build/horovod-build.log"
    # --no-cache-dir: pip's wheel cache is keyed by the sdist, not by torch; ours is.
    if ! "$VENV/bin/python" -m pip wheel --no-cache-dir --no-build-isolation --no-deps -w "$build/wheels" \
        "horovod==$HOROVOD_VERSION" >"$log" 2>&1; then
      grep -E 'error|Error|ERROR' "$log" | grep -v '^WARNING: Location' | tail -n 15 >&2 || true
      die "building Horovod failed; the full log is $log (look for the first 'error:')."
    fi
    mkdir -p "$wheeldir"
    cp "$build"/wheels/horovod-*.whl "$wheeldir/"
    wheel=$(ls "$wheeldir"/horovod-*.whl | head -n 1)
    rm -rf "$build"
    say "cached $wheel"
  else
    say "using cached $wheel"
  fi
  quiet_pip install --no-deps --force-reinstall "$wheel"
  quiet_pip install cloudpickle psutil pyyaml packaging cffi
  STATE=$(probe)
  horovod_ok || die "Horovod $HOROVOD_VERSION installed but horovod.torch with Gloo does not load against torch $TORCH_VERSION: remove $wheeldir and rerun to rebuild it"
fi

# ---------------------------------------------------------------- the project
stamp="$VENV/.hvd-easgd-setup"
want=$(cat "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ -z "$(field hvd_easgd)" ]; then
  say "installing hvd-easgd (editable) with its test extra"
  (cd "$ROOT" && quiet_pip install -e ".[test]")
  echo "$want" > "$stamp"
  STATE=$(probe)
  [ -n "$(field hvd_easgd)" ] || die "hvd_easgd does not import after installing it; remove $VENV and rerun"
fi
say "horovod $(field horovod) (PyTorch, $(field horovod_torch)), hvd-easgd $(field hvd_easgd)"
say "ready in $((SECONDS - START)) s: $VENV  (check: $VENV/bin/horovodrun --check-build)"
