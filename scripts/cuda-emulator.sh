#!/usr/bin/env bash
# Builds the CPU emulation of the CUDA driver, cuBLASLt and NCCL (cuda-emulator/, a test tool) and lays it out under
# the file names cudarc dlopens (libcuda.so, libcuda.so.1, libcublas.so, libcublasLt.so, libnccl.so; and libnccl.so.2,
# the name NCCL's runtime package installs, which cudarc 0.19 does not try), so that the GPU tests run their kernels,
# and the NCCL transport its exchanges, on this machine instead of skipping. NVRTC stays the real one
# (scripts/nvrtc-tools.sh).
#
# Prints on stdout one line, `export SWITCHYARD_CUDA_EMULATOR=<dir>` (everything else goes to stderr); put that
# directory first on LD_LIBRARY_PATH for the test command only:
#   eval "$(bash scripts/nvrtc-tools.sh)"; eval "$(bash scripts/cuda-emulator.sh)"
#   LD_LIBRARY_PATH="$SWITCHYARD_CUDA_EMULATOR:$LD_LIBRARY_PATH" cargo test --features cuda --test cuda_kernels
# Never on a machine with a GPU: the emulator would shadow the driver (the device then names itself
# "Switchyard CPU emulation of CUDA (not a GPU)").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build -p switchyard-cuda-emulator --locked >&2
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
library="$target_dir/debug/libswitchyard_cuda_emulator.so"
[ -f "$library" ] || { echo "error: $library was not built" >&2; exit 1; }
dir="$target_dir/cuda-emulator"
mkdir -p "$dir"
for name in libcuda.so libcuda.so.1 libcublas.so libcublasLt.so libnccl.so libnccl.so.2; do
  ln -sf "$library" "$dir/$name"
done
echo "export SWITCHYARD_CUDA_EMULATOR='$dir'"
