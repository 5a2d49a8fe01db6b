//! Stand-in for the CUDA backend in builds without the `cuda` feature: every CUDA request is refused with
//! [`KernelError::NotCompiledWithCuda`], so callers need no `cfg` of their own. The types are uninhabited: no value
//! of them can exist, so their methods are never reached. They carry the methods the model's GPU forward pass uses,
//! with the signatures of the real ones (`cuda/`), so that code compiles in both builds; the device buffers
//! (`CudaSlice`, `CudaView`, `CudaViewMut`) have the subset of cudarc's methods that code may use.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::ops::RangeBounds;
use std::sync::Arc;

use crate::device::gpu_bench::{GemmBenchConfig, GemmBenchReport};
use crate::device::plan::{ExpertDims, Fp8Expert};
use crate::device::sources::CudaSource;
use crate::device::types::{DenseDtype, KvElement, KvWrite, PagedDecode};
use crate::error::KernelError;

pub(super) const COMPILED: bool = false;

pub(super) fn check_cuda(_ordinal: usize) -> Result<String, KernelError> {
    Err(KernelError::NotCompiledWithCuda)
}

/// A CUDA GPU (needs the `cuda` feature; this build has none).
#[derive(Debug)]
pub enum CudaDevice {}

impl CudaDevice {
    /// Always [`KernelError::NotCompiledWithCuda`].
    pub fn new(_ordinal: usize) -> Result<Arc<Self>, KernelError> {
        Err(KernelError::NotCompiledWithCuda)
    }

    /// The GPU's name.
    pub fn name(&self) -> &str {
        match *self {}
    }

    /// The ordinal opened.
    pub fn ordinal(&self) -> usize {
        match *self {}
    }

    /// The NVRTC virtual architecture.
    pub fn arch(&self) -> &str {
        match *self {}
    }

    /// Waits for everything queued.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        match *self {}
    }

    /// Copies `host` to a new device buffer.
    pub fn upload<T: Copy>(&self, _host: &[T]) -> Result<CudaSlice<T>, KernelError> {
        match *self {}
    }

    /// Copies a device buffer back.
    pub fn download<T: Copy>(&self, _device: &CudaSlice<T>) -> Result<Vec<T>, KernelError> {
        match *self {}
    }

    /// A zeroed device buffer.
    pub fn zeros<T: Copy>(&self, _len: usize) -> Result<CudaSlice<T>, KernelError> {
        match *self {}
    }

    /// Copies `host` into an existing device buffer.
    pub fn upload_into<T: Copy>(&self, _host: &[T], _dst: &mut CudaViewMut<'_, T>) -> Result<(), KernelError> {
        match *self {}
    }

    /// Copies a device view back.
    pub fn download_view<T: Copy>(&self, _src: &CudaView<'_, T>) -> Result<Vec<T>, KernelError> {
        match *self {}
    }

    /// Device-to-device copy.
    pub fn copy_view<T: Copy>(&self, _src: &CudaView<'_, T>, _dst: &mut CudaViewMut<'_, T>) -> Result<(), KernelError> {
        match *self {}
    }

    /// RMS norm per row.
    pub fn rms_norm(
        &self,
        _x: &CudaView<'_, f32>,
        _weight: Option<&CudaView<'_, f32>>,
        _dim: usize,
        _eps: f32,
        _out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        match *self {}
    }

    /// Interleaved RoPE in place.
    pub fn rope_interleaved(
        &self,
        _x: &mut CudaViewMut<'_, f32>,
        _positions: &CudaView<'_, u32>,
        _heads: usize,
        _head_dim: usize,
        _inv_freq: &CudaView<'_, f32>,
    ) -> Result<(), KernelError> {
        match *self {}
    }

    /// Decode attention over a paged KV cache (f32 or bf16).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode_attention<T: KvElement>(
        &self,
        _shape: &PagedDecode,
        _q: &CudaView<'_, f32>,
        _pool: &CudaView<'_, T>,
        _block_table: &CudaView<'_, u32>,
        _table_row: &CudaView<'_, u32>,
        _first_block: &CudaView<'_, u32>,
        _seq_len: &CudaView<'_, u32>,
        _positions: &CudaView<'_, u32>,
        _out: &mut CudaViewMut<'_, f32>,
        _lse: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        match *self {}
    }

    /// `out (+)= x . w^T`.
    pub fn linear(
        &self,
        _x: &CudaView<'_, f32>,
        _m: usize,
        _w: &DenseWeight,
        _out: &mut CudaViewMut<'_, f32>,
        _accumulate: bool,
    ) -> Result<(), KernelError> {
        match *self {}
    }

    /// f32 to bf16 bits.
    pub fn f32_to_bf16(&self, _x: &CudaView<'_, f32>, _out: &mut CudaViewMut<'_, u16>) -> Result<(), KernelError> {
        match *self {}
    }

    /// Embedding look-up.
    pub fn embed_rows(
        &self,
        _table: &DenseWeight,
        _tokens: &CudaView<'_, u32>,
        _out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        match *self {}
    }

    /// SwiGLU of a fused gate|up output.
    pub fn silu_mul(
        &self,
        _gate_up: &CudaView<'_, f32>,
        _inter: usize,
        _out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        match *self {}
    }

    /// `x += y`.
    pub fn add_in_place(&self, _x: &mut CudaViewMut<'_, f32>, _y: &CudaView<'_, f32>) -> Result<(), KernelError> {
        match *self {}
    }

    /// `x[r, :] *= factors[r]`.
    pub fn scale_rows(
        &self,
        _x: &mut CudaViewMut<'_, f32>,
        _cols: usize,
        _factors: &CudaView<'_, f32>,
    ) -> Result<(), KernelError> {
        match *self {}
    }

    /// Keys and values into the paged KV pool (f32 or bf16).
    pub fn kv_write<T: KvElement>(
        &self,
        _shape: &KvWrite,
        _pool: &mut CudaViewMut<'_, T>,
        _k: &CudaView<'_, f32>,
        _v: &CudaView<'_, f32>,
        _slots: &CudaView<'_, u32>,
    ) -> Result<(), KernelError> {
        match *self {}
    }
}

