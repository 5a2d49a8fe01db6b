//! The dense side of a decoder layer on the GPU: dense weights resident on the device ([`DenseWeight`], f32 or bf16)
//! and their GEMM ([`CudaDevice::linear`], cuBLASLt through `blaslt.rs`), and the typed wrappers of `dense.cu`
//! (embedding look-up, SwiGLU, residual add, row scaling, writes into the paged KV cache), plus copies between host
//! and device views. Like `kernels.rs`, every wrapper checks buffer lengths against the dimensions before launching.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use super::kernels::{blocks, int, ROW_THREADS};
use super::{driver, CudaDevice};
use crate::device::sources::DENSE_CU;
use crate::device::types::{f32_to_bf16_bits, DenseDtype, KvDtype, KvElement, KvWrite};
use crate::error::{check_len, product, KernelError};

/// Blocks of the grid-stride element-wise kernels: enough to fill an H100 (132 SMs x 8 blocks of 256 threads) while
/// each thread still handles several values of a large buffer.
const ELEMENTWISE_BLOCKS: usize = 1024;
/// Most column blocks of the row kernels (rows x column blocks grids): a row of 5120 values needs 20 of 256 threads.
const COLUMN_BLOCKS: usize = 32;
/// Weight values converted to bf16 on the host per chunk of an upload (64 MiB of f32): bounds the host copy.
const UPLOAD_CHUNK: usize = 16 << 20;

/// The device copy of a dense weight.
enum Storage {
    F32(CudaSlice<f32>),
    /// bf16 bits.
    Bf16(CudaSlice<u16>),
}

/// A dense `nn.Linear` weight `[n, k]` (n output features of k inputs, row-major) resident on one GPU, in f32 or
/// rounded to bf16. Also an embedding table `[vocab, hidden]` for [`CudaDevice::embed_rows`].
pub struct DenseWeight {
    device: Arc<CudaDevice>,
    n: usize,
    k: usize,
    storage: Storage,
}

// By hand: the storage has no useful Debug (and a weight's values should never be printed).
impl std::fmt::Debug for DenseWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DenseWeight([{}, {}] {} on {:?})", self.n, self.k, self.dtype(), self.device)
    }
}

impl DenseWeight {
    /// Uploads `weight` (`n * k` values, row-major `[n, k]`) to `device` as `dtype` (bf16: each value rounded to
    /// nearest even, as [`crate::device::f32_to_bf16_bits`]). Waits until the copy is done.
    pub fn upload(
        device: &Arc<CudaDevice>,
        weight: &[f32],
        n: usize,
        k: usize,
        dtype: DenseDtype,
    ) -> Result<Self, KernelError> {
        const OP: &str = "dense weight upload";
        if n == 0 || k == 0 {
            return Err(KernelError::invalid(OP, format!("n = {n} and k = {k} must be positive")));
        }
        let values = product(OP, n, k)?;
        check_len(OP, "weight", weight.len(), values, format_args!("n * k = {n} * {k}"))?;
        let storage = match dtype {
            DenseDtype::F32 => Storage::F32(device.upload(weight)?),
            DenseDtype::Bf16 => {
                let mut codes = device.zeros::<u16>(values)?;
                let mut chunk = Vec::with_capacity(UPLOAD_CHUNK.min(values));
                for (i, part) in weight.chunks(UPLOAD_CHUNK).enumerate() {
                    chunk.clear();
                    part.par_iter().map(|&x| f32_to_bf16_bits(x)).collect_into_vec(&mut chunk);
                    let start = i * UPLOAD_CHUNK;
                    // A copy from pageable memory returns once the host buffer has been read, so `chunk` can be
                    // refilled right away.
                    device
                        .stream()
                        .memcpy_htod(&chunk, &mut codes.slice_mut(start..start + part.len()))
                        .map_err(driver("dense weight upload"))?;
                }
                Storage::Bf16(codes)
            }
        };
        device.synchronize()?;
        Ok(DenseWeight { device: device.clone(), n, k, storage })
    }

    /// Output features (rows).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features (columns).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes on the device.
    pub fn bytes(&self) -> usize {
        self.n * self.k * self.dtype().bytes()
    }

    /// The element type on the device.
    pub fn dtype(&self) -> DenseDtype {
        match self.storage {
            Storage::F32(_) => DenseDtype::F32,
            Storage::Bf16(_) => DenseDtype::Bf16,
        }
    }

