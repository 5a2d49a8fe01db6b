//! Wire encodings of activations and the conversion between [`ExpertBatch`] and the dispatch messages.
//!
//! Everything that arrives from a peer is checked here before it is used: dtype, shape, byte lengths, scales, sizes.
//! Each refusal is a [`TransportError::InvalidPayload`] naming the field (`activations.data`, `expert_ids`, ...).
//! [`round_trip`] gives, without serialising, exactly the values a receiver decodes, so that the in-process transport
//! and the gRPC transport compute on identical numbers.
//!
//! The conversions are vectorised (FP8 through `switchyard_kernels::fp8`, bf16 here, compiled for AVX2 where the CPU
//! has it) and bit for bit their scalar definitions: round to nearest even, FP8 saturating at 448 with per-token
//! scales `amax / 448`, bf16 exactly as `half::bf16::from_f32`.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use switchyard_kernels::fp8::{dequantize_rows, quantize_rows};
use switchyard_proto::v1::{ActivationDtype, Activations, DispatchRequest, DispatchResponse};

use crate::wire::{ActivationsMessage, Chunks, RequestMessage, ResponseMessage};
use crate::{ExpertBatch, TransportError, WireDtype, WireFormat};

/// The largest activation block accepted, in values (`tokens * hidden`): 2^28, i.e. 1 GiB of f32 once decoded. A
/// 4096 x 5120 block is 2^24.4; anything near the limit is a corrupt header, refused before allocating.
pub const MAX_VALUES: usize = 1 << 28;

/// Values per inner loop of the decoders: fixed-size blocks let the compiler unroll and vectorise.
const BLOCK: usize = 64;

/// At most this many values per call into the kernels' FP8 routines, which split larger calls over rayon's threads.
/// The gRPC transport encodes and decodes pieces that are already pipelined with the network and the peer, so handing
/// each to the thread pool costs more (wake-ups, idle threads spinning) than it gains: ~2 ms of CPU per 4096 x 5120
/// round trip on a 2-core machine. (The kernels split at 2^18 values.)
const SERIAL_VALUES: usize = 1 << 17;

/// How a decoder writes its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stores {
    /// Ordinary stores: the values stay in cache for whoever reads them next.
    Cached,
    /// Non-temporal stores where there are (f32 and bf16 on x86-64 with AVX2), bypassing the cache: for blocks much
    /// larger than the cache, written once and read later, this saves reading each line in before overwriting it.
    Streaming,
}

/// Bytes one value takes in `dtype` (scales not counted).
pub fn bytes_per_value(dtype: WireDtype) -> usize {
    match dtype {
        WireDtype::F32 => 4,
        WireDtype::Bf16 => 2,
        WireDtype::Fp8E4m3 => 1,
    }
}

impl From<WireDtype> for ActivationDtype {
    fn from(dtype: WireDtype) -> Self {
        match dtype {
            WireDtype::F32 => ActivationDtype::F32,
            WireDtype::Bf16 => ActivationDtype::Bf16,
            WireDtype::Fp8E4m3 => ActivationDtype::Fp8E4m3,
        }
    }
}

/// The dtype of a proto enum value; `what` names the field in the error.
fn wire_dtype(value: i32, what: &str) -> Result<WireDtype, TransportError> {
    match ActivationDtype::try_from(value) {
        Ok(ActivationDtype::F32) => Ok(WireDtype::F32),
        Ok(ActivationDtype::Bf16) => Ok(WireDtype::Bf16),
        Ok(ActivationDtype::Fp8E4m3) => Ok(WireDtype::Fp8E4m3),
        Ok(ActivationDtype::Unspecified) => Err(invalid(what, "dtype is unspecified".into())),
        Err(_) => Err(invalid(what, format!("unknown dtype {value}"))),
    }
}

fn invalid(what: &str, reason: String) -> TransportError {
    TransportError::InvalidPayload { what: what.to_owned(), reason }
}

/// Encodes `tokens` rows of `hidden` values. FP8 quantises each row with its own scale (`amax / 448`); bf16 rounds to
/// nearest even.
///
/// # Panics
/// If `values.len() != tokens * hidden` or `tokens`/`hidden` exceed `u32`: the caller sizes both from one shape
/// ([`ExpertBatch::check_shape`] checks a batch first).
pub fn encode(values: &[f32], tokens: usize, hidden: usize, dtype: WireDtype) -> Activations {
    assert_eq!(values.len(), tokens * hidden, "encode: values length does not match [{tokens}, {hidden}]");
    let (tokens_u32, hidden_u32) = match (u32::try_from(tokens), u32::try_from(hidden)) {
        (Ok(t), Ok(h)) => (t, h),
        _ => panic!("encode: shape [{tokens}, {hidden}] exceeds u32"),
    };
    let mut data = vec![0u8; values.len() * bytes_per_value(dtype)];
    let mut scales = vec![1.0f32; if dtype == WireDtype::Fp8E4m3 { tokens } else { 0 }];
    encode_values(values, hidden, dtype, &mut data, &mut scales);
    let token_scales = if scales.is_empty() {
        Bytes::new()
    } else {
        let mut scale_bytes = vec![0u8; tokens * 4];
        f32_to_bytes(&scales, &mut scale_bytes);
        Bytes::from(scale_bytes)
    };
    Activations {
        dtype: ActivationDtype::from(dtype) as i32,
        tokens: tokens_u32,
        hidden: hidden_u32,
        data: Bytes::from(data),
        token_scales,
    }
}

/// Encodes rows of `hidden` values into `data` (`values.len() * bytes_per_value(dtype)` bytes); FP8 also writes one
/// scale per row into `scales`, which holds one value per row, each 1 to start with (a row of width 0 keeps it).
pub(crate) fn encode_values(values: &[f32], hidden: usize, dtype: WireDtype, data: &mut [u8], scales: &mut [f32]) {
    match dtype {
        WireDtype::F32 => f32_to_bytes(values, data),
        WireDtype::Bf16 => bf16_to_bytes(values, data),
        WireDtype::Fp8E4m3 if hidden > 0 => {
            let rows = (SERIAL_VALUES / hidden).max(1);
            let values = values.chunks(rows * hidden);
            for ((values, data), scales) in values.zip(data.chunks_mut(rows * hidden)).zip(scales.chunks_mut(rows)) {
                quantize_rows(values, hidden, data, scales);
            }
        }
        WireDtype::Fp8E4m3 => {}
    }
}

