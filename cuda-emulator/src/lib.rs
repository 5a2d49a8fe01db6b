//! A CPU emulation of the CUDA driver API and cuBLASLt: a **test tool** that lets the GPU tests (kernels, model,
//! expert worker, attention worker, NCCL transport) run on machines without a GPU. Built as a cdylib and found through
//! symlinks named `libcuda.so`, `libcuda.so.1`, `libcublas.so`, `libcublasLt.so`, `libnccl.so` and `libnccl.so.2` on
//! `LD_LIBRARY_PATH`, where cudarc dlopens the real libraries by name and looks each function up by its exact symbol
//! (`cuMemAlloc_v2`, ...). NVRTC stays the real one: our code compiles PTX as on a GPU; this library keeps only the
//! PTX's entry points and runs the kernels of `kernels/cuda/*.cu` compiled as C++ with g++ (build.rs, cpp/).
//!
//! What it proves: host-side launch code (argument order and types, grid and block sizes, buffer offsets, sizes and
//! layouts, shared-memory sizes) and the kernels' logic, under an execution model faithful where it matters (block
//! barriers that exited threads leave, warp shuffles and the warp MMA as collectives of the whole warp, garbage in
//! fresh memory and shared memory, red zones after every allocation, pointer arguments checked against the live
//! allocations, launch bounds from the PTX). Device allocations end just before a guard page ([`guard_pages`]): a
//! kernel, or the cuBLASLt or NCCL emulation, reading or writing past a buffer's end aborts the process with a message
//! naming the allocation and the kernel (`SWITCHYARD_CUDA_EMULATOR_GUARD=0` turns this off). What it does not prove:
//! real-GPU behaviour (PTX code generation, races and the memory model across blocks or threads, tensor-core rounding,
//! performance), nor that the real cuBLASLt accepts our descriptors beyond the documented rules emulated in
//! [`blaslt`]. The device it reports is named "Switchyard CPU emulation of CUDA (not a GPU)", so it can never be
//! mistaken for a GPU.
//!
//! Everything executes synchronously at the call: streams and events are bookkeeping; launches are serialised (the
//! kernels' `__shared__` variables are statics of the block being run). Blocks run one at a time in blockIdx order,
//! the threads of a block as cooperative fibers in a deterministic order (cpp/runtime.cpp), so a failure reproduces
//! exactly. The device: one, compute capability 9.0, 16 GiB, no memory pools (cudarc then uses cuMemAlloc_v2); more
//! identical ones sharing the memory with `SWITCHYARD_CUDA_EMULATOR_DEVICES` (see [`driver`]).
//!
//! NCCL's point-to-point API ([`nccl`]: unique ids, joining, grouped `ncclSend`/`ncclRecv`, the non-blocking polling,
//! aborts) is emulated too, for ranks that are threads of one process with a device each, behind the symlinks
//! `libnccl.so` and `libnccl.so.2`: the NCCL transport's own code runs its exchanges through it.
//!
//! Use (from the workspace root; `scripts/test.sh` runs the GPU tests this way):
//! ```text
//! eval "$(bash scripts/nvrtc-tools.sh)"; eval "$(bash scripts/cuda-emulator.sh)"
//! LD_LIBRARY_PATH="$SWITCHYARD_CUDA_EMULATOR:$LD_LIBRARY_PATH" cargo test -p switchyard-kernels --features cuda \
//!     --test cuda_kernels
//! ```
//! `SWITCHYARD_CUDA_EMULATOR_SCHEDULE=reverse` runs blocks and threads in the reverse order, to expose kernels that
//! depend on an order the GPU does not promise.
//! Every error the emulator returns is also printed on stderr with what was wrong, and `cuGetErrorString` answers
//! that detail, so cudarc's `DriverError` carries it.

#![allow(non_snake_case)]

pub mod blaslt;
pub mod driver;
pub mod error;
pub mod guard_pages;
pub mod memory;
pub mod module;
pub mod nccl;
pub mod runtime;