/// A dense weight on a GPU (needs the `cuda` feature).
#[derive(Debug)]
pub enum DenseWeight {}

impl DenseWeight {
    /// Always [`KernelError::NotCompiledWithCuda`].
    pub fn upload(
        _device: &Arc<CudaDevice>,
        _weight: &[f32],
        _n: usize,
        _k: usize,
        _dtype: DenseDtype,
    ) -> Result<Self, KernelError> {
        Err(KernelError::NotCompiledWithCuda)
    }

    /// Output features.
    pub fn n(&self) -> usize {
        match *self {}
    }

    /// Input features.
    pub fn k(&self) -> usize {
        match *self {}
    }

    /// Bytes on the device.
    pub fn bytes(&self) -> usize {
        match *self {}
    }

    /// The element type on the device.
    pub fn dtype(&self) -> DenseDtype {
        match *self {}
    }
}

/// A device buffer (cudarc's `CudaSlice` with the `cuda` feature); no value exists in this build.
#[derive(Debug)]
pub struct CudaSlice<T> {
    never: Infallible,
    marker: PhantomData<T>,
}

/// A view of a device buffer (cudarc's `CudaView` with the `cuda` feature); no value exists in this build.
#[derive(Debug)]
pub struct CudaView<'a, T> {
    never: Infallible,
    marker: PhantomData<&'a T>,
}

/// A mutable view of a device buffer (cudarc's `CudaViewMut` with the `cuda` feature); no value exists in this build.
#[derive(Debug)]
pub struct CudaViewMut<'a, T> {
    never: Infallible,
    marker: PhantomData<&'a mut T>,
}