    /// Refuses a weight that lives on another device than the one asked to use it.
    fn check_device(&self, op: &'static str, device: &CudaDevice) -> Result<(), KernelError> {
        if std::ptr::eq(Arc::as_ptr(&self.device), device) {
            Ok(())
        } else {
            Err(KernelError::invalid(op, format!("the weight lives on {:?}, not on {device:?}", self.device)))
        }
    }
}

impl CudaDevice {
    /// `out[m, n] = x[m, k] · w^T`, or `out += x[m, k] · w^T` with `accumulate`, through cuBLASLt with f32
    /// accumulation and output. F32 weights: f32 inputs (`CUBLAS_COMPUTE_32F`, never TF32). Bf16 weights: `x` is
    /// first rounded to bf16 (nearest even) in a scratch buffer, products of two bf16 values are exact in f32.
    pub fn linear(
        &self,
        x: &CudaView<'_, f32>,
        m: usize,
        w: &DenseWeight,
        out: &mut CudaViewMut<'_, f32>,
        accumulate: bool,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda linear";
        w.check_device(OP, self)?;
        let (n, k) = (w.n, w.k);
        let values = product(OP, m, k)?;
        check_len(OP, "x", x.len(), values, format_args!("m * k = {m} * {k}"))?;
        check_len(OP, "out", out.len(), product(OP, m, n)?, format_args!("m * n = {m} * {n}"))?;
        if m == 0 {
            return Ok(());
        }
        match &w.storage {
            Storage::F32(weight) => self.dense_gemm(x, &weight.as_view(), m, n, k, out, accumulate),
            Storage::Bf16(weight) => self.with_bf16_scratch(values, |scratch| {
                self.f32_to_bf16(x, scratch)?;
                self.dense_gemm(&scratch.as_view(), &weight.as_view(), m, n, k, out, accumulate)
            }),
        }
    }

    /// `out[i] = bf16(x[i])` (bits, round to nearest even): bit for bit [`crate::device::f32_to_bf16_bits`].
    pub fn f32_to_bf16(&self, x: &CudaView<'_, f32>, out: &mut CudaViewMut<'_, u16>) -> Result<(), KernelError> {
        const OP: &str = "cuda f32_to_bf16";
        check_len(OP, "out", out.len(), x.len(), "x.len()")?;
        if x.is_empty() {
            return Ok(());
        }
        let f = self.function(&DENSE_CU, "f32_to_bf16")?;
        let n = x.len() as i64;
        let cfg = elementwise_config(OP, x.len())?;
        let mut launch = self.stream().launch_builder(&f);
        launch.arg(x).arg(&n).arg(out);
        // SAFETY: the arguments match the kernel's signature and the lengths were checked above.
        unsafe { launch.launch(cfg) }.map_err(driver("launch f32_to_bf16"))?;
        Ok(())
    }

