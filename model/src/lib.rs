//! The Llama 4 text model of Switchyard: config, checkpoint loading and the forward pass.
//!
//! Owns the model's facts (config parsing with Hugging Face's defaults), the checkpoint index and memory-mapped
//! safetensors loading (selective by expert, every tensor checked by name, shape and dtype), the layer math built on
//! `switchyard-kernels`, and the deterministic tiny-checkpoint generator. It must not know about the network, the
//! cluster or requests: workers put those around it.
//!
//! # Feature flags
//! - `cuda`: forwards to `switchyard-kernels/cuda`.

pub mod checkpoint;
pub mod config;
pub mod context;
pub mod error;
pub mod experts;
pub mod forward;
pub mod generate;
pub mod gpu_experts;
pub mod gpu_forward;
pub mod kv;
pub mod linear;
pub mod memory;
pub mod rope;
pub mod tiny;

pub use error::ModelError;
pub use experts::{ActivationPrecision, LocalExperts, RoutedExperts};
pub use forward::{ExpertSelection, ForwardPass, Llama4Model, LoadOptions, LogitsFor, SequenceStep};
pub use generate::{
    generate, generate_until, FinishReason, Generation, GenerationRequest, SamplingParams, TokenLogprobs,
};
pub use gpu_experts::GpuExperts;
pub use gpu_forward::{GpuModel, GpuModelOptions};
pub use kv::{BlockTable, KvBlockPool, KvCache};
/// Element type of dense weights on the GPU (`f32` or `bf16`), which [`GpuModelOptions`] takes.
pub use switchyard_kernels::device::DenseDtype;
/// Where compute runs (`cpu` or `cuda:N`): the kernels' device choice, which [`GpuExperts::new`] takes.
pub use switchyard_kernels::device::Device;
/// Element type of the KV cache on the GPU (`f32` or `bf16`), which [`GpuModelOptions`] takes (the CPU's is f32).
pub use switchyard_kernels::device::KvDtype;
