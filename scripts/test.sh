#!/usr/bin/env bash
# The whole test suite: what CI runs (.ci/run) and what the README tells everyone to run.
# Installs what it needs, builds once, runs every test, builds the CUDA backend and runs its tests (no GPU needed:
# NVRTC from PyPI compiles the kernels; GPU tests skip with a printed reason where there is none).
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
echo "== CUDA tests: NVRTC (from PyPI wheels) compiles every kernel here; the GPU tests skip with a printed reason"
eval "$(bash scripts/nvrtc-tools.sh)"
# One invocation over the whole workspace, as the test run above: the dependencies' features unify the same way, so
# only the crates that take the `cuda` feature compile again (per-package invocations rebuilt dependencies each time).
cargo test --workspace --features cuda --locked --test cuda_nvrtc --test cuda_kernels --test gpu_experts --test gpu_forward \
  --test gpu_worker --test collective --test engine -- --nocapture 2>&1 | tee target/test-output-cuda.txt
echo "== done in $(( $(date +%s) - start )) s"