    /// `out[t, :] = table[tokens[t], :]` as f32 (`table` an embedding `[vocab, hidden]`: `vocab = table.n()`,
    /// `hidden = table.k()`). Token ids must be checked `< vocab` on the host: the device cannot report a bad one, so
    /// the kernel writes a row of zeros for it (it never reads outside the table).
    pub fn embed_rows(
        &self,
        table: &DenseWeight,
        tokens: &CudaView<'_, u32>,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda embed_rows";
        table.check_device(OP, self)?;
        let (vocab, hidden) = (table.n, table.k);
        let count = tokens.len();
        check_len(
            OP,
            "out",
            out.len(),
            product(OP, count, hidden)?,
            format_args!("tokens * hidden = {count} * {hidden}"),
        )?;
        if count == 0 {
            return Ok(());
        }
        let vocab = u32::try_from(vocab)
            .map_err(|_| KernelError::invalid(OP, format!("vocab = {vocab} exceeds the u32 token ids")))?;
        let (count_i, hidden_i) = (int(OP, "tokens", count)?, int(OP, "hidden", hidden)?);
        let cfg =
            LaunchConfig { grid_dim: (blocks(OP, count)?, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 };
        let f;
        let mut launch = match &table.storage {
            Storage::F32(values) => {
                f = self.function(&DENSE_CU, "embed_rows_f32")?;
                let mut launch = self.stream().launch_builder(&f);
                launch.arg(values);
                launch
            }
            Storage::Bf16(codes) => {
                f = self.function(&DENSE_CU, "embed_rows_bf16")?;
                let mut launch = self.stream().launch_builder(&f);
                launch.arg(codes);
                launch
            }
        };
        launch.arg(tokens).arg(&count_i).arg(&vocab).arg(&hidden_i).arg(out);
        // SAFETY: signature matched (the table's element type picks the kernel); lengths checked; ids >= vocab are
        // not read (see above).
        unsafe { launch.launch(cfg) }.map_err(driver("launch embed_rows"))?;
        Ok(())
    }

    /// SwiGLU of a fused gate|up output: `out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]` with
    /// `silu(g) = g / (1 + exp(-g))`; `gate_up` is `[rows, 2 * inter]`, `out` `[rows, inter]`.
    pub fn silu_mul(
        &self,
        gate_up: &CudaView<'_, f32>,
        inter: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda silu_mul";
        if inter == 0 || gate_up.len() % (2 * inter) != 0 {
            return Err(KernelError::shape(
                OP,
                format!("gate_up has {} values, not a multiple of 2 * inter = 2 * {inter}", gate_up.len()),
            ));
        }
        let rows = gate_up.len() / (2 * inter);
        check_len(OP, "out", out.len(), rows * inter, format_args!("rows * inter = {rows} * {inter}"))?;
        if rows == 0 {
            return Ok(());
        }
        let f = self.function(&DENSE_CU, "silu_mul")?;
        let (rows_i, inter_i) = (int(OP, "rows", rows)?, int(OP, "inter", inter)?);
        let cfg = row_config(OP, rows, inter)?;
        let mut launch = self.stream().launch_builder(&f);
        launch.arg(gate_up).arg(&rows_i).arg(&inter_i).arg(out);
        // SAFETY: signature matched; lengths checked.
        unsafe { launch.launch(cfg) }.map_err(driver("launch silu_mul"))?;
        Ok(())
    }

    /// `x += y` element by element (the residual adds).
    pub fn add_in_place(&self, x: &mut CudaViewMut<'_, f32>, y: &CudaView<'_, f32>) -> Result<(), KernelError> {
        const OP: &str = "cuda add_in_place";
        check_len(OP, "y", y.len(), x.len(), "x.len()")?;
        if x.is_empty() {
            return Ok(());
        }
        let f = self.function(&DENSE_CU, "add_in_place")?;
        let n = x.len() as i64;
        let cfg = elementwise_config(OP, x.len())?;
        let mut launch = self.stream().launch_builder(&f);
        launch.arg(x).arg(y).arg(&n);
        // SAFETY: signature matched; lengths checked (a `&mut` and a `&` view cannot overlap).
        unsafe { launch.launch(cfg) }.map_err(driver("launch add_in_place"))?;
        Ok(())
    }

    /// `x[r, :] *= factors[r]` for rows of `cols` values (`x.len() == factors.len() * cols`): the attention
    /// temperature of NoPE layers.
    pub fn scale_rows(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        cols: usize,
        factors: &CudaView<'_, f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda scale_rows";
        let rows = factors.len();
        check_len(OP, "x", x.len(), product(OP, rows, cols)?, format_args!("rows * cols = {rows} * {cols}"))?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let f = self.function(&DENSE_CU, "scale_rows")?;
        let (rows_i, cols_i) = (int(OP, "rows", rows)?, int(OP, "cols", cols)?);
        let cfg = row_config(OP, rows, cols)?;
        let mut launch = self.stream().launch_builder(&f);
        launch.arg(x).arg(&rows_i).arg(&cols_i).arg(factors);
        // SAFETY: signature matched; lengths checked.
        unsafe { launch.launch(cfg) }.map_err(driver("launch scale_rows"))?;
        Ok(())
    }

    /// Writes token `t`'s key and value rows (`k`, `v`: `[slots.len(), kv_heads * head_dim]`) into the paged pool at
    /// slot `slots[t]` = `block * block_size + offset`: the key at the block's `[0, offset]`, the value at
    /// `[1, offset]` (blocks `[2, block_size, kv_heads, head_dim]`, the layout [`crate::device::PagedDecode`] reads).
    /// The pool's element type ([`KvElement`]) picks the kernel: f32 keeps the values, bf16 rounds each to nearest
    /// even (bit for bit [`crate::device::f32_to_bf16_bits`]). Slots must be checked `< pool_blocks * block_size` on
    /// the host: the device cannot report a bad one, so the kernel skips it (it never writes outside the pool).
    pub fn kv_write<T: KvElement>(
        &self,
        shape: &KvWrite,
        pool: &mut CudaViewMut<'_, T>,
        k: &CudaView<'_, f32>,
        v: &CudaView<'_, f32>,
        slots: &CudaView<'_, u32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "cuda kv_write";
        let KvWrite { block_size, kv_heads, head_dim, pool_blocks } = *shape;
        if block_size == 0 {
            return Err(KernelError::invalid(OP, "block_size is 0"));
        }
        let row = product(OP, kv_heads, head_dim)?;
        let block_values = product(OP, 2 * block_size, row)?;
        check_len(
            OP,
            "pool",
            pool.len(),
            product(OP, pool_blocks, block_values)?,
            format_args!(
                "pool_blocks * 2 * block_size * kv_heads * head_dim {} values = {pool_blocks} * 2 * {block_size} * {row}",
                T::DTYPE
            ),
        )?;
        let tokens = slots.len();
        let values = product(OP, tokens, row)?;
        check_len(OP, "k", k.len(), values, format_args!("tokens * kv_heads * head_dim = {tokens} * {row}"))?;
        check_len(OP, "v", v.len(), values, format_args!("tokens * kv_heads * head_dim = {tokens} * {row}"))?;
        if values == 0 {
            return Ok(());
        }
        let kernel = match T::DTYPE {
            KvDtype::F32 => "kv_write",
            KvDtype::Bf16 => "kv_write_bf16",
        };
        let f = self.function(&DENSE_CU, kernel)?;
        let (tokens_i, block_size_i, row_i) =
            (int(OP, "tokens", tokens)?, int(OP, "block_size", block_size)?, int(OP, "kv_heads * head_dim", row)?);
        let pool_slots = product(OP, pool_blocks, block_size)? as u64;
        let cfg =
            LaunchConfig { grid_dim: (blocks(OP, tokens)?, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut launch = self.stream().launch_builder(&f);
        launch.arg(pool).arg(k).arg(v).arg(slots).arg(&tokens_i).arg(&block_size_i).arg(&row_i).arg(&pool_slots);
        // SAFETY: signature matched (the pool's element type picks the kernel); lengths checked; slots outside the
        // pool are skipped by the kernel.
        unsafe { launch.launch(cfg) }.map_err(driver("launch kv_write"))?;
        Ok(())
    }

    /// Copies `host` into an existing device buffer of the same length (queued on the stream; `host` may be reused
    /// when this returns).
    pub fn upload_into<T: DeviceRepr>(&self, host: &[T], dst: &mut CudaViewMut<'_, T>) -> Result<(), KernelError> {
        check_len("cuda upload_into", "dst", dst.len(), host.len(), "host.len()")?;
        self.stream().memcpy_htod(host, dst).map_err(driver("host-to-device copy"))
    }

    /// Copies a device view back to the host (waits for the work queued before it).
    pub fn download_view<T: DeviceRepr>(&self, src: &CudaView<'_, T>) -> Result<Vec<T>, KernelError> {
        self.stream().clone_dtoh(src).map_err(driver("device-to-host copy"))
    }

    /// Copies `src` into `dst` (same length) on the device, in stream order.
    pub fn copy_view<T: DeviceRepr>(
        &self,
        src: &CudaView<'_, T>,
        dst: &mut CudaViewMut<'_, T>,
    ) -> Result<(), KernelError> {
        check_len("cuda copy_view", "dst", dst.len(), src.len(), "src.len()")?;
        if src.is_empty() {
            return Ok(());
        }
        self.stream().memcpy_dtod(src, dst).map_err(driver("device-to-device copy"))
    }
}

/// The grid of a grid-stride element-wise kernel over `len` values.
fn elementwise_config(op: &'static str, len: usize) -> Result<LaunchConfig, KernelError> {
    let wanted = len.div_ceil(ROW_THREADS as usize).min(ELEMENTWISE_BLOCKS);
    Ok(LaunchConfig { grid_dim: (blocks(op, wanted)?, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// The grid of a row kernel: one block row per row, column blocks over `cols`.
fn row_config(op: &'static str, rows: usize, cols: usize) -> Result<LaunchConfig, KernelError> {
    let column_blocks = cols.div_ceil(ROW_THREADS as usize).clamp(1, COLUMN_BLOCKS);
    Ok(LaunchConfig {
        grid_dim: (blocks(op, rows)?, column_blocks as u32, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}