/// Buffers kept for reuse by the gRPC transport, so that large payloads are written into memory the process already
/// has. A fresh multi-megabyte allocation comes straight from `mmap` and pays a page fault per 4 KiB on first
/// touch: for a 4096 x 5120 block that costs several times more than encoding it.
pub(crate) struct Recycler<T> {
    free: Mutex<Vec<Vec<T>>>,
}

/// Buffers smaller than this are not kept: the allocator serves them from memory it holds anyway.
const RECYCLE_MIN_BYTES: usize = 64 << 10;
/// At most this many buffers, and this many bytes, are kept; the smallest go first.
const RECYCLE_MAX_BUFFERS: usize = 32;
const RECYCLE_MAX_BYTES: usize = 64 << 20;

impl<T: Copy + Default> Recycler<T> {
    /// An empty recycler.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Recycler { free: Mutex::new(Vec::new()) })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Vec<T>>> {
        // The list is only pushed to and popped from: a panic elsewhere cannot leave it inconsistent.
        self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A buffer of exactly `len` elements whose contents are unspecified (the caller overwrites all of them): the
    /// smallest kept buffer that is large enough, or a new one.
    pub(crate) fn take(&self, len: usize) -> Vec<T> {
        let reused = {
            let mut free = self.lock();
            // Among equals the most recently returned, the likeliest to be in cache; `remove` keeps that order.
            let best = free
                .iter()
                .enumerate()
                .rev()
                .filter(|(_, buffer)| buffer.capacity() >= len)
                .min_by_key(|(_, buffer)| buffer.capacity())
                .map(|(index, _)| index);
            best.map(|index| free.remove(index))
        };
        match reused {
            Some(mut buffer) => {
                // Stale contents are fine: only the (already touched) tail beyond the old length is zeroed.
                if buffer.len() >= len {
                    buffer.truncate(len);
                } else {
                    buffer.resize(len, T::default());
                }
                buffer
            }
            None => vec![T::default(); len],
        }
    }

    /// Keeps `buffer` for a later [`Recycler::take`], unless it is small or the recycler is full.
    pub(crate) fn put(&self, buffer: Vec<T>) {
        let bytes = |b: &Vec<T>| b.capacity() * std::mem::size_of::<T>();
        if bytes(&buffer) < RECYCLE_MIN_BYTES {
            return;
        }
        let mut free = self.lock();
        free.push(buffer);
        while free.len() > RECYCLE_MAX_BUFFERS || free.iter().map(bytes).sum::<usize>() > RECYCLE_MAX_BYTES {
            let smallest = free.iter().enumerate().min_by_key(|(_, b)| b.capacity()).map(|(index, _)| index);
            match smallest {
                Some(index) => drop(free.remove(index)),
                None => break,
            }
        }
    }
}

/// Makes the C allocator keep payload-sized blocks (up to 32 MiB) instead of mapping and unmapping each one; once per
/// process, from the gRPC transport's and server's constructors.
///
/// glibc serves blocks above its mmap threshold (128 KiB at start) with fresh mappings, unmapped again on free, so
/// every HTTP/2 frame buffer and tonic message buffer of a large dispatch is page-faulted in anew. The threshold is
/// dynamic: freeing a mapped block raises it to that block's size, up to 32 MiB, and the trim threshold to twice that
/// (mallopt(3), "M_MMAP_THRESHOLD"); any process moving such buffers gets there sooner or later. Freeing one untouched
/// block of that size gets there at once, for two system calls and no page. Elsewhere it is a harmless allocation.
pub(crate) fn keep_payload_sized_allocations() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        /// glibc's `DEFAULT_MMAP_THRESHOLD_MAX` on 64-bit targets, less room for the block's header.
        const BLOCK: usize = (32 << 20) - (64 << 10);
        // `black_box`: an allocation nobody uses could otherwise be optimised away.
        drop(std::hint::black_box(Vec::<u8>::with_capacity(BLOCK)));
    });
}

/// A payload buffer that goes back to its recycler when `Bytes` drops it.
pub(crate) struct Recycled {
    data: Vec<u8>,
    home: Arc<Recycler<u8>>,
}

impl Recycled {
    /// `data`, to be returned to `home` when dropped.
    pub(crate) fn new(data: Vec<u8>, home: Arc<Recycler<u8>>) -> Self {
        Recycled { data, home }
    }
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        self.home.put(std::mem::take(&mut self.data));
    }
}

/// Decodes a block received from a peer into `tokens * hidden` f32 values, checking everything first.
pub fn decode(activations: &Activations) -> Result<Vec<f32>, TransportError> {
    decode_field(&ActivationsMessage::from(activations), "activations")
}

/// [`decode`] into `out`, which must hold exactly `tokens * hidden` values (checked like the rest): what a receiver
/// that already owns the destination (the attention worker's output block) calls, so no block is allocated.
pub fn decode_into(activations: &Activations, out: &mut [f32]) -> Result<(), TransportError> {
    decode_field_into(&ActivationsMessage::from(activations), "activations", out, Stores::Cached)
}

/// [`decode`] with errors naming `field.data`, `field.tokens`, ...
fn decode_field(activations: &ActivationsMessage, field: &str) -> Result<Vec<f32>, TransportError> {
    // Everything is checked before the block is allocated: a corrupt header must not cost a gigabyte.
    let block = Checked::of(activations, field)?;
    let mut out = vec![0.0f32; block.tokens * block.hidden];
    block.convert(&activations.data, &mut out, Stores::Cached);
    Ok(out)
}

/// [`decode_into`] with errors naming `field.*`.
fn decode_field_into(
    activations: &ActivationsMessage,
    field: &str,
    out: &mut [f32],
    stores: Stores,
) -> Result<(), TransportError> {
    let block = Checked::of(activations, field)?;
    let values = block.tokens * block.hidden;
    if out.len() != values {
        return Err(invalid(
            &format!("{field}.tokens"),
            format!("[{}, {}] is {values} values, but {} were expected", block.tokens, block.hidden, out.len()),
        ));
    }
    block.convert(&activations.data, out, stores);
    Ok(())
}

