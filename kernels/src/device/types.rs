//! Plain argument types of the device API, compiled in every build: callers (the model's GPU forward pass) build
//! them with or without the `cuda` feature, so they cannot live in the cuda-only backend. Also the host side of the
//! bf16 codec dense weights are stored in.

use std::fmt;
use std::str::FromStr;

use crate::error::KernelError;

/// Element type of dense weights on the device ([`crate::device::DenseWeight`]). Parsed from `"f32"` or `"bf16"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DenseDtype {
    /// f32 weights and f32 GEMM inputs: the CPU's arithmetic up to the order of the additions.
    F32,
    /// bf16 weights (rounded to nearest even on upload) and bf16 GEMM inputs, f32 accumulation: half the memory and
    /// bandwidth, tensor-core speed.
    #[default]
    Bf16,
}

impl DenseDtype {
    /// Bytes per weight value.
    pub const fn bytes(self) -> usize {
        match self {
            DenseDtype::F32 => 4,
            DenseDtype::Bf16 => 2,
        }
    }
}

impl fmt::Display for DenseDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DenseDtype::F32 => "f32",
            DenseDtype::Bf16 => "bf16",
        })
    }
}

impl FromStr for DenseDtype {
    type Err = KernelError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        match input.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(DenseDtype::F32),
            "bf16" => Ok(DenseDtype::Bf16),
            _ => Err(KernelError::invalid("dense dtype", format!("{input:?} is neither \"f32\" nor \"bf16\""))),
        }
    }
}

/// Element type of a KV cache on the device. Parsed from `"f32"` or `"bf16"`. Keys and values are computed in f32
/// either way; bf16 rounds them to nearest even as they are written (as [`f32_to_bf16_bits`]) and widens them back
/// to f32 as attention reads them, so the arithmetic stays f32 and only the storage halves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KvDtype {
    /// f32 keys and values: the CPU's cache, bit for bit.
    F32,
    /// bf16 keys and values (8 significant bits): half the memory and the attention's read traffic of f32.
    #[default]
    Bf16,
}

impl KvDtype {
    /// Bytes per key or value element.
    pub const fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
        })
    }
}

impl FromStr for KvDtype {
    type Err = KernelError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        match input.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(KvDtype::F32),
            "bf16" => Ok(KvDtype::Bf16),
            _ => Err(KernelError::invalid("KV dtype", format!("{input:?} is neither \"f32\" nor \"bf16\""))),
        }
    }
}

mod sealed {
    /// Only the element types the KV kernels are compiled for.
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u16 {}
}

/// The element type of a device KV pool, as the buffer's Rust type: `f32`, or `u16` holding bf16 bits. The KV
/// kernels' wrappers (`CudaDevice::kv_write`, `CudaDevice::paged_decode_attention`) are generic over it and launch the
/// matching kernel, so a pool cannot be read as the other type. Sealed: the kernels exist for these two only.
pub trait KvElement: sealed::Sealed + Copy + Send + Sync + 'static {
    /// The dtype a pool of this element type holds.
    const DTYPE: KvDtype;
}

impl KvElement for f32 {
    const DTYPE: KvDtype = KvDtype::F32;
}

/// bf16 bits (what [`f32_to_bf16_bits`] makes).
impl KvElement for u16 {
    const DTYPE: KvDtype = KvDtype::Bf16;
}

/// The arguments of `CudaDevice::paged_decode_attention` besides the buffers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PagedDecode {
    /// Sequences (one query each).
    pub seqs: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads; must divide `q_heads`.
    pub kv_heads: usize,
    /// Values per head: a multiple of 32, at most 256.
    pub head_dim: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Rows of the block table (one per sequence; queries name theirs in `table_row`).
    pub table_rows: usize,
    /// Columns of the block table (blocks per sequence at most).
    pub max_blocks: usize,
    /// Blocks in the pool.
    pub pool_blocks: usize,
    /// 0 for the causal mask, else the chunked mask's chunk length.
    pub chunk: u32,
    /// Score scale (1 / sqrt(head_dim) usually).
    pub scale: f32,
    /// Parts each query head's keys are split into, each part on its own block, merged after (flash-decoding);
    /// 0 lets [`PagedDecode::key_splits`] choose.
    pub splits: usize,
}

/// Keys a split of `paged_decode_attention` takes at the least: below this, another block costs more than it saves.
pub const MIN_KEYS_PER_SPLIT: usize = 512;
/// Most splits of one query head's keys.
pub const MAX_KEY_SPLITS: usize = 64;

/// The head dimension of the grouped decode kernel (one block per KV head for all its query heads).
pub const GROUPED_HEAD_DIM: usize = 128;
/// The most query heads per KV head the grouped decode kernel takes.
pub const MAX_GROUP: usize = 8;

impl PagedDecode {
    /// Whether the grouped kernel runs (one block per KV head, each key read once for its query heads): head_dim
    /// [`GROUPED_HEAD_DIM`] and at most [`MAX_GROUP`] query heads per KV head, Maverick's 128 and 5; else one block per
    /// query head.
    pub fn grouped(&self) -> bool {
        self.head_dim == GROUPED_HEAD_DIM && self.kv_heads > 0 && self.q_heads / self.kv_heads <= MAX_GROUP
    }

    /// The splits a launch on a GPU of `sms` SMs uses: `splits` when set, else enough that the grid has about two
    /// blocks per SM (one block per KV head of a single decoding sequence is 8 blocks for Maverick, most of an H100
    /// idle while a long context streams through them), no split smaller than [`MIN_KEYS_PER_SPLIT`] keys of the
    /// longest visible range (`max_blocks * block_size`), at most [`MAX_KEY_SPLITS`].
    pub fn key_splits(&self, sms: usize) -> usize {
        if self.splits > 0 {
            return self.splits.min(MAX_KEY_SPLITS);
        }
        let heads = (self.seqs * if self.grouped() { self.kv_heads } else { self.q_heads }).max(1);
        let for_the_sms = (2 * sms).div_ceil(heads);
        let for_the_keys = (self.max_blocks * self.block_size) / MIN_KEYS_PER_SPLIT;
        for_the_sms.min(for_the_keys).clamp(1, MAX_KEY_SPLITS)
    }
}