impl<T> CudaSlice<T> {
    /// Values held.
    pub fn len(&self) -> usize {
        match self.never {}
    }

    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        match self.never {}
    }

    /// The whole buffer as a view.
    pub fn as_view(&self) -> CudaView<'_, T> {
        match self.never {}
    }

    /// The whole buffer as a mutable view.
    pub fn as_view_mut(&mut self) -> CudaViewMut<'_, T> {
        match self.never {}
    }

    /// A view of `bounds` (panics when out of range, as cudarc's).
    pub fn slice(&self, _bounds: impl RangeBounds<usize>) -> CudaView<'_, T> {
        match self.never {}
    }

    /// A mutable view of `bounds` (panics when out of range, as cudarc's).
    pub fn slice_mut(&mut self, _bounds: impl RangeBounds<usize>) -> CudaViewMut<'_, T> {
        match self.never {}
    }

    /// Two views, split at `mid`.
    pub fn split_at(&self, _mid: usize) -> (CudaView<'_, T>, CudaView<'_, T>) {
        match self.never {}
    }

    /// Two mutable views, split at `mid`.
    pub fn split_at_mut(&mut self, _mid: usize) -> (CudaViewMut<'_, T>, CudaViewMut<'_, T>) {
        match self.never {}
    }
}

impl<'a, T> CudaView<'a, T> {
    /// Values viewed.
    pub fn len(&self) -> usize {
        match self.never {}
    }

    /// Whether it views no value.
    pub fn is_empty(&self) -> bool {
        match self.never {}
    }

    /// A view of `bounds` of this view.
    pub fn slice(&self, _bounds: impl RangeBounds<usize>) -> Self {
        match self.never {}
    }

    /// Two views, split at `mid`.
    pub fn split_at(&self, _mid: usize) -> (Self, Self) {
        match self.never {}
    }
}

impl<T> CudaViewMut<'_, T> {
    /// Values viewed.
    pub fn len(&self) -> usize {
        match self.never {}
    }

    /// Whether it views no value.
    pub fn is_empty(&self) -> bool {
        match self.never {}
    }

    /// A read-only view of `bounds` of this view.
    pub fn slice<'b>(&'b self, _bounds: impl RangeBounds<usize>) -> CudaView<'b, T> {
        match self.never {}
    }

    /// A mutable view of `bounds` of this view.
    pub fn slice_mut<'b>(&'b mut self, _bounds: impl RangeBounds<usize>) -> CudaViewMut<'b, T> {
        match self.never {}
    }

    /// This view, read-only.
    pub fn as_view<'b>(&'b self) -> CudaView<'b, T> {
        match self.never {}
    }

    /// Two mutable views, split at `mid`.
    pub fn split_at_mut<'b>(&'b mut self, _mid: usize) -> (CudaViewMut<'b, T>, CudaViewMut<'b, T>) {
        match self.never {}
    }
}

/// The routed experts of one layer resident on a GPU (needs the `cuda` feature).
#[derive(Debug)]
pub enum GpuExpertLayer {}

impl GpuExpertLayer {
    /// Always [`KernelError::NotCompiledWithCuda`].
    pub fn upload(_device: &Arc<CudaDevice>, _experts: &[Fp8Expert<'_>]) -> Result<Self, KernelError> {
        Err(KernelError::NotCompiledWithCuda)
    }

    /// Experts held.
    pub fn experts(&self) -> usize {
        match *self {}
    }

    /// The layer's dimensions.
    pub fn dims(&self) -> ExpertDims {
        match *self {}
    }

    /// Bytes of weights and scales on the device.
    pub fn weight_bytes(&self) -> usize {
        match *self {}
    }

    /// Routed-expert outputs.
    pub fn forward(&self, _inputs: &[f32], _routed: &[u32]) -> Result<Vec<f32>, KernelError> {
        match *self {}
    }
}

/// Always [`KernelError::NotCompiledWithCuda`].
pub fn compile_cuda_source(_source: &CudaSource, _arch: &str) -> Result<String, KernelError> {
    Err(KernelError::NotCompiledWithCuda)
}

/// Always [`KernelError::NotCompiledWithCuda`].
pub fn bench_expert_gemm(_ordinal: usize, _config: &GemmBenchConfig) -> Result<GemmBenchReport, KernelError> {
    Err(KernelError::NotCompiledWithCuda)
}