/// A received block whose header, byte lengths and scales have been checked.
struct Checked {
    dtype: WireDtype,
    tokens: usize,
    hidden: usize,
    /// The per-token scales (FP8 only), all finite and non-negative.
    scales: Vec<f32>,
}

impl Checked {
    fn of(activations: &ActivationsMessage, field: &str) -> Result<Checked, TransportError> {
        let dtype = wire_dtype(activations.dtype, &format!("{field}.dtype"))?;
        let tokens = activations.tokens as usize;
        let hidden = activations.hidden as usize;
        let values = (activations.tokens as u64) * (activations.hidden as u64);
        if values > MAX_VALUES as u64 {
            return Err(invalid(
                &format!("{field}.tokens"),
                format!("[{tokens}, {hidden}] is {values} values, more than the limit {MAX_VALUES}"),
            ));
        }
        if hidden == 0 {
            return Err(invalid(&format!("{field}.hidden"), "must be positive".into()));
        }
        let values = values as usize;
        let expected = values * bytes_per_value(dtype);
        if activations.data.len() != expected {
            return Err(invalid(
                &format!("{field}.data"),
                format!("{} bytes, but [{tokens}, {hidden}] {dtype} needs {expected}", activations.data.len()),
            ));
        }
        let scale_bytes = &activations.token_scales;
        let what = format!("{field}.token_scales");
        if dtype != WireDtype::Fp8E4m3 {
            if !scale_bytes.is_empty() {
                return Err(invalid(&what, format!("{} bytes, but {dtype} carries no scales", scale_bytes.len())));
            }
            return Ok(Checked { dtype, tokens, hidden, scales: Vec::new() });
        }
        if scale_bytes.len() != tokens * 4 {
            return Err(invalid(
                &what,
                format!("{} bytes, but {tokens} tokens need {} (one f32 each)", scale_bytes.len(), tokens * 4),
            ));
        }
        let mut scales = vec![0.0f32; tokens];
        scale_bytes.for_each_run(4, |first, bytes| f32_from_bytes(bytes, &mut scales[first..first + bytes.len() / 4]));
        if let Some((row, scale)) = scales.iter().enumerate().find(|(_, scale)| !scale.is_finite() || **scale < 0.0) {
            return Err(invalid(&what, format!("scale of token {row} is {scale}")));
        }
        Ok(Checked { dtype, tokens, hidden, scales })
    }

    /// Decodes the checked block's `data` into `out` (`tokens * hidden` values), piece by piece where it arrived.
    fn convert(&self, data: &Chunks, out: &mut [f32], stores: Stores) {
        match self.dtype {
            WireDtype::F32 => data.for_each_run(4, |first, bytes| {
                f32_from_bytes_with(bytes, &mut out[first..first + bytes.len() / 4], stores)
            }),
            WireDtype::Bf16 => data.for_each_run(2, |first, bytes| {
                bf16_from_bytes_with(bytes, &mut out[first..first + bytes.len() / 2], stores)
            }),
            WireDtype::Fp8E4m3 => data.for_each_run(1, |first, codes| self.dequantize(first, codes, out)),
        }
    }

    /// Decodes the FP8 `codes` of values `first..first + codes.len()`: whole rows together, a row cut by a piece
    /// boundary in parts (each value is its code times its row's scale, so the parts decode as the row would).
    fn dequantize(&self, first: usize, mut codes: &[u8], out: &mut [f32]) {
        let hidden = self.hidden;
        let mut at = first;
        while !codes.is_empty() {
            let (row, column) = (at / hidden, at % hidden);
            let (n, width, rows) = if column == 0 && codes.len() >= hidden {
                let rows = codes.len() / hidden;
                (rows * hidden, hidden, rows)
            } else {
                let n = (hidden - column).min(codes.len());
                (n, n, 1)
            };
            let per_call = (SERIAL_VALUES / width).max(1) * width;
            let scales = self.scales[row..row + rows].chunks((per_call / width).max(1));
            for ((codes, out), scales) in
                codes[..n].chunks(per_call).zip(out[at..at + n].chunks_mut(per_call)).zip(scales)
            {
                dequantize_rows(codes, width, scales, out);
            }
            at += n;
            codes = &codes[n..];
        }
    }
}

/// Writes the little-endian bytes of `values` to `out` (`4 * values.len()` bytes).
fn f32_to_bytes(values: &[f32], out: &mut [u8]) {
    for (bytes, value) in out.chunks_exact_mut(4).zip(values) {
        bytes.copy_from_slice(&value.to_le_bytes());
    }
}

