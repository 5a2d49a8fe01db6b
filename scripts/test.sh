#!/usr/bin/env bash
# The whole test suite: what CI runs (.ci/run) and what the README tells everyone to run.
# Installs what it needs, builds once, runs every test, builds the CUDA backend and runs its tests (no GPU needed:
# NVRTC from PyPI compiles the kernels; GPU tests skip with a printed reason where there is none, then run on the CPU
# emulation of the CUDA driver, cuda-emulator/).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/ensure-deps.sh test

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
start=$(date +%s)
echo "== build (workspace, all targets)"
cargo build --workspace --all-targets --locked
echo "== python: a venv with the openai client (tests/tests/openai_client.rs drives the server with it)"
SWITCHYARD_TEST_PYTHON="$(bash scripts/python-client.sh)"
export SWITCHYARD_TEST_PYTHON
echo "$SWITCHYARD_TEST_PYTHON"
echo "== test"
cargo test --workspace --locked --no-fail-fast 2>&1 | tee target/test-output.txt
echo "== build with --features cuda (cudarc loads CUDA at run time; none is needed to compile)"
cargo build --features cuda --locked
echo "== CUDA tests without a driver: NVRTC (from PyPI wheels) compiles every kernel; GPU tests skip with a printed reason"
eval "$(bash scripts/nvrtc-tools.sh)"
# One invocation over the whole workspace, as the test run above: the dependencies' features unify the same way, so
# only the crates that take the `cuda` feature compile again (per-package invocations rebuilt dependencies each time).
cuda_tests=(--test cuda_nvrtc --test cuda_kernels --test gpu_experts --test gpu_forward --test gpu_worker --test collective
  --test engine --test gpu_shards --test gpu_cluster)
cargo test --workspace --features cuda --locked "${cuda_tests[@]}" -- --nocapture 2>&1 | tee target/test-output-cuda.txt
echo "== GPU tests on the CPU emulation of the CUDA driver and cuBLASLt (cuda-emulator/): their kernels run here"
eval "$(bash scripts/cuda-emulator.sh)"
# A fresh cuBLASLt tuning cache for this run: every run times its candidates (a tuning cached by an earlier run would
# skip that), and the tests after the first read what it wrote.
SWITCHYARD_CUBLASLT_CACHE="$(mktemp -d)"
export SWITCHYARD_CUBLASLT_CACHE
trap 'rm -rf "$SWITCHYARD_CUBLASLT_CACHE"' EXIT
# The same test binaries (already built), now finding GPUs and NCCL: none may skip. The engine and collective targets
# hold CPU tests too, which ran above; only their GPU and NCCL tests run again.
on_emulator() {
  LD_LIBRARY_PATH="$SWITCHYARD_CUDA_EMULATOR:$LD_LIBRARY_PATH" cargo test --workspace --features cuda --locked "$@"
}
{
  on_emulator --test cuda_kernels --test gpu_experts --test gpu_forward --test gpu_worker -- --nocapture
  # The expert layer with the lone-expert kernel forced for up to 32 tokens (by default only where the tuning timed it
  # faster than cuBLASLt).
  SWITCHYARD_LONE_EXPERT_MAX_TOKENS=32 on_emulator --test cuda_kernels -- expert_layer --nocapture
  # And with the warpgroup (wgmma) kernel chosen wherever it takes a bucket (timing on the emulator never would).
  SWITCHYARD_WGMMA_EXPERT_GEMM=force on_emulator --test cuda_kernels -- expert_layer --nocapture
  on_emulator --test engine -- engine_on_the_gpu --nocapture
  on_emulator --test gpu_shards -- --nocapture
  on_emulator --test collective -- nccl --nocapture
  # `switchyard up` with every attention and expert worker on cuda:0: the deployment path through the real binary.
  on_emulator --test gpu_cluster -- --nocapture
  # Blocks and threads in the reverse order: a kernel relying on an order the GPU does not promise fails here.
  SWITCHYARD_CUDA_EMULATOR_SCHEDULE=reverse on_emulator --test cuda_kernels --test gpu_forward --test gpu_shards \
    -- --nocapture
} 2>&1 | tee target/test-output-cuda-emulated.txt
if grep -q "SKIPPED" target/test-output-cuda-emulated.txt; then
  echo "error: a GPU test skipped on the CUDA emulator (it should have run):" >&2
  grep "SKIPPED" target/test-output-cuda-emulated.txt >&2
  exit 1
fi
echo "== done in $(( $(date +%s) - start )) s"