/// The shape of `CudaDevice::kv_write`: a pool of `pool_blocks` blocks of `[2, block_size, kv_heads, head_dim]`
/// elements (keys, then values; f32 or bf16, [`KvElement`]), the layout [`PagedDecode`] and
/// `attention::paged_attention` read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvWrite {
    /// Positions per block.
    pub block_size: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Blocks in the pool.
    pub pool_blocks: usize,
}

/// `x` as bf16 bits, rounded to nearest even (what `DenseWeight::upload` and the device's conversion of GEMM inputs
/// do, bit for bit); NaN stays a quiet NaN of the same sign, infinities stay infinite.
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    // Adding 0x7FFF plus the lowest kept bit rounds half to even; a carry into the exponent is the correct rounding
    // up (to infinity past the largest finite bf16).
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

/// The f32 value of bf16 `bits` (exact).
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_splits_fill_the_sms_on_long_contexts_only() {
        let one_query = PagedDecode {
            seqs: 1,
            q_heads: 40,
            kv_heads: 8,
            head_dim: 128,
            block_size: 16,
            table_rows: 1,
            max_blocks: 65_536,
            pool_blocks: 65_536,
            chunk: 0,
            scale: 1.0,
            splits: 0,
        };
        // Maverick, 1M keys, an H100: grouped, 8 blocks per split, 33 splits for about two blocks per SM.
        assert!(one_query.grouped());
        assert_eq!(one_query.key_splits(132), 33);
        // 8K keys: 16 splits of 512 keys at most.
        assert_eq!(PagedDecode { max_blocks: 512, ..one_query }.key_splits(132), 16);
        // Short contexts and wide batches are not split; a set count is taken (up to the most).
        assert_eq!(PagedDecode { max_blocks: 20, ..one_query }.key_splits(132), 1);
        assert_eq!(PagedDecode { seqs: 64, ..one_query }.key_splits(132), 1);
        assert_eq!(PagedDecode { splits: 3, ..one_query }.key_splits(132), 3);
        assert_eq!(PagedDecode { splits: 1000, ..one_query }.key_splits(132), MAX_KEY_SPLITS);
        // Other head dimensions and wider groups run one block per query head, so fewer splits fill the GPU.
        let per_head = PagedDecode { head_dim: 64, ..one_query };
        assert!(!per_head.grouped() && !PagedDecode { q_heads: 72, ..one_query }.grouped());
        assert_eq!(per_head.key_splits(132), 7);
    }

    #[test]
    fn dense_dtype_parses_and_displays() {
        for dtype in [DenseDtype::F32, DenseDtype::Bf16] {
            assert_eq!(dtype.to_string().parse::<DenseDtype>(), Ok(dtype));
        }
        assert_eq!(" BF16 ".parse::<DenseDtype>(), Ok(DenseDtype::Bf16));
        assert_eq!(DenseDtype::default(), DenseDtype::Bf16);
        let err = "fp16".parse::<DenseDtype>().expect_err("fp16 is not offered");
        assert!(err.to_string().contains("\"fp16\""), "{err}");
    }

    #[test]
    fn kv_dtype_parses_displays_and_sizes() {
        for (dtype, bytes) in [(KvDtype::F32, 4), (KvDtype::Bf16, 2)] {
            assert_eq!(dtype.to_string().parse::<KvDtype>(), Ok(dtype));
            assert_eq!(dtype.bytes(), bytes);
        }
        assert_eq!(" BF16 ".parse::<KvDtype>(), Ok(KvDtype::Bf16));
        assert_eq!(KvDtype::default(), KvDtype::Bf16);
        assert_eq!((<f32 as KvElement>::DTYPE, <u16 as KvElement>::DTYPE), (KvDtype::F32, KvDtype::Bf16));
        let err = "fp8".parse::<KvDtype>().expect_err("fp8 KV is not built");
        assert!(err.to_string().contains("\"fp8\"") && err.to_string().contains("KV dtype"), "{err}");
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // Exactly representable values round-trip.
        for x in [0.0f32, -0.0, 1.0, -2.5, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(bf16_bits_to_f32(f32_to_bf16_bits(x)).to_bits(), x.to_bits(), "{x}");
        }
        // The largest finite bf16 and a subnormal one, by their bits.
        for bits in [0x7F7Fu16, 0x0001, 0x8001] {
            assert_eq!(f32_to_bf16_bits(bf16_bits_to_f32(bits)), bits, "{bits:#06x}");
        }
        // Halfway cases go to the even neighbour; just above halfway goes up.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8001)), 0x3F81);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0xBF80_7FFF)), 0xBF80);
        // Past the largest finite bf16 rounds to infinity; NaN stays NaN.
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7F80);
        assert!(bf16_bits_to_f32(f32_to_bf16_bits(f32::NAN)).is_nan());
        assert!(bf16_bits_to_f32(f32_to_bf16_bits(-f32::NAN)).is_nan());
        // Within half a bf16 ulp (2^-8 relative) everywhere else.
        let mut x = 1.0e-30f32;
        while x < 1.0e30 {
            let y = bf16_bits_to_f32(f32_to_bf16_bits(x));
            assert!(((y - x) / x).abs() <= 1.0 / 256.0, "{x} -> {y}");
            x *= 1.37;
        }
    }
}