/// `out[i]` from the little-endian bytes `data[4 i..4 i + 4]`.
fn f32_from_bytes(data: &[u8], out: &mut [f32]) {
    let (blocks, tail) = data.split_at(data.len() / (4 * BLOCK) * (4 * BLOCK));
    let (out_blocks, out_tail) = out.split_at_mut(blocks.len() / 4);
    for (o, b) in out_blocks.chunks_exact_mut(BLOCK).zip(blocks.chunks_exact(4 * BLOCK)) {
        for (value, bytes) in o.iter_mut().zip(b.chunks_exact(4)) {
            *value = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
    }
    for (value, bytes) in out_tail.iter_mut().zip(tail.chunks_exact(4)) {
        *value = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
}

/// bf16 bits of `value`, exactly `half::bf16::from_f32`: round to nearest even (the carry out of the low half lands
/// in the exponent as it should, up to infinity), NaN kept as a quiet NaN with its sign and top mantissa bits.
/// Branch-free so that the loops over it vectorise.
#[inline(always)]
fn bf16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    // Wrapping: for NaN (not selected) the sum may overflow; for every other value it cannot.
    let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((bits >> 16) | 0x0040) as u16;
    if bits & 0x7FFF_FFFF > 0x7F80_0000 {
        quiet_nan
    } else {
        rounded
    }
}

/// Writes the little-endian bf16 bytes of `values` to `out` (`2 * values.len()` bytes).
fn bf16_to_bytes(values: &[f32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, the only precondition.
        return unsafe { bf16_to_bytes_avx2(values, out) };
    }
    bf16_to_bytes_portable(values, out)
}

/// [`bf16_bits`] sixteen values at a time in AVX2 (written out: the compiler's vectorisation of the portable loop is
/// ~1.6 times slower, and this runs on every combine payload), the ragged end by the portable loop.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bf16_to_bytes_avx2(values: &[f32], out: &mut [u8]) {
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi32, _mm256_and_si256, _mm256_blendv_epi8, _mm256_cmpgt_epi32, _mm256_loadu_si256,
        _mm256_or_si256, _mm256_packus_epi32, _mm256_permute4x64_epi64, _mm256_set1_epi32, _mm256_srli_epi32,
        _mm256_storeu_si256,
    };
    let n = values.len().min(out.len() / 2);
    let whole = n / 16 * 16;
    let one = _mm256_set1_epi32(1);
    let bias = _mm256_set1_epi32(0x7FFF);
    let magnitude = _mm256_set1_epi32(0x7FFF_FFFF);
    let infinity = _mm256_set1_epi32(0x7F80_0000);
    let quiet = _mm256_set1_epi32(0x0040_0000);
    let mut i = 0;
    // SAFETY: loads read 16 values below `whole <= values.len()`; stores write 32 bytes below `2 * whole <= out.len()`.
    unsafe {
        while i < whole {
            let mut halves = [one; 2];
            for (j, half) in halves.iter_mut().enumerate() {
                let bits = _mm256_loadu_si256(values.as_ptr().add(i + 8 * j) as *const __m256i);
                // As `bf16_bits`: round to nearest even, NaN quieted; the result is in the high 16 bits.
                let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), one);
                let rounded = _mm256_add_epi32(bits, _mm256_add_epi32(bias, lsb));
                let nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, magnitude), infinity);
                let chosen = _mm256_blendv_epi8(rounded, _mm256_or_si256(bits, quiet), nan);
                *half = _mm256_srli_epi32::<16>(chosen);
            }
            // The pack interleaves 128-bit lanes (a0 b0 a1 b1); the permutation puts them back in order.
            let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(halves[0], halves[1]));
            _mm256_storeu_si256(out.as_mut_ptr().add(2 * i) as *mut __m256i, packed);
            i += 16;
        }
    }
    bf16_to_bytes_portable(&values[whole..n], &mut out[2 * whole..2 * n]);
}

#[inline(always)]
fn bf16_to_bytes_portable(values: &[f32], out: &mut [u8]) {
    let (blocks, tail) = values.split_at(values.len() / BLOCK * BLOCK);
    let (out_blocks, out_tail) = out.split_at_mut(blocks.len() * 2);
    for (d, v) in out_blocks.chunks_exact_mut(2 * BLOCK).zip(blocks.chunks_exact(BLOCK)) {
        for (bytes, &value) in d.chunks_exact_mut(2).zip(v) {
            bytes.copy_from_slice(&bf16_bits(value).to_le_bytes());
        }
    }
    for (bytes, &value) in out_tail.chunks_exact_mut(2).zip(tail) {
        bytes.copy_from_slice(&bf16_bits(value).to_le_bytes());
    }
}

/// `out[i]` from the little-endian bf16 bytes `data[2 i..2 i + 2]`: bf16 is the top half of an f32, so widening is
/// a shift, exactly what `bf16::to_f32` does for every value it produces.
fn bf16_from_bytes(data: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, the only precondition.
        return unsafe { bf16_from_bytes_avx2(data, out) };
    }
    bf16_from_bytes_portable(data, out)
}

/// [`bf16_from_bytes`] or its non-temporal twin.
fn bf16_from_bytes_with(data: &[u8], out: &mut [f32], stores: Stores) {
    #[cfg(target_arch = "x86_64")]
    if stores == Stores::Streaming && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, the only precondition.
        return unsafe { streaming_avx2::<2>(data, out) };
    }
    bf16_from_bytes(data, out)
}

/// [`f32_from_bytes`] or its non-temporal twin.
fn f32_from_bytes_with(data: &[u8], out: &mut [f32], stores: Stores) {
    #[cfg(target_arch = "x86_64")]
    if stores == Stores::Streaming && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, the only precondition.
        return unsafe { streaming_avx2::<4>(data, out) };
    }
    f32_from_bytes(data, out)
}

/// Decodes little-endian bf16 (`WIDTH` 2) or f32 (`WIDTH` 4) values from `data` into `out` with non-temporal stores:
/// bit for bit the cached loops, which it uses for the ends that are not whole aligned 32-byte lines' worth.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn streaming_avx2<const WIDTH: usize>(data: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::{
        __m128i, __m256i, _mm256_cvtepu16_epi32, _mm256_loadu_si256, _mm256_slli_epi32, _mm256_stream_si256,
        _mm_loadu_si128, _mm_sfence,
    };
    let cached = |data: &[u8], out: &mut [f32]| {
        if WIDTH == 2 {
            bf16_from_bytes_portable(data, out)
        } else {
            f32_from_bytes(data, out)
        }
    };
    let n = out.len().min(data.len() / WIDTH);
    // Streaming stores need 32-byte aligned addresses.
    let head = out.as_ptr().align_offset(32).min(n);
    let body = (n - head) / 8 * 8;
    cached(&data[..head * WIDTH], &mut out[..head]);
    let (source, destination) = (data[head * WIDTH..].as_ptr(), out[head..].as_mut_ptr());
    // SAFETY: loads read `8 * WIDTH` bytes at offsets below `body * WIDTH` of a slice that holds more than
    // `(n - head) * WIDTH` bytes; stores write 8 values at 32-byte aligned offsets below `body` of `out[head..]`.
    unsafe {
        let mut i = 0;
        while i < body {
            let values = if WIDTH == 2 {
                let halves = _mm_loadu_si128(source.add(i * 2) as *const __m128i);
                _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(halves))
            } else {
                _mm256_loadu_si256(source.add(i * 4) as *const __m256i)
            };
            _mm256_stream_si256(destination.add(i) as *mut __m256i, values);
            i += 8;
        }
        // Orders the streaming stores before whatever this thread does next (handing the block to another thread).
        _mm_sfence();
    }
    cached(&data[(head + body) * WIDTH..n * WIDTH], &mut out[head + body..n]);
}

