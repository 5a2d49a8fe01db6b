#!/usr/bin/env bash
# Makes (or reuses) NVRTC and the CUDA headers from PyPI wheels, so that the CUDA kernels (kernels/cuda/*.cu) can be
# compiled to PTX on a machine with no GPU and no CUDA toolkit (NVRTC needs neither a driver nor a GPU). The test
# kernels/tests/cuda_nvrtc.rs uses them; without them it skips with a printed reason.
#
# Prints on stdout, one `export NAME=value` a line (everything else goes to stderr), so that
#   eval "$(bash scripts/nvrtc-tools.sh)"
# sets up the current shell:
#   LD_LIBRARY_PATH            gets the wheel's lib dir first: cudarc dlopens NVRTC by name, and `libnvrtc.so.12` is
#                              one of the names it tries with `cuda-13000` (cudarc's get_lib_name_candidates), so no
#                              symlink is needed; NVRTC itself dlopens libnvrtc-builtins from the same dir
#   SWITCHYARD_CUDA_INCLUDE    the include dir with cuda_fp8.h, cuda_bf16.h, ... (from nvidia-cuda-runtime-cu12)
#   SWITCHYARD_NVRTC_LIB       the lib dir alone (for tools that want it)
#
# Safe to run repeatedly and concurrently: when the pinned wheels are unpacked already it returns at once without
# touching the network; otherwise it needs python3 with pip and PyPI (or wheels in $SWITCHYARD_NVRTC_WHEELS, a
# directory used as `--find-links` with `--no-index`).
#
# Environment: SWITCHYARD_NVRTC_TOOLS (the cache directory; default $XDG_CACHE_HOME/switchyard/nvrtc or
# ~/.cache/switchyard/nvrtc), SWITCHYARD_NVRTC_WHEELS (optional local wheel directory), PYTHON (default python3).
set -euo pipefail
# shellcheck source=scripts/lib/python.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/python.sh"

# Pinned: a bump gets a fresh directory (the versions are in the path).
nvrtc_version=12.9.86
runtime_version=12.9.79

cache="${SWITCHYARD_NVRTC_TOOLS:-$switchyard_cache/nvrtc}"
target="$cache/nvrtc-$nvrtc_version-runtime-$runtime_version"
lib_dir="$target/nvidia/cuda_nvrtc/lib"
include_dir="$target/nvidia/cuda_runtime/include"

ready() {
  [ -f "$lib_dir/libnvrtc.so.12" ] && [ -f "$include_dir/cuda_fp8.h" ] && [ -f "$target/.complete" ]
}

report() {
  echo "export SWITCHYARD_NVRTC_LIB='$lib_dir'"
  echo "export SWITCHYARD_CUDA_INCLUDE='$include_dir'"
  echo "export LD_LIBRARY_PATH='$lib_dir'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
}

if ready; then
  report
  exit 0
fi

take_install_lock "$cache/.lock"
if ready; then
  report
  exit 0
fi

require_python 8 "compiling the CUDA kernels with NVRTC from PyPI"
if ! "$base_python" -m pip --version >/dev/null 2>&1; then
  echo "error: $base_python has no pip (Debian: apt-get install python3-pip)" >&2
  exit 1
fi

source_args=()
if [ -n "${SWITCHYARD_NVRTC_WHEELS:-}" ]; then
  source_args=(--no-index --find-links "$SWITCHYARD_NVRTC_WHEELS")
fi

# Unpack into a scratch dir and rename at the end, so an interrupted install never looks ready.
scratch="$(mktemp -d "$cache/.install.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
echo "nvrtc-tools: installing nvidia-cuda-nvrtc-cu12==$nvrtc_version nvidia-cuda-runtime-cu12==$runtime_version" >&2
"$base_python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$scratch" "${source_args[@]}" \
  "nvidia-cuda-nvrtc-cu12==$nvrtc_version" "nvidia-cuda-runtime-cu12==$runtime_version" >&2
if [ ! -f "$scratch/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ] ||
  [ ! -f "$scratch/nvidia/cuda_runtime/include/cuda_fp8.h" ]; then
  echo "nvrtc-tools: the wheels did not contain nvidia/cuda_nvrtc/lib/libnvrtc.so.12 and" \
    "nvidia/cuda_runtime/include/cuda_fp8.h; found:" >&2
  find "$scratch" -maxdepth 4 >&2
  exit 1
fi
touch "$scratch/.complete"
rm -rf "$target"
mv "$scratch" "$target"
trap - EXIT
report