/// [`bf16_from_bytes_portable`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bf16_from_bytes_avx2(data: &[u8], out: &mut [f32]) {
    bf16_from_bytes_portable(data, out)
}

#[inline(always)]
fn bf16_from_bytes_portable(data: &[u8], out: &mut [f32]) {
    let (blocks, tail) = data.split_at(data.len() / (2 * BLOCK) * (2 * BLOCK));
    let (out_blocks, out_tail) = out.split_at_mut(blocks.len() / 2);
    for (o, b) in out_blocks.chunks_exact_mut(BLOCK).zip(blocks.chunks_exact(2 * BLOCK)) {
        for (value, bytes) in o.iter_mut().zip(b.chunks_exact(2)) {
            *value = f32::from_bits((u16::from_le_bytes([bytes[0], bytes[1]]) as u32) << 16);
        }
    }
    for (value, bytes) in out_tail.iter_mut().zip(tail.chunks_exact(2)) {
        *value = f32::from_bits((u16::from_le_bytes([bytes[0], bytes[1]]) as u32) << 16);
    }
}

/// The values a receiver decodes after `values` (rows of `hidden`) travel as `dtype`: bit for bit what
/// `decode(&encode(values, ..))` returns, without building the bytes.
///
/// # Panics
/// If `hidden` is 0 while `values` is not empty, or `values.len()` is not a multiple of `hidden`.
pub fn round_trip(values: &[f32], hidden: usize, dtype: WireDtype) -> Vec<f32> {
    assert!(
        (hidden == 0 && values.is_empty()) || (hidden > 0 && values.len() % hidden == 0),
        "round_trip: {} values are not rows of {hidden}",
        values.len()
    );
    match dtype {
        WireDtype::F32 => values.to_vec(),
        WireDtype::Bf16 => values.iter().map(|&v| f32::from_bits((bf16_bits(v) as u32) << 16)).collect(),
        WireDtype::Fp8E4m3 => {
            if values.is_empty() {
                return Vec::new();
            }
            let tokens = values.len() / hidden;
            let mut codes = vec![0u8; values.len()];
            let mut scales = vec![1.0f32; tokens];
            quantize_rows(values, hidden, &mut codes, &mut scales);
            let mut out = vec![0.0f32; values.len()];
            dequantize_rows(&codes, hidden, &scales, &mut out);
            out
        }
    }
}

/// Builds the request that carries `batch`, with inputs encoded as `wire.dispatch` and outputs asked for as
/// `wire.combine`. (The gRPC transport writes the same bytes without building the message.)
///
/// # Panics
/// If the batch is inconsistent (see [`ExpertBatch::check_shape`], which transports call first).
pub fn request_from_batch(request_id: u64, batch: &ExpertBatch, wire: WireFormat) -> DispatchRequest {
    let mut expert_ids = vec![0u8; batch.experts.len() * 4];
    for (bytes, expert) in expert_ids.chunks_exact_mut(4).zip(&batch.experts) {
        bytes.copy_from_slice(&expert.to_le_bytes());
    }
    DispatchRequest {
        request_id,
        step_id: batch.step_id,
        micro_batch: batch.micro_batch,
        layer: batch.layer,
        placement_epoch: batch.placement_epoch,
        attention_worker: batch.attention_worker.clone(),
        expert_ids: Bytes::from(expert_ids),
        activations: Some(encode(&batch.inputs, batch.experts.len(), batch.hidden, wire.dispatch)),
        output_dtype: ActivationDtype::from(wire.combine) as i32,
    }
}

/// Decodes and checks a received request (shape, dtypes, `expert_ids` length). Whether its layer, experts and epoch
/// are served is the [`crate::ExpertService::validate`]'s call.
pub fn batch_from_request(request: &DispatchRequest) -> Result<ExpertBatch, TransportError> {
    batch_from_message(&RequestMessage::from(request), None)
}

/// [`batch_from_request`] for a request as the gRPC server reads it, decoding into a buffer from `recycler` if there
/// is one.
pub(crate) fn batch_from_message(
    request: &RequestMessage,
    recycler: Option<&Recycler<f32>>,
) -> Result<ExpertBatch, TransportError> {
    let activations = request.activations.as_ref().ok_or_else(|| invalid("activations", "missing".into()))?;
    // Checked before decoding: it is cheap and names the field even when the activations are also wrong.
    output_dtype_of(request.output_dtype)?;
    let tokens = activations.tokens as usize;
    if request.expert_ids.len() != tokens.saturating_mul(4) {
        return Err(invalid(
            "expert_ids",
            format!("{} bytes, but {tokens} tokens need {} (one u32 each)", request.expert_ids.len(), tokens * 4),
        ));
    }
    let block = Checked::of(activations, "activations")?;
    let values = block.tokens * block.hidden;
    let mut inputs = match recycler {
        Some(recycler) => recycler.take(values),
        None => vec![0.0f32; values],
    };
    // Cached: the expert computes on the block next.
    block.convert(&activations.data, &mut inputs, Stores::Cached);
    let mut experts = Vec::with_capacity(tokens);
    request.expert_ids.for_each_run(4, |_, bytes| {
        experts.extend(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
    });
    Ok(ExpertBatch {
        step_id: request.step_id,
        micro_batch: request.micro_batch,
        layer: request.layer,
        placement_epoch: request.placement_epoch,
        attention_worker: request.attention_worker.clone(),
        experts,
        inputs,
        hidden: activations.hidden as usize,
    })
}

/// The encoding a request wants its outputs in (`UNSPECIFIED` means F32).
pub fn output_dtype(request: &DispatchRequest) -> Result<WireDtype, TransportError> {
    output_dtype_of(request.output_dtype)
}

/// [`output_dtype`] of the field's value.
pub(crate) fn output_dtype_of(value: i32) -> Result<WireDtype, TransportError> {
    if value == ActivationDtype::Unspecified as i32 {
        return Ok(WireDtype::F32);
    }
    wire_dtype(value, "output_dtype")
}

/// What a response echoes of its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestIds {
    /// Matches the response to its request.
    pub request_id: u64,
    /// The sender's step counter.
    pub step_id: u64,
    /// Micro-batch index.
    pub micro_batch: u32,
    /// Decoder layer.
    pub layer: u32,
}

impl RequestIds {
    /// The ids of `request`.
    pub fn of(request: &DispatchRequest) -> Self {
        RequestIds {
            request_id: request.request_id,
            step_id: request.step_id,
            micro_batch: request.micro_batch,
            layer: request.layer,
        }
    }
}

/// Builds the response carrying `outputs` (`tokens` rows of `hidden`) encoded as `dtype`. (The gRPC server writes the
/// same bytes without building the message.)
///
/// # Panics
/// If `outputs.len() != tokens * hidden` (the server checks a service's outputs first).
pub fn response_from_outputs(
    ids: RequestIds,
    outputs: &[f32],
    tokens: usize,
    hidden: usize,
    dtype: WireDtype,
) -> DispatchResponse {
    DispatchResponse {
        request_id: ids.request_id,
        step_id: ids.step_id,
        micro_batch: ids.micro_batch,
        layer: ids.layer,
        outputs: Some(encode(outputs, tokens, hidden, dtype)),
    }
}

/// Decodes a received response, checking that it is the `[tokens, hidden]` block that was asked for.
pub fn outputs_from_response(
    response: &DispatchResponse,
    tokens: usize,
    hidden: usize,
) -> Result<Vec<f32>, TransportError> {
    let response = ResponseMessage::from(response);
    let outputs = checked_outputs(&response, tokens, hidden)?;
    decode_field(outputs, "outputs")
}

/// [`outputs_from_response`] into `out`, which holds `tokens * hidden` values: the attention worker decodes each
/// answer straight into its output block.
pub fn outputs_from_response_into(
    response: &DispatchResponse,
    tokens: usize,
    hidden: usize,
    out: &mut [f32],
) -> Result<(), TransportError> {
    outputs_from_message_into(&ResponseMessage::from(response), tokens, hidden, out, Stores::Cached)
}

/// [`outputs_from_response_into`] for a response as the gRPC client reads it, writing as `stores` says.
pub(crate) fn outputs_from_message_into(
    response: &ResponseMessage,
    tokens: usize,
    hidden: usize,
    out: &mut [f32],
    stores: Stores,
) -> Result<(), TransportError> {
    let outputs = checked_outputs(response, tokens, hidden)?;
    decode_field_into(outputs, "outputs", out, stores)
}

/// The outputs of `response`, if they have the shape that was asked for.
fn checked_outputs(
    response: &ResponseMessage,
    tokens: usize,
    hidden: usize,
) -> Result<&ActivationsMessage, TransportError> {
    let outputs = response.outputs.as_ref().ok_or_else(|| invalid("outputs", "missing".into()))?;
    if outputs.tokens as usize != tokens || outputs.hidden as usize != hidden {
        return Err(invalid(
            "outputs.tokens",
            format!("shape [{}, {}], but the request had [{tokens}, {hidden}]", outputs.tokens, outputs.hidden),
        ));
    }
    Ok(outputs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use switchyard_kernels::fp8::fake_quantize_rows;

    /// Deterministic values over several orders of magnitude, with an awkward row width.
    pub(crate) fn values(tokens: usize, hidden: usize) -> Vec<f32> {
        let mut state = 0x9E37_79B9u32;
        (0..tokens * hidden)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let unit = (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                unit * 10f32.powi((i % 7) as i32 - 3)
            })
            .collect()
    }

    fn batch(tokens: usize, hidden: usize) -> ExpertBatch {
        ExpertBatch {
            step_id: 7,
            micro_batch: 1,
            layer: 3,
            placement_epoch: 2,
            attention_worker: "attn-0".into(),
            experts: (0..tokens as u32).map(|t| t % 5).collect(),
            inputs: values(tokens, hidden),
            hidden,
        }
    }

    /// The field an `InvalidPayload` error names.
    pub(crate) fn field_of(error: TransportError) -> String {
        match error {
            TransportError::InvalidPayload { what, .. } => what,
            other => panic!("expected InvalidPayload, got {other:?}"),
        }
    }

    #[test]
    fn f32_round_trips_exactly() {
        let x = values(5, 131);
        let decoded = decode(&encode(&x, 5, 131, WireDtype::F32)).unwrap();
        assert_eq!(
            decoded.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            x.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(round_trip(&x, 131, WireDtype::F32), decoded);
    }

    #[test]
    fn bf16_is_within_half_an_ulp() {
        let x = values(4, 77);
        let activations = encode(&x, 4, 77, WireDtype::Bf16);
        assert_eq!(activations.data.len(), x.len() * 2);
        let decoded = decode(&activations).unwrap();
        for (a, b) in x.iter().zip(&decoded) {
            // bf16 keeps 8 significant bits: half an ulp is at most 2^-8 of the value.
            assert!((a - b).abs() <= a.abs() * (1.0 / 256.0), "{a} -> {b}");
        }
        assert_eq!(round_trip(&x, 77, WireDtype::Bf16), decoded);
    }

    #[test]
    fn fp8_round_trip_is_fake_quantisation() {
        let x = values(6, 100);
        let activations = encode(&x, 6, 100, WireDtype::Fp8E4m3);
        assert_eq!(activations.data.len(), 600);
        assert_eq!(activations.token_scales.len(), 24);
        let decoded = decode(&activations).unwrap();
        let mut expected = x.clone();
        fake_quantize_rows(&mut expected, 100);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&decoded), bits(&expected));
        assert_eq!(bits(&round_trip(&x, 100, WireDtype::Fp8E4m3)), bits(&decoded));
    }

    #[test]
    fn zero_rows_and_empty_blocks() {
        let x = vec![0.0f32; 8];
        assert_eq!(decode(&encode(&x, 2, 4, WireDtype::Fp8E4m3)).unwrap(), x);
        for dtype in [WireDtype::F32, WireDtype::Bf16, WireDtype::Fp8E4m3] {
            assert!(decode(&encode(&[], 0, 16, dtype)).unwrap().is_empty());
            assert!(round_trip(&[], 16, dtype).is_empty());
        }
    }

    #[test]
    fn requests_and_responses_round_trip() {
        let b = batch(9, 33);
        let wire = WireFormat { dispatch: WireDtype::Fp8E4m3, combine: WireDtype::Bf16 };
        let request = request_from_batch(41, &b, wire);
        assert_eq!(request.expert_ids.len(), 36);
        let back = batch_from_request(&request).unwrap();
        assert_eq!(back.experts, b.experts);
        assert_eq!(back.inputs, round_trip(&b.inputs, 33, WireDtype::Fp8E4m3));
        assert_eq!((back.step_id, back.micro_batch, back.layer, back.placement_epoch), (7, 1, 3, 2));
        assert_eq!(back.attention_worker, "attn-0");
        assert_eq!(output_dtype(&request).unwrap(), WireDtype::Bf16);

        let response = response_from_outputs(RequestIds::of(&request), &b.inputs, 9, 33, WireDtype::Bf16);
        assert_eq!(response.request_id, 41);
        assert_eq!(outputs_from_response(&response, 9, 33).unwrap(), round_trip(&b.inputs, 33, WireDtype::Bf16));
        assert_eq!(field_of(outputs_from_response(&response, 8, 33).unwrap_err()), "outputs.tokens");
        let empty = DispatchResponse { outputs: None, ..response };
        assert_eq!(field_of(outputs_from_response(&empty, 9, 33).unwrap_err()), "outputs");
    }

    #[test]
    fn malformed_payloads_name_the_field() {
        let good =
            request_from_batch(1, &batch(4, 16), WireFormat { dispatch: WireDtype::Fp8E4m3, combine: WireDtype::F32 });
        let broken = |edit: &dyn Fn(&mut DispatchRequest)| {
            let mut request = good.clone();
            edit(&mut request);
            field_of(batch_from_request(&request).unwrap_err())
        };
        fn activations(edit: impl Fn(&mut Activations)) -> impl Fn(&mut DispatchRequest) {
            move |r: &mut DispatchRequest| edit(r.activations.as_mut().unwrap())
        }
        assert_eq!(broken(&|r| r.activations = None), "activations");
        assert_eq!(broken(&|r| r.expert_ids = r.expert_ids.slice(..12)), "expert_ids");
        assert_eq!(broken(&|r| r.output_dtype = 99), "output_dtype");
        assert_eq!(broken(&activations(|a: &mut Activations| a.dtype = 0)), "activations.dtype");
        assert_eq!(broken(&activations(|a: &mut Activations| a.dtype = 42)), "activations.dtype");
        assert_eq!(broken(&activations(|a: &mut Activations| a.data = a.data.slice(1..))), "activations.data");
        assert_eq!(broken(&activations(|a: &mut Activations| a.hidden = 15)), "activations.data");
        assert_eq!(broken(&activations(|a: &mut Activations| a.hidden = 0)), "activations.hidden");
        assert_eq!(
            broken(&activations(|a: &mut Activations| a.token_scales = Bytes::new())),
            "activations.token_scales"
        );
        assert_eq!(
            broken(&activations(|a: &mut Activations| a.token_scales = a.token_scales.slice(4..))),
            "activations.token_scales"
        );
        let nan_scale = |a: &mut Activations| {
            let mut scales = a.token_scales.to_vec();
            scales[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
            a.token_scales = Bytes::from(scales);
        };
        assert_eq!(broken(&activations(nan_scale)), "activations.token_scales");
        let infinite_scale = |a: &mut Activations| {
            let mut scales = a.token_scales.to_vec();
            scales[0..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
            a.token_scales = Bytes::from(scales);
        };
        assert_eq!(broken(&activations(infinite_scale)), "activations.token_scales");
        // A header claiming u32::MAX x u32::MAX values is refused before any allocation.
        let absurd = |r: &mut DispatchRequest| {
            let a = r.activations.as_mut().unwrap();
            a.tokens = u32::MAX;
            a.hidden = u32::MAX;
            r.expert_ids = Bytes::from(vec![0u8; 0]);
        };
        assert!(matches!(
            batch_from_request(&{
                let mut r = good.clone();
                absurd(&mut r);
                r
            }),
            Err(TransportError::InvalidPayload { .. })
        ));
        let absurd_decode = Activations { tokens: u32::MAX, hidden: u32::MAX, ..good.activations.clone().unwrap() };
        assert_eq!(field_of(decode(&absurd_decode).unwrap_err()), "activations.tokens");
        // f32 and bf16 carry no scales.
        let f32_with_scales =
            Activations { token_scales: Bytes::from_static(&[0; 16]), ..encode(&[0.0; 64], 4, 16, WireDtype::F32) };
        assert_eq!(field_of(decode(&f32_with_scales).unwrap_err()), "activations.token_scales");
    }

    #[test]
    fn bf16_encoding_is_half_bit_for_bit() {
        let mut special = vec![
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-45,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0xFFBF_FFFF),
            f32::from_bits(0x7FFF_FFFF),
        ];
        // Ties (low half exactly 0x8000) with an even and an odd kept half, and their neighbours.
        for high in [0x3F80u32, 0x3F81, 0x7F7F, 0x0000, 0x0001, 0xBF80, 0xFF7F] {
            for low in [0x7FFFu32, 0x8000, 0x8001, 0xFFFF] {
                special.push(f32::from_bits((high << 16) | low));
            }
        }
        let mut state = 0x1234_5678u32;
        special.extend((0..100_000).map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            f32::from_bits(state)
        }));
        let activations = encode(&special, 1, special.len(), WireDtype::Bf16);
        for (value, bytes) in special.iter().zip(activations.data.chunks_exact(2)) {
            let want = half::bf16::from_f32(*value).to_bits();
            assert_eq!(u16::from_le_bytes([bytes[0], bytes[1]]), want, "{value:e} ({:#010x})", value.to_bits());
        }
        // Both loops, whichever the CPU runs.
        let mut portable = vec![0u8; special.len() * 2];
        bf16_to_bytes_portable(&special, &mut portable);
        assert_eq!(portable, activations.data);
        let mut widened = vec![0.0f32; special.len()];
        bf16_from_bytes_portable(&portable, &mut widened);
        let decoded = decode(&activations).unwrap();
        assert_eq!(
            widened.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            decoded.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let by_half: Vec<u32> = special.iter().map(|&v| half::bf16::from_f32(v).to_f32().to_bits()).collect();
        assert_eq!(decoded.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), by_half);
        let round = round_trip(&special, special.len(), WireDtype::Bf16);
        assert_eq!(round.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), by_half);
    }

    #[test]
    fn decoding_into_a_block_equals_decoding() {
        for dtype in [WireDtype::F32, WireDtype::Bf16, WireDtype::Fp8E4m3] {
            let x = values(7, 96);
            let activations = encode(&x, 7, 96, dtype);
            let mut out = vec![f32::NAN; 7 * 96];
            decode_into(&activations, &mut out).unwrap();
            assert_eq!(out, decode(&activations).unwrap(), "{dtype}");
            let mut short = vec![0.0f32; 7 * 96 - 1];
            assert_eq!(field_of(decode_into(&activations, &mut short).unwrap_err()), "activations.tokens");
            let broken = Activations { data: activations.data.slice(1..), ..activations.clone() };
            assert_eq!(field_of(decode_into(&broken, &mut out).unwrap_err()), "activations.data");
        }
        let b = batch(5, 40);
        let request = request_from_batch(3, &b, WireFormat { dispatch: WireDtype::Bf16, combine: WireDtype::Bf16 });
        let response = response_from_outputs(RequestIds::of(&request), &b.inputs, 5, 40, WireDtype::Bf16);
        let mut out = vec![0.0f32; 5 * 40];
        outputs_from_response_into(&response, 5, 40, &mut out).unwrap();
        assert_eq!(out, outputs_from_response(&response, 5, 40).unwrap());
        assert_eq!(field_of(outputs_from_response_into(&response, 4, 40, &mut out).unwrap_err()), "outputs.tokens");
    }

    /// The one message of a gRPC frame, read back as the server reads it.
    fn read_back(frame: Bytes) -> RequestMessage {
        let mut reader = crate::wire::MessageReader::new(usize::MAX);
        reader.push(frame);
        crate::wire::read_request(&reader.next_message().unwrap().unwrap()).unwrap()
    }

    #[test]
    fn streaming_stores_decode_the_same_bits() {
        let x = values(3, 1000);
        for dtype in [WireDtype::F32, WireDtype::Bf16] {
            let activations = ActivationsMessage::from(&encode(&x, 3, 1000, dtype));
            let block = Checked::of(&activations, "activations").unwrap();
            let mut cached = vec![0.0f32; 3000];
            block.convert(&activations.data, &mut cached, Stores::Cached);
            // Every alignment of the destination, and lengths that leave ragged ends.
            for offset in 0..9 {
                for len in [0, 1, 7, 8, 17, 64, 2999 - offset] {
                    let mut out = vec![f32::NAN; offset + len + 3];
                    let bytes = &activations.data.to_bytes()[offset * bytes_per_value(dtype)..];
                    let run = &bytes[..len * bytes_per_value(dtype)];
                    match dtype {
                        WireDtype::F32 => f32_from_bytes_with(run, &mut out[offset..offset + len], Stores::Streaming),
                        _ => bf16_from_bytes_with(run, &mut out[offset..offset + len], Stores::Streaming),
                    }
                    let got: Vec<u32> = out[offset..offset + len].iter().map(|v| v.to_bits()).collect();
                    let want: Vec<u32> = cached[offset..offset + len].iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{dtype}, offset {offset}, {len} values");
                    assert!(out[..offset].iter().chain(&out[offset + len..]).all(|v| v.is_nan()), "wrote outside");
                }
            }
        }
    }

    #[test]
    fn requests_for_rows_carry_those_rows_only() {
        let b = batch(10, 24);
        let wire = WireFormat { dispatch: WireDtype::Fp8E4m3, combine: WireDtype::F32 };
        let whole = batch_from_request(&request_from_batch(1, &b, wire)).unwrap();
        let recycler = Recycler::new();
        let part =
            crate::wire::encode_request(2, &b, &b.experts[3..7], &b.inputs[3 * 24..7 * 24], wire, Some(&recycler));
        let part = batch_from_message(&read_back(part), Some(&Recycler::new())).unwrap();
        assert_eq!(part.experts, &b.experts[3..7]);
        // FP8 scales are per row, so a row encodes the same alone or in its batch.
        assert_eq!(part.inputs, &whole.inputs[3 * 24..7 * 24]);
        assert_eq!((part.step_id, part.layer, part.hidden), (b.step_id, b.layer, 24));
    }

    #[test]
    fn recycled_buffers_come_back_and_stay_bounded() {
        use crate::wire::encode_response;
        let recycler: Arc<Recycler<u8>> = Recycler::new();
        let x = values(64, 2048);
        let ids = RequestIds::default();
        let plain = encode_response(ids, &x, 64, 2048, WireDtype::Bf16, None);
        let recycled = encode_response(ids, &x, 64, 2048, WireDtype::Bf16, Some(&recycler));
        assert_eq!(plain, recycled);
        let address = recycled.as_ptr();
        assert_eq!(recycler.lock().len(), 0);
        drop(recycled);
        assert_eq!(recycler.lock().len(), 1, "dropping the message returns its buffer");
        let again = encode_response(ids, &x, 64, 2048, WireDtype::Fp8E4m3, Some(&recycler));
        assert_eq!(again.as_ptr(), address, "a smaller message reuses the buffer");
        assert_eq!(again, encode_response(ids, &x, 64, 2048, WireDtype::Fp8E4m3, None));
        drop(again);
        // Small buffers are not kept; large ones up to the bounds.
        recycler.put(vec![0u8; 100]);
        for _ in 0..RECYCLE_MAX_BUFFERS + 5 {
            recycler.put(vec![0u8; RECYCLE_MIN_BYTES]);
        }
        let free = recycler.lock();
        assert_eq!(free.len(), RECYCLE_MAX_BUFFERS);
        assert!(free.iter().any(|b| b.capacity() >= 64 * 2048 * 2), "the smallest go first");
        drop(free);
        let blocks: Recycler<f32> = Recycler { free: Mutex::new(vec![vec![1.0; 50_000]]) };
        assert_eq!(blocks.take(10).len(), 10);
        assert_eq!(blocks.take(60_000).len(), 60_000);
    }
}
