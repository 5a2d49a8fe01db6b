//! cuBLASLt on the CPU: the functions Switchyard calls through `cudarc::cublaslt::sys` (cudarc 0.19.10, `cuda-13000`
//! values), exported under their C names so cudarc's `dlsym` finds them when this library is loaded as
//! `libcublasLt.so`. Nothing of `libcublas` proper is exported: our code only checks that the library can be opened.
//!
//! **Semantics** (cuBLAS 13 documentation, "cublasLtMatmul()" and "Outer Vector Scaling for FP8 Data Types"):
//! `D = alpha · scale_A · scale_B · op(A) op(B) + beta · scale_C · C`, `op(A)` `m x k`, `op(B)` `k x n`, `C` and `D`
//! `m x n`, column-major unless `CUBLASLT_MATRIX_LAYOUT_ORDER` says row-major, leading dimensions in elements. With
//! outer-vector scaling `scale_A` is a vector over the `m` rows of `op(A)` and `scale_B` one over the `n` columns of
//! `op(B)`. `alpha` and `beta` are f32 read from the given addresses (host and "device" pointers are both plain
//! addresses here; device memory is host memory in this emulator). When `beta == 0`, `C` is not read (the BLAS
//! convention, so garbage or NaN in an output buffer used as `C` does not leak into `D`).
//!
//! **Arithmetic**: every element of `op(A)` and `op(B)` is decoded exactly (E4M3, E5M2, bf16, f32 all fit f32), each
//! product and the k-sum are computed in f64 in ascending `k` order, the scales and `alpha`/`beta` are applied in
//! f64, and the result is rounded once to D's type (bf16 through f32: two roundings). That is more accurate than a
//! tensor core, never less; tests compare against references with tolerances that allow either.
//!
//! **Refusals** follow what the real library refuses on Hopper (compute capability 9.0), each rule citing its
//! documentation line, so a descriptor mistake in our code fails here as it would on the H100. Configurations the
//! real library accepts but this emulator does not implement (epilogues other than DEFAULT, batches, FP8 or f16
//! outputs, block scaling, ...) are refused with `CUBLAS_STATUS_NOT_SUPPORTED` and a message saying "not emulated".
//! Every refusal is printed to stderr (`switchyard-cuda-emulator cuBLASLt: ...`) and kept for [`last_refusal`].
//!
//! **Algorithms**: one algorithm ([`EMULATED_ALGO_ID`]) in several configurations. The heuristic returns it with
//! each of the tile ids [`EMULATED_TILE_IDS`] (128x128 first, then 64x128; no split-K), the configuration attributes
//! can be read and set (`cublasLtMatmulAlgoConfigGet/SetAttribute`) and the capabilities read
//! (`cublasLtMatmulAlgoCapGetAttribute`), and `cublasLtMatmulAlgoCheck` and `cublasLtMatmul` accept only what the
//! capabilities advertise, with split-K needing the workspace its reduction scheme implies ([`AlgoConfig`]). An
//! `cublasLtMatmulAlgo_t` is plain data ([`AlgoRecord`]): a copy of its bytes is the same algorithm. No configuration
//! changes the arithmetic.
//!
//! Handles and descriptors are ids into a registry, never dereferenced pointers: a destroyed or foreign descriptor
//! is reported (`CUBLAS_STATUS_INVALID_VALUE`, or `NOT_INITIALIZED` for a handle) instead of crashing.

#![allow(non_snake_case)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// `cublasStatus_t` values (cudarc `cublasStatus_t`).
pub mod status {
    /// The operation completed successfully.
    pub const SUCCESS: u32 = 0;
    /// The handle is not a live cuBLASLt handle.
    pub const NOT_INITIALIZED: u32 = 1;
    /// Resource allocation failed.
    pub const ALLOC_FAILED: u32 = 3;
    /// A parameter is NULL, in conflict or impossible.
    pub const INVALID_VALUE: u32 = 7;
    /// The operation cannot run on the device.
    pub const ARCH_MISMATCH: u32 = 8;
    /// An internal failure (a panic inside the emulator).
    pub const INTERNAL_ERROR: u32 = 14;
    /// The configuration is not supported.
    pub const NOT_SUPPORTED: u32 = 15;
}

/// `cudaDataType_t` values used here (cudarc `cudaDataType_t`).
pub mod data_type {
    /// f32.
    pub const R_32F: u32 = 0;
    /// f64.
    pub const R_64F: u32 = 1;
    /// f16.
    pub const R_16F: u32 = 2;
    /// bf16.
    pub const R_16BF: u32 = 14;
    /// FP8 E4M3.
    pub const R_8F_E4M3: u32 = 28;
    /// FP8 E5M2.
    pub const R_8F_E5M2: u32 = 29;
}

/// `cublasComputeType_t` values used here (cudarc `cublasComputeType_t`).
pub mod compute_type {
    /// f32 compute, tensor cores allowed for narrower inputs, never TF32 for f32 inputs.
    pub const COMPUTE_32F: u32 = 68;
    /// f32 compute without tensor cores.
    pub const COMPUTE_32F_PEDANTIC: u32 = 69;
    /// f32 compute allowed to use TF32 tensor cores.
    pub const COMPUTE_32F_FAST_TF32: u32 = 77;
}

/// `cublasLtMatmulDescAttributes_t` values (cudarc `cublasLtMatmulDescAttributes_t`).
pub mod desc_attr {
    /// int32 `cublasComputeType_t`.
    pub const COMPUTE_TYPE: u32 = 0;
    /// int32 `cudaDataType_t` of alpha and beta.
    pub const SCALE_TYPE: u32 = 1;
    /// int32 `cublasLtPointerMode_t`.
    pub const POINTER_MODE: u32 = 2;
    /// int32 `cublasOperation_t` of A.
    pub const TRANSA: u32 = 3;
    /// int32 `cublasOperation_t` of B.
    pub const TRANSB: u32 = 4;
    /// int32 `cublasOperation_t` of C.
    pub const TRANSC: u32 = 5;
    /// int32 `cublasFillMode_t`.
    pub const FILL_MODE: u32 = 6;
    /// uint32 `cublasLtEpilogue_t`.
    pub const EPILOGUE: u32 = 7;
    /// Device pointer to the bias vector.
    pub const BIAS_POINTER: u32 = 8;
    /// Device pointer to A's scale (a scalar or, with outer-vector mode, a vector over m).
    pub const A_SCALE_POINTER: u32 = 17;
    /// Device pointer to B's scale (a scalar or, with outer-vector mode, a vector over n).
    pub const B_SCALE_POINTER: u32 = 18;
    /// Device pointer to C's scalar scale.
    pub const C_SCALE_POINTER: u32 = 19;
    /// Device pointer to D's scalar scale.
    pub const D_SCALE_POINTER: u32 = 20;
    /// Device pointer receiving max |D|.
    pub const AMAX_D_POINTER: u32 = 21;
    /// int8 FP8 fast accumulation flag.
    pub const FAST_ACCUM: u32 = 25;
    /// int32 `cublasLtMatmulMatrixScale_t` of A.
    pub const A_SCALE_MODE: u32 = 31;
    /// int32 `cublasLtMatmulMatrixScale_t` of B.
    pub const B_SCALE_MODE: u32 = 32;
    /// int32 `cublasLtMatmulMatrixScale_t` of C.
    pub const C_SCALE_MODE: u32 = 33;
    /// int32 `cublasLtMatmulMatrixScale_t` of D.
    pub const D_SCALE_MODE: u32 = 34;
}

/// `cublasLtMatrixLayoutAttribute_t` values (cudarc `cublasLtMatrixLayoutAttribute_t`).
pub mod layout_attr {
    /// uint32 `cudaDataType_t`.
    pub const TYPE: u32 = 0;
    /// int32 `cublasLtOrder_t`.
    pub const ORDER: u32 = 1;
    /// uint64 rows.
    pub const ROWS: u32 = 2;
    /// uint64 columns.
    pub const COLS: u32 = 3;
    /// int64 leading dimension.
    pub const LD: u32 = 4;
    /// int32 batch count.
    pub const BATCH_COUNT: u32 = 5;
    /// int64 stride between batch members.
    pub const STRIDED_BATCH_OFFSET: u32 = 6;
    /// int64 offset of the imaginary plane.
    pub const PLANE_OFFSET: u32 = 7;
    /// int32 `cublasLtBatchMode_t`.
    pub const BATCH_MODE: u32 = 8;
}

/// `cublasLtMatmulPreferenceAttributes_t` values (cudarc `cublasLtMatmulPreferenceAttributes_t`).
pub mod pref_attr {
    /// uint32 search mode.
    pub const SEARCH_MODE: u32 = 0;
    /// uint64 workspace limit in bytes.
    pub const MAX_WORKSPACE_BYTES: u32 = 1;
    /// uint32 reduction scheme mask.
    pub const REDUCTION_SCHEME_MASK: u32 = 3;
    /// uint32 alignment in bytes the call's A pointer is guaranteed to have.
    pub const MIN_ALIGNMENT_A_BYTES: u32 = 5;
    /// As above for B.
    pub const MIN_ALIGNMENT_B_BYTES: u32 = 6;
    /// As above for C.
    pub const MIN_ALIGNMENT_C_BYTES: u32 = 7;
    /// As above for D.
    pub const MIN_ALIGNMENT_D_BYTES: u32 = 8;
    /// float maximum waves count.
    pub const MAX_WAVES_COUNT: u32 = 9;
    /// uint64 numerical implementation mask.
    pub const IMPL_MASK: u32 = 12;
}

/// `cublasLtMatmulAlgoConfigAttributes_t` values (cudarc `cublasLtMatmulAlgoConfigAttributes_t`), with the type the
/// header gives each.
pub mod algo_config {
    /// int32 algorithm index, "readonly, set by cublasLtMatmulAlgoInit()".
    pub const ID: u32 = 0;
    /// uint32 `cublasLtMatmulTile_t`.
    pub const TILE_ID: u32 = 1;
    /// uint32 number of K splits.
    pub const SPLITK_NUM: u32 = 2;
    /// uint32 `cublasLtReductionScheme_t`.
    pub const REDUCTION_SCHEME: u32 = 3;
    /// uint32 CTA swizzling, 0 or 1.
    pub const CTA_SWIZZLING: u32 = 4;
    /// uint32 custom option.
    pub const CUSTOM_OPTION: u32 = 5;
    /// uint32 `cublasLtMatmulStages_t`.
    pub const STAGES_ID: u32 = 6;
    /// uint16 `cublasLtMatmulInnerShape_t`.
    pub const INNER_SHAPE_ID: u32 = 7;
    /// uint16 `cublasLtClusterShape_t`.
    pub const CLUSTER_SHAPE_ID: u32 = 8;
}

/// `cublasLtMatmulAlgoCapAttributes_t` values answered here (cudarc `cublasLtMatmulAlgoCapAttributes_t`).
pub mod algo_cap {
    /// int32, 0 means no split-K support.
    pub const SPLITK_SUPPORT: u32 = 0;
    /// uint32 mask of the supported `cublasLtReductionScheme_t`s.
    pub const REDUCTION_SCHEME_MASK: u32 = 1;
    /// uint32, 1: CTA swizzling value 1 is supported.
    pub const CTA_SWIZZLING_SUPPORT: u32 = 2;
    /// Array of uint32 `cublasLtMatmulTile_t`.
    pub const TILE_IDS: u32 = 6;
    /// int32, custom options range over 0..=this.
    pub const CUSTOM_OPTION_MAX: u32 = 7;
    /// Array of uint32 `cublasLtMatmulStages_t`.
    pub const STAGES_IDS: u32 = 13;
    /// uint32 alignment in bytes the algorithm needs of A (B, C, D follow).
    pub const MIN_ALIGNMENT_A_BYTES: u32 = 16;
    /// As above for D.
    pub const MIN_ALIGNMENT_D_BYTES: u32 = 19;
}

/// Enumerations set through attributes: operations, orders, pointer modes, scale modes, epilogues.
pub mod values {
    /// `CUBLAS_OP_N`.
    pub const OP_N: i32 = 0;
    /// `CUBLAS_OP_T`.
    pub const OP_T: i32 = 1;
    /// `CUBLAS_OP_C` (the transpose for real types).
    pub const OP_C: i32 = 2;
    /// `CUBLASLT_ORDER_COL`.
    pub const ORDER_COL: i32 = 0;
    /// `CUBLASLT_ORDER_ROW`.
    pub const ORDER_ROW: i32 = 1;
    /// `CUBLASLT_POINTER_MODE_HOST`.
    pub const POINTER_MODE_HOST: i32 = 0;
    /// `CUBLASLT_POINTER_MODE_DEVICE`.
    pub const POINTER_MODE_DEVICE: i32 = 1;
    /// `CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F`.
    pub const SCALE_SCALAR_32F: i32 = 0;
    /// `CUBLASLT_MATMUL_MATRIX_SCALE_VEC16_UE4M3`.
    pub const SCALE_VEC16_UE4M3: i32 = 1;
    /// `CUBLASLT_MATMUL_MATRIX_SCALE_VEC32_UE8M0`.
    pub const SCALE_VEC32_UE8M0: i32 = 2;
    /// `CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F`.
    pub const SCALE_OUTER_VEC_32F: i32 = 3;
    /// `CUBLASLT_EPILOGUE_DEFAULT`.
    pub const EPILOGUE_DEFAULT: u32 = 1;
    /// `CUBLAS_FILL_MODE_FULL`, the default fill mode.
    pub const FILL_MODE_FULL: i32 = 2;
    /// `CUBLASLT_REDUCTION_SCHEME_NONE`: "dot-product shall be performed in one sequence".
    pub const REDUCTION_NONE: u32 = 0;
    /// `CUBLASLT_REDUCTION_SCHEME_INPLACE`: split-K partial sums reduced in the output buffer.
    pub const REDUCTION_INPLACE: u32 = 1;
    /// `CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE`: partial sums kept in the workspace in the compute type.
    pub const REDUCTION_COMPUTE_TYPE: u32 = 2;
    /// `CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE`: partial sums kept in the workspace in the output type.
    pub const REDUCTION_OUTPUT_TYPE: u32 = 4;
    /// `CUBLASLT_REDUCTION_SCHEME_MASK`: all of the above.
    pub const REDUCTION_MASK: u32 = 7;
    /// `CUBLASLT_MATMUL_TILE_UNDEFINED`.
    pub const TILE_UNDEFINED: u32 = 0;
    /// `CUBLASLT_MATMUL_TILE_64x128`.
    pub const TILE_64X128: u32 = 17;
    /// `CUBLASLT_MATMUL_TILE_128x128`.
    pub const TILE_128X128: u32 = 20;
    /// `CUBLASLT_MATMUL_STAGES_UNDEFINED`.
    pub const STAGES_UNDEFINED: u32 = 0;
    /// `CUBLASLT_MATMUL_STAGES_64xAUTO`.
    pub const STAGES_64XAUTO: u32 = 35;
    /// `CUBLASLT_MATMUL_INNER_SHAPE_UNDEFINED`.
    pub const INNER_SHAPE_UNDEFINED: u16 = 0;
    /// `CUBLASLT_CLUSTER_SHAPE_AUTO`.
    pub const CLUSTER_SHAPE_AUTO: u16 = 0;
    /// `CUBLASLT_CLUSTER_SHAPE_1x1x1`.
    pub const CLUSTER_SHAPE_1X1X1: u16 = 2;
    /// `CUBLASLT_CLUSTER_SHAPE_2x1x1`.
    pub const CLUSTER_SHAPE_2X1X1: u16 = 3;
    /// `CUBLASLT_CLUSTER_SHAPE_4x1x1` (valid cuBLASLt, not emulated: a refusal example).
    pub const CLUSTER_SHAPE_4X1X1: u16 = 4;
    /// `CUBLASLT_CLUSTER_SHAPE_1x2x1`.
    pub const CLUSTER_SHAPE_1X2X1: u16 = 5;
}

/// The cuBLASLt version reported: 13.0.0 (what cudarc's `cuda-13000` bindings describe), `major * 10000 +
/// minor * 100 + patch`.
pub const EMULATED_VERSION: usize = 13_00_00;

/// `cublasLtMatmulAlgo_t`: opaque, 8 × u64 (cudarc's layout).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulAlgo {
    /// Opaque content; see [`AlgoRecord`] for what this emulator stores there.
    pub data: [u64; 8],
}

/// `cublasLtMatmulHeuristicResult_t` (cudarc's layout).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MatmulHeuristicResult {
    /// The algorithm to pass to `cublasLtMatmul`.
    pub algo: MatmulAlgo,
    /// Workspace the algorithm needs in bytes (0 unless a split-K configuration keeps partial sums there).
    pub workspaceSize: usize,
    /// `cublasStatus_t` of this result.
    pub state: u32,
    /// Estimated waves (1.0 here).
    pub wavesCount: f32,
    /// Reserved.
    pub reserved: [i32; 4],
}

/// Why a call was refused: the status it returns and the reason printed.
#[derive(Debug)]
struct Refusal {
    status: u32,
    reason: String,
}

fn refuse<T>(status: u32, reason: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal { status, reason: reason.into() })
}

fn invalid<T>(reason: impl Into<String>) -> Result<T, Refusal> {
    refuse(status::INVALID_VALUE, reason)
}

fn not_supported<T>(reason: impl Into<String>) -> Result<T, Refusal> {
    refuse(status::NOT_SUPPORTED, reason)
}

thread_local! {
    static LAST_REFUSAL: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The reason of the last call refused on this thread (cleared by each successful call), for tests and diagnostics.
pub fn last_refusal() -> Option<String> {
    LAST_REFUSAL.with(|last| last.borrow().clone())
}

/// Runs one exported function's body: catches panics (they must not unwind into C) and turns a refusal into its
/// status, printing the reason.
fn entry(function: &'static str, body: impl FnOnce() -> Result<(), Refusal>) -> u32 {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or_else(|panic| {
        let message = crate::error::panic_message(&*panic);
        Err(Refusal { status: status::INTERNAL_ERROR, reason: format!("emulator panicked: {message}") })
    });
    match outcome {
        Ok(()) => {
            LAST_REFUSAL.with(|last| *last.borrow_mut() = None);
            status::SUCCESS
        }
        Err(Refusal { status, reason }) => {
            eprintln!("switchyard-cuda-emulator cuBLASLt: {function} -> status {status}: {reason}");
            LAST_REFUSAL.with(|last| *last.borrow_mut() = Some(format!("{function}: {reason}")));
            status
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Objects.

/// A matmul descriptor: each attribute's bytes (sizes per the documentation's "Data Type" column).
#[derive(Debug, Clone)]
struct MatmulDesc {
    attrs: HashMap<u32, Vec<u8>>,
}

/// A matrix layout.
#[derive(Debug, Clone, PartialEq)]
struct Layout {
    data_type: u32,
    order: i32,
    rows: u64,
    cols: u64,
    ld: i64,
    batch_count: i32,
    batch_offset: i64,
    plane_offset: i64,
    batch_mode: i32,
}

/// Heuristic preferences.
#[derive(Debug, Clone)]
struct Preference {
    search_mode: u32,
    max_workspace: u64,
    reduction_mask: u32,
    /// Guaranteed alignment of A, B, C, D in bytes; "Default is 256 bytes".
    min_alignment: [u32; 4],
    max_waves: f32,
    impl_mask: u64,
}

impl Default for Preference {
    fn default() -> Self {
        Preference {
            search_mode: 0,
            max_workspace: 0,
            reduction_mask: 7,
            min_alignment: [256; 4],
            max_waves: 0.0,
            impl_mask: u64::MAX,
        }
    }
}

#[derive(Debug)]
enum Object {
    Handle,
    Desc(MatmulDesc),
    Layout(Layout),
    Preference(Preference),
}

struct Registry {
    next: u64,
    objects: HashMap<u64, Object>,
}

fn registry() -> MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| Mutex::new(Registry { next: 0, objects: HashMap::new() }))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Ids look like aligned pointers far from real allocations, so a mix-up with a real pointer is caught.
const ID_BASE: u64 = 0x5e1f_0000_0000;

fn register(object: Object) -> *mut c_void {
    let mut registry = registry();
    registry.next += 1;
    let id = ID_BASE + registry.next * 16;
    registry.objects.insert(id, object);
    id as *mut c_void
}

/// Writes a new object's id through `out` (the `*Create` functions' output parameter).
///
/// # Safety
/// `out` is null or valid for one pointer write.
unsafe fn create(out: *mut *mut c_void, what: &str, object: Object) -> Result<(), Refusal> {
    if out.is_null() {
        return invalid(format!("the output pointer for the new {what} is NULL"));
    }
    let id = register(object);
    // SAFETY: non-null and valid for a write per the caller's contract.
    unsafe { out.write(id) };
    Ok(())
}

fn destroy(id: *mut c_void, what: &str, matches: fn(&Object) -> bool) -> Result<(), Refusal> {
    let mut registry = registry();
    match registry.objects.get(&(id as u64)) {
        Some(object) if matches(object) => {
            registry.objects.remove(&(id as u64));
            Ok(())
        }
        Some(other) => invalid(format!("{id:p} is a {}, not a {what}", kind(other))),
        None => invalid(format!("{id:p} is not a live {what} (never created, or destroyed already)")),
    }
}

fn kind(object: &Object) -> &'static str {
    match object {
        Object::Handle => "cuBLASLt handle",
        Object::Desc(_) => "matmul descriptor",
        Object::Layout(_) => "matrix layout",
        Object::Preference(_) => "matmul preference",
    }
}

fn with_object<T>(
    id: *mut c_void,
    what: &str,
    f: impl FnOnce(&mut Object) -> Option<Result<T, Refusal>>,
) -> Result<T, Refusal> {
    let mut registry = registry();
    let Some(object) = registry.objects.get_mut(&(id as u64)) else {
        return invalid(format!("{id:p} is not a live {what} (never created, or destroyed already)"));
    };
    let found = kind(object);
    f(object).unwrap_or_else(|| invalid(format!("{id:p} is a {found}, not a {what}")))
}

fn check_handle(handle: *mut c_void) -> Result<(), Refusal> {
    match registry().objects.get(&(handle as u64)) {
        Some(Object::Handle) => Ok(()),
        _ => refuse(status::NOT_INITIALIZED, format!("{handle:p} is not a live cuBLASLt handle")),
    }
}

fn desc(id: *mut c_void) -> Result<MatmulDesc, Refusal> {
    with_object(id, "matmul descriptor", |o| match o {
        Object::Desc(d) => Some(Ok(d.clone())),
        _ => None,
    })
}

fn layout(id: *mut c_void, name: &str) -> Result<Layout, Refusal> {
    with_object(id, &format!("matrix layout ({name})"), |o| match o {
        Object::Layout(l) => Some(Ok(l.clone())),
        _ => None,
    })
}

fn preference(id: *mut c_void) -> Result<Preference, Refusal> {
    with_object(id, "matmul preference", |o| match o {
        Object::Preference(p) => Some(Ok(p.clone())),
        _ => None,
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Attribute buffers. "CUBLAS_STATUS_INVALID_VALUE: If buf is NULL or sizeInBytes doesn't match the size of the
// internal storage for the selected attribute" (cublasLt*SetAttribute).

/// Copies an attribute value in.
///
/// # Safety
/// `buf` is null or valid for `size` bytes of reads.
unsafe fn read_attr(buf: *const c_void, size: usize, expected: usize, name: &str) -> Result<Vec<u8>, Refusal> {
    if buf.is_null() {
        return invalid(format!("{name}: buf is NULL"));
    }
    if size != expected {
        return invalid(format!("{name}: sizeInBytes {size} does not match the attribute's {expected} bytes"));
    }
    // SAFETY: the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), size) }.to_vec())
}

/// Copies an attribute value out, per the `*GetAttribute` contract (size 0 asks for the size).
///
/// # Safety
/// `buf` is null or valid for `size` bytes of writes; `written` null or valid for one write.
unsafe fn write_attr(value: &[u8], buf: *mut c_void, size: usize, written: *mut usize) -> Result<(), Refusal> {
    if size == 0 {
        if written.is_null() {
            return invalid("sizeInBytes is 0 and sizeWritten is NULL");
        }
        // SAFETY: the caller's contract.
        unsafe { written.write(value.len()) };
        return Ok(());
    }
    if buf.is_null() {
        return invalid("buf is NULL");
    }
    if size != value.len() {
        return invalid(format!("sizeInBytes {size} does not match the attribute's {} bytes", value.len()));
    }
    // SAFETY: the caller's contract.
    unsafe {
        std::ptr::copy_nonoverlapping(value.as_ptr(), buf.cast::<u8>(), size);
        if !written.is_null() {
            written.write(size);
        }
    }
    Ok(())
}

/// Copies an array attribute out (`CUBLASLT_ALGO_CAP_TILE_IDS`, ...): as [`write_attr`], but any buffer at least as
/// large as the array takes it, and `sizeWritten` says how much was written.
///
/// # Safety
/// As for [`write_attr`].
unsafe fn write_array_attr(value: &[u8], buf: *mut c_void, size: usize, written: *mut usize) -> Result<(), Refusal> {
    if size == 0 || size == value.len() {
        // SAFETY: forwarded contract.
        return unsafe { write_attr(value, buf, size, written) };
    }
    if buf.is_null() {
        return invalid("buf is NULL");
    }
    if size < value.len() {
        return invalid(format!("sizeInBytes {size} is smaller than the attribute's {} bytes", value.len()));
    }
    // SAFETY: the caller's contract; value.len() < size.
    unsafe {
        std::ptr::copy_nonoverlapping(value.as_ptr(), buf.cast::<u8>(), value.len());
        if !written.is_null() {
            written.write(value.len());
        }
    }
    Ok(())
}

fn bytes_i32(bytes: &[u8]) -> i32 {
    bytes.try_into().map(i32::from_ne_bytes).unwrap_or(0)
}

fn bytes_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_ne_bytes).unwrap_or(0)
}

/// Size and default value of each matmul descriptor attribute ("Data Type" and "Default value" columns of
/// cublasLtMatmulDescAttributes_t).
fn desc_attr_default(attr: u32, compute: u32, scale: u32) -> Option<Vec<u8>> {
    let int32 = |v: i32| Some(v.to_ne_bytes().to_vec());
    let int64 = |v: i64| Some(v.to_ne_bytes().to_vec());
    let pointer = || Some(0u64.to_ne_bytes().to_vec());
    match attr {
        0 => int32(compute as i32),
        1 => int32(scale as i32),
        2 => int32(values::POINTER_MODE_HOST),
        3..=5 => int32(values::OP_N),
        6 => int32(values::FILL_MODE_FULL),
        7 => Some(values::EPILOGUE_DEFAULT.to_ne_bytes().to_vec()),
        8 | 11 | 17..=21 | 23 | 24 | 36 | 38 => pointer(),
        10 | 12..=14 => int64(0),
        15 => int32(0),
        22 | 26 => int32(-1),
        25 => Some(vec![0]),
        31..=35 | 37 => int32(values::SCALE_SCALAR_32F),
        // CUBLASLT_MATMUL_DESC_ALPHA_BATCH_STRIDE / BETA_BATCH_STRIDE (newer than cudarc's enum, harmless).
        39 | 40 => int64(0),
        _ => None,
    }
}

impl MatmulDesc {
    fn new(compute: u32, scale: u32) -> Self {
        let attrs = (0..=40).filter_map(|a| desc_attr_default(a, compute, scale).map(|v| (a, v))).collect();
        MatmulDesc { attrs }
    }

    fn i32(&self, attr: u32) -> i32 {
        self.attrs.get(&attr).map_or(0, |v| bytes_i32(v))
    }

    fn u64(&self, attr: u32) -> u64 {
        self.attrs.get(&attr).map_or(0, |v| bytes_u64(v))
    }

    /// Attributes this emulator does not implement, set to something other than their default.
    fn unemulated(&self) -> Option<String> {
        let defaults =
            MatmulDesc::new(self.i32(desc_attr::COMPUTE_TYPE) as u32, self.i32(desc_attr::SCALE_TYPE) as u32);
        let emulated = [
            desc_attr::COMPUTE_TYPE,
            desc_attr::SCALE_TYPE,
            desc_attr::POINTER_MODE,
            desc_attr::TRANSA,
            desc_attr::TRANSB,
            desc_attr::TRANSC,
            desc_attr::FILL_MODE,
            desc_attr::A_SCALE_POINTER,
            desc_attr::B_SCALE_POINTER,
            desc_attr::C_SCALE_POINTER,
            desc_attr::D_SCALE_POINTER,
            desc_attr::A_SCALE_MODE,
            desc_attr::B_SCALE_MODE,
            desc_attr::C_SCALE_MODE,
            desc_attr::D_SCALE_MODE,
            // Precision-only hints: FAST_ACCUM (25) and SM_COUNT_TARGET (15) change speed or rounding, not the
            // result's definition.
            desc_attr::FAST_ACCUM,
            15,
        ];
        let mut changed: Vec<u32> = self
            .attrs
            .iter()
            .filter(|(attr, value)| !emulated.contains(attr) && defaults.attrs.get(attr) != Some(value))
            .map(|(attr, _)| *attr)
            .collect();
        changed.sort_unstable();
        (!changed.is_empty()).then(|| format!("matmul descriptor attribute(s) {changed:?} set (not emulated)"))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Exported functions: handle, descriptors, layouts, preferences.

/// `cublasLtCreate`.
///
/// # Safety
/// `light_handle` is null or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn cublasLtCreate(light_handle: *mut *mut c_void) -> u32 {
    // SAFETY: forwarded contract.
    entry("cublasLtCreate", || unsafe { create(light_handle, "cuBLASLt handle", Object::Handle) })
}

/// `cublasLtDestroy`.
///
/// # Safety
/// None beyond passing a value; ids are looked up, never dereferenced.
#[no_mangle]
pub unsafe extern "C" fn cublasLtDestroy(light_handle: *mut c_void) -> u32 {
    entry("cublasLtDestroy", || {
        check_handle(light_handle)?;
        destroy(light_handle, "cuBLASLt handle", |o| matches!(o, Object::Handle))
    })
}

/// `cublasLtGetVersion`: [`EMULATED_VERSION`].
#[no_mangle]
pub extern "C" fn cublasLtGetVersion() -> usize {
    EMULATED_VERSION
}

/// `cublasLtGetCudartVersion`: 13000 (CUDA 13.0).
#[no_mangle]
pub extern "C" fn cublasLtGetCudartVersion() -> usize {
    13000
}

/// `cublasLtMatmulDescCreate`.
///
/// # Safety
/// `matmul_desc` is null or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescCreate(matmul_desc: *mut *mut c_void, compute: u32, scale: u32) -> u32 {
    entry("cublasLtMatmulDescCreate", || {
        let desc = Object::Desc(MatmulDesc::new(compute, scale));
        // SAFETY: forwarded contract.
        unsafe { create(matmul_desc, "matmul descriptor", desc) }
    })
}

/// `cublasLtMatmulDescDestroy`.
///
/// # Safety
/// None beyond passing a value.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescDestroy(matmul_desc: *mut c_void) -> u32 {
    entry("cublasLtMatmulDescDestroy", || destroy(matmul_desc, "matmul descriptor", |o| matches!(o, Object::Desc(_))))
}

/// `cublasLtMatmulDescSetAttribute`.
///
/// # Safety
/// `buf` is null or valid for `size` bytes of reads.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescSetAttribute(
    matmul_desc: *mut c_void,
    attr: u32,
    buf: *const c_void,
    size: usize,
) -> u32 {
    entry("cublasLtMatmulDescSetAttribute", || {
        with_object(matmul_desc, "matmul descriptor", |object| {
            let Object::Desc(desc) = object else { return None };
            let Some(default) = desc_attr_default(attr, 0, 0) else {
                return Some(invalid(format!("unknown matmul descriptor attribute {attr}")));
            };
            // SAFETY: forwarded contract.
            let value = unsafe { read_attr(buf, size, default.len(), &format!("matmul descriptor attribute {attr}")) };
            Some(value.map(|value| {
                desc.attrs.insert(attr, value);
            }))
        })
    })
}

/// `cublasLtMatmulDescGetAttribute`.
///
/// # Safety
/// `buf` is null or valid for `size` bytes of writes, `size_written` null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescGetAttribute(
    matmul_desc: *mut c_void,
    attr: u32,
    buf: *mut c_void,
    size: usize,
    size_written: *mut usize,
) -> u32 {
    entry("cublasLtMatmulDescGetAttribute", || {
        let desc = desc(matmul_desc)?;
        let Some(value) = desc.attrs.get(&attr) else {
            return invalid(format!("unknown matmul descriptor attribute {attr}"));
        };
        // SAFETY: forwarded contract.
        unsafe { write_attr(value, buf, size, size_written) }
    })
}

/// `cublasLtMatrixLayoutCreate`.
///
/// # Safety
/// `matrix_layout` is null or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutCreate(
    matrix_layout: *mut *mut c_void,
    data_type: u32,
    rows: u64,
    cols: u64,
    ld: i64,
) -> u32 {
    entry("cublasLtMatrixLayoutCreate", || {
        let layout = Layout {
            data_type,
            order: values::ORDER_COL,
            rows,
            cols,
            ld,
            batch_count: 1,
            batch_offset: 0,
            plane_offset: 0,
            batch_mode: 0,
        };
        // SAFETY: forwarded contract.
        unsafe { create(matrix_layout, "matrix layout", Object::Layout(layout)) }
    })
}

/// `cublasLtMatrixLayoutDestroy`.
///
/// # Safety
/// None beyond passing a value.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutDestroy(matrix_layout: *mut c_void) -> u32 {
    entry("cublasLtMatrixLayoutDestroy", || destroy(matrix_layout, "matrix layout", |o| matches!(o, Object::Layout(_))))
}

/// Size in bytes of each layout attribute (cublasLtMatrixLayoutAttribute_t "Data Type" column).
fn layout_attr_size(attr: u32) -> Option<usize> {
    match attr {
        layout_attr::TYPE | layout_attr::ORDER | layout_attr::BATCH_COUNT | layout_attr::BATCH_MODE => Some(4),
        layout_attr::ROWS | layout_attr::COLS | layout_attr::LD => Some(8),
        layout_attr::STRIDED_BATCH_OFFSET | layout_attr::PLANE_OFFSET => Some(8),
        _ => None,
    }
}

impl Layout {
    fn get(&self, attr: u32) -> Vec<u8> {
        match attr {
            layout_attr::TYPE => self.data_type.to_ne_bytes().to_vec(),
            layout_attr::ORDER => self.order.to_ne_bytes().to_vec(),
            layout_attr::ROWS => self.rows.to_ne_bytes().to_vec(),
            layout_attr::COLS => self.cols.to_ne_bytes().to_vec(),
            layout_attr::LD => self.ld.to_ne_bytes().to_vec(),
            layout_attr::BATCH_COUNT => self.batch_count.to_ne_bytes().to_vec(),
            layout_attr::STRIDED_BATCH_OFFSET => self.batch_offset.to_ne_bytes().to_vec(),
            layout_attr::PLANE_OFFSET => self.plane_offset.to_ne_bytes().to_vec(),
            _ => self.batch_mode.to_ne_bytes().to_vec(),
        }
    }

    fn set(&mut self, attr: u32, value: &[u8]) {
        let v64 = bytes_u64(value);
        let v32 = bytes_i32(value);
        match attr {
            layout_attr::TYPE => self.data_type = v32 as u32,
            layout_attr::ORDER => self.order = v32,
            layout_attr::ROWS => self.rows = v64,
            layout_attr::COLS => self.cols = v64,
            layout_attr::LD => self.ld = v64 as i64,
            layout_attr::BATCH_COUNT => self.batch_count = v32,
            layout_attr::STRIDED_BATCH_OFFSET => self.batch_offset = v64 as i64,
            layout_attr::PLANE_OFFSET => self.plane_offset = v64 as i64,
            _ => self.batch_mode = v32,
        }
    }
}

/// `cublasLtMatrixLayoutSetAttribute`.
///
/// # Safety
/// `buf` is null or valid for `size` bytes of reads.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutSetAttribute(
    matrix_layout: *mut c_void,
    attr: u32,
    buf: *const c_void,
    size: usize,
) -> u32 {
    entry("cublasLtMatrixLayoutSetAttribute", || {
        let Some(expected) = layout_attr_size(attr) else {
            return invalid(format!("unknown matrix layout attribute {attr}"));
        };
        // SAFETY: forwarded contract.
        let value = unsafe { read_attr(buf, size, expected, &format!("matrix layout attribute {attr}")) }?;
        with_object(matrix_layout, "matrix layout", |object| {
            let Object::Layout(layout) = object else { return None };
            layout.set(attr, &value);
            Some(Ok(()))
        })
    })
}

/// `cublasLtMatrixLayoutGetAttribute`.
///
/// # Safety
/// `buf` is null or valid for `size` bytes of writes, `size_written` null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutGetAttribute(
    matrix_layout: *mut c_void,
    attr: u32,
    buf: *mut c_void,
    size: usize,
    size_written: *mut usize,
) -> u32 {
    entry("cublasLtMatrixLayoutGetAttribute", || {
        if layout_attr_size(attr).is_none() {
            return invalid(format!("unknown matrix layout attribute {attr}"));
        }
        let value = layout(matrix_layout, "queried")?.get(attr);
        // SAFETY: forwarded contract.
        unsafe { write_attr(&value, buf, size, size_written) }
    })
}

/// `cublasLtMatmulPreferenceCreate`.
///
/// # Safety
/// `pref` is null or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceCreate(pref: *mut *mut c_void) -> u32 {
    entry("cublasLtMatmulPreferenceCreate", || {
        // SAFETY: forwarded contract.
        unsafe { create(pref, "matmul preference", Object::Preference(Preference::default())) }
    })
}

/// `cublasLtMatmulPreferenceDestroy`.
///
/// # Safety
/// None beyond passing a value.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceDestroy(pref: *mut c_void) -> u32 {
    entry("cublasLtMatmulPreferenceDestroy", || {
        destroy(pref, "matmul preference", |o| matches!(o, Object::Preference(_)))
    })
}

impl Preference {
    fn get(&self, attr: u32) -> Option<Vec<u8>> {
        Some(match attr {
            pref_attr::SEARCH_MODE => self.search_mode.to_ne_bytes().to_vec(),
            pref_attr::MAX_WORKSPACE_BYTES => self.max_workspace.to_ne_bytes().to_vec(),
            pref_attr::REDUCTION_SCHEME_MASK => self.reduction_mask.to_ne_bytes().to_vec(),
            5..=8 => self.min_alignment[(attr - 5) as usize].to_ne_bytes().to_vec(),
            pref_attr::MAX_WAVES_COUNT => self.max_waves.to_ne_bytes().to_vec(),
            pref_attr::IMPL_MASK => self.impl_mask.to_ne_bytes().to_vec(),
            _ => return None,
        })
    }

    fn set(&mut self, attr: u32, value: &[u8]) {
        let v32 = bytes_i32(value) as u32;
        match attr {
            pref_attr::SEARCH_MODE => self.search_mode = v32,
            pref_attr::MAX_WORKSPACE_BYTES => self.max_workspace = bytes_u64(value),
            pref_attr::REDUCTION_SCHEME_MASK => self.reduction_mask = v32,
            5..=8 => self.min_alignment[(attr - 5) as usize] = v32,
            pref_attr::MAX_WAVES_COUNT => self.max_waves = f32::from_bits(v32),
            _ => self.impl_mask = bytes_u64(value),
        }
    }
}

/// `cublasLtMatmulPreferenceSetAttribute`.
///
/// # Safety
/// `buf` is null or valid for `size` bytes of reads.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceSetAttribute(
    pref: *mut c_void,
    attr: u32,
    buf: *const c_void,
    size: usize,
) -> u32 {
    entry("cublasLtMatmulPreferenceSetAttribute", || {
        let Some(expected) = Preference::default().get(attr).map(|v| v.len()) else {
            return invalid(format!("unknown matmul preference attribute {attr}"));
        };
        // SAFETY: forwarded contract.
        let value = unsafe { read_attr(buf, size, expected, &format!("matmul preference attribute {attr}")) }?;
        with_object(pref, "matmul preference", |object| {
            let Object::Preference(pref) = object else { return None };
            pref.set(attr, &value);
            Some(Ok(()))
        })
    })
}

/// `cublasLtMatmulPreferenceGetAttribute`.
///
/// # Safety
/// `buf` is null or valid for `size` bytes of writes, `size_written` null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceGetAttribute(
    pref: *mut c_void,
    attr: u32,
    buf: *mut c_void,
    size: usize,
    size_written: *mut usize,
) -> u32 {
    entry("cublasLtMatmulPreferenceGetAttribute", || {
        let Some(value) = preference(pref)?.get(attr) else {
            return invalid(format!("unknown matmul preference attribute {attr}"));
        };
        // SAFETY: forwarded contract.
        unsafe { write_attr(&value, buf, size, size_written) }
    })
}

// ---------------------------------------------------------------------------------------------------------------
// The problem: what a descriptor and four layouts ask for, checked against the documented rules.

/// Element formats this emulator reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    F32,
    Bf16,
    E4m3,
    E5m2,
}

impl Format {
    fn of(data_type: u32) -> Option<Format> {
        match data_type {
            data_type::R_32F => Some(Format::F32),
            data_type::R_16BF => Some(Format::Bf16),
            data_type::R_8F_E4M3 => Some(Format::E4m3),
            data_type::R_8F_E5M2 => Some(Format::E5m2),
            _ => None,
        }
    }

    fn size(self) -> u64 {
        match self {
            Format::F32 => 4,
            Format::Bf16 => 2,
            Format::E4m3 | Format::E5m2 => 1,
        }
    }

    fn is_fp8(self) -> bool {
        matches!(self, Format::E4m3 | Format::E5m2)
    }
}

/// One operand: its layout, format and whether the operation transposes it.
#[derive(Debug, Clone, Copy)]
struct Operand {
    format: Format,
    row_major: bool,
    ld: u64,
    transposed: bool,
}

impl Operand {
    /// Element offset of stored element (row, col).
    fn offset(&self, row: u64, col: u64) -> u64 {
        if self.row_major {
            row * self.ld + col
        } else {
            row + col * self.ld
        }
    }

    /// Element offset of element (i, j) of op(X).
    fn op_offset(&self, i: u64, j: u64) -> u64 {
        if self.transposed {
            self.offset(j, i)
        } else {
            self.offset(i, j)
        }
    }
}

/// A checked matmul.
#[derive(Debug, Clone, Copy)]
struct Problem {
    m: u64,
    n: u64,
    k: u64,
    a: Operand,
    b: Operand,
    c: Operand,
    d: Operand,
    /// FP8 A/B with outer-vector scales (else scalar scales, or none for non-narrow types).
    outer_vector: bool,
    /// The algorithm signature: what an algo from the heuristic must match at `cublasLtMatmul`.
    signature: u64,
}

fn check_operand(layout: &Layout, name: &str, transposed: bool) -> Result<Operand, Refusal> {
    let Some(format) = Format::of(layout.data_type) else {
        return not_supported(format!(
            "{name}: data type {} is not one of f32 / bf16 / E4M3 / E5M2 (others not emulated)",
            layout.data_type
        ));
    };
    // cublasLtMatrixLayoutAttribute_t: BATCH_COUNT "Default value is 1"; batches are not emulated.
    if layout.batch_count != 1 || layout.plane_offset != 0 || layout.batch_mode != 0 {
        return not_supported(format!("{name}: batched or planar-complex layouts are not emulated"));
    }
    let row_major = match layout.order {
        values::ORDER_COL => false,
        values::ORDER_ROW => true,
        // cublasLtOrder_t: COL32 / COL4_4R2_8C / COL32_2R_4R4 are IMMA orders of Turing/Ampere, "not Hopper".
        other => return not_supported(format!("{name}: order {other} (only COL and ROW on Hopper)")),
    };
    // CUBLASLT_MATRIX_LAYOUT_LD: "Currently only non-negative values are supported. Must be large enough so that
    // matrix memory locations are not overlapping (e.g., greater or equal to CUBLASLT_MATRIX_LAYOUT_ROWS in case of
    // CUBLASLT_ORDER_COL)."
    let Ok(ld) = u64::try_from(layout.ld) else {
        return invalid(format!("{name}: negative leading dimension {}", layout.ld));
    };
    let (inner, outer) = if row_major { (layout.cols, layout.rows) } else { (layout.rows, layout.cols) };
    if outer > 1 && ld < inner.max(1) {
        let (what, dim) = if row_major { ("COLS", layout.cols) } else { ("ROWS", layout.rows) };
        return invalid(format!("{name}: leading dimension {ld} is smaller than {what} = {dim}"));
    }
    // CUBLASLT_MATRIX_LAYOUT_ROWS/COLS: "Normally only values that can be expressed as int32_t are supported."
    if layout.rows > i32::MAX as u64 || layout.cols > i32::MAX as u64 {
        return not_supported(format!("{name}: {} x {} exceeds int32 dimensions", layout.rows, layout.cols));
    }
    Ok(Operand { format, row_major, ld, transposed })
}

fn transpose_flag(desc: &MatmulDesc, attr: u32, name: &str) -> Result<bool, Refusal> {
    match desc.i32(attr) {
        values::OP_N => Ok(false),
        // CUBLAS_OP_C is the transpose for the real types emulated here.
        values::OP_T | values::OP_C => Ok(true),
        other => invalid(format!("{name} = {other} is not a cublasOperation_t")),
    }
}

fn check_problem(desc: &MatmulDesc, layouts: [&Layout; 4], c_is_d: bool) -> Result<Problem, Refusal> {
    let [la, lb, lc, ld] = layouts;
    let compute = desc.i32(desc_attr::COMPUTE_TYPE) as u32;
    let scale = desc.i32(desc_attr::SCALE_TYPE) as u32;
    if let Some(reason) = desc.unemulated() {
        return not_supported(reason);
    }
    // CUBLASLT_MATMUL_DESC_TRANSC: "Currently only CUBLAS_OP_N is supported."
    if desc.i32(desc_attr::TRANSC) != values::OP_N {
        return not_supported("TRANSC must be CUBLAS_OP_N (\"Currently only CUBLAS_OP_N is supported\")");
    }
    // CUBLASLT_MATMUL_DESC_FILL_MODE: "not supported for bfloat16 or FP8 data types and is not supported on the
    // following GPUs: Hopper, Blackwell."
    if desc.i32(desc_attr::FILL_MODE) != values::FILL_MODE_FULL {
        return not_supported("FILL_MODE other than FULL is not supported on Hopper");
    }
    let pointer_mode = desc.i32(desc_attr::POINTER_MODE);
    if pointer_mode != values::POINTER_MODE_HOST && pointer_mode != values::POINTER_MODE_DEVICE {
        return not_supported(format!("pointer mode {pointer_mode} (vector alpha) is not emulated"));
    }
    let transa = transpose_flag(desc, desc_attr::TRANSA, "TRANSA")?;
    let transb = transpose_flag(desc, desc_attr::TRANSB, "TRANSB")?;
    let a = check_operand(la, "A", transa)?;
    let b = check_operand(lb, "B", transb)?;
    let c = check_operand(lc, "C", false)?;
    let d = check_operand(ld, "D", false)?;

    // Shapes: op(A) m x k, op(B) k x n, C and D m x n.
    let (m, k) = if transa { (la.cols, la.rows) } else { (la.rows, la.cols) };
    let (kb, n) = if transb { (lb.cols, lb.rows) } else { (lb.rows, lb.cols) };
    if k != kb {
        return invalid(format!("op(A) is {m} x {k} but op(B) is {kb} x {n} (TRANSA = {transa}, TRANSB = {transb})"));
    }
    if (ld.rows, ld.cols) != (m, n) {
        return invalid(format!("D is {} x {} but op(A) op(B) is {m} x {n}", ld.rows, ld.cols));
    }
    // cublasLtMatmul note: "out-of-place matrix multiplication (C != D, both matrices must have the same data type,
    // number of rows, number of columns, batch size, and memory order)"; in place needs "C == D and Cdesc == Ddesc".
    if (lc.rows, lc.cols) != (m, n) || lc.data_type != ld.data_type || lc.order != ld.order {
        return invalid(format!(
            "C ({} x {}, type {}, order {}) must match D ({m} x {n}, type {}, order {})",
            lc.rows, lc.cols, lc.data_type, lc.order, ld.data_type, ld.order
        ));
    }
    if c_is_d && lc != ld {
        return invalid("C and D are the same buffer but Cdesc differs from Ddesc (in-place needs Cdesc == Ddesc)");
    }

    let scale_modes = [
        desc.i32(desc_attr::A_SCALE_MODE),
        desc.i32(desc_attr::B_SCALE_MODE),
        desc.i32(desc_attr::C_SCALE_MODE),
        desc.i32(desc_attr::D_SCALE_MODE),
    ];
    let fp8 = a.format.is_fp8() || b.format.is_fp8();
    let mut outer_vector = false;
    if fp8 {
        outer_vector = check_fp8(compute, scale, transa, transb, [&a, &b, &c, &d], [m, n, k], scale_modes)?;
    } else {
        check_wide(compute, scale, [&a, &b, &c, &d], desc, scale_modes)?;
    }
    let fields = [compute, scale, la.data_type, lb.data_type, ld.data_type].into_iter().map(u64::from);
    let signature = fields
        .chain(scale_modes.iter().map(|&mode| mode as u32 as u64))
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, v| (hash ^ v).wrapping_mul(0x100_0000_01b3));
    Ok(Problem { m, n, k, a, b, c, d, outer_vector, signature })
}

/// The FP8 rules of cublasLtMatmul on Hopper; returns whether outer-vector scaling is on.
fn check_fp8(
    compute: u32,
    scale: u32,
    transa: bool,
    transb: bool,
    [a, b, c, d]: [&Operand; 4],
    [m, _n, k]: [u64; 3],
    [a_mode, b_mode, c_mode, d_mode]: [i32; 4],
) -> Result<bool, Refusal> {
    // "To use tensor- or block-scaled FP8 kernels, the following set of requirements must be satisfied: [...]
    // The compute type must be CUBLAS_COMPUTE_32F. The scale type must be CUDA_R_32F."
    if compute != compute_type::COMPUTE_32F {
        return not_supported(format!("FP8 needs compute type CUBLAS_COMPUTE_32F (68), got {compute}"));
    }
    if scale != data_type::R_32F {
        return not_supported(format!("FP8 needs scale type CUDA_R_32F (0), got {scale}"));
    }
    // FP8 type table: A and B both FP8, E5M2 x E5M2 absent.
    if !(a.format.is_fp8() && b.format.is_fp8()) || (a.format == Format::E5m2 && b.format == Format::E5m2) {
        return not_supported(format!("FP8 A/B pair {:?} x {:?} is not in the FP8 type table", a.format, b.format));
    }
    // FP8 type table: C = D = CUDA_R_32F, or C = D = CUDA_R_16BF (FP8 and f16 D exist but are not emulated).
    match (c.format, d.format) {
        (Format::F32, Format::F32) | (Format::Bf16, Format::Bf16) => {}
        (cf, df) => {
            return not_supported(format!("FP8 with C {cf:?} / D {df:?}: not in the FP8 type table or not emulated"))
        }
    }
    // "A must be transposed and B non-transposed (The "TN" format) on Ada (compute capability 8.9), Hopper (compute
    // capability 9.0), and Blackwell GeForce (compute capability 12.x) GPUs." The documentation describes it for the
    // default column-major order only; other orders are refused.
    if !transa || transb {
        return not_supported(format!(
            "FP8 needs the TN format on Hopper (A transposed, B not); got TRANSA = {}, TRANSB = {}",
            if transa { "T" } else { "N" },
            if transb { "T" } else { "N" }
        ));
    }
    if a.row_major || b.row_major || c.row_major || d.row_major {
        return not_supported("FP8 is documented for column-major (CUBLASLT_ORDER_COL) layouts only");
    }
    // "All matrix dimensions must meet the optimal requirements listed in Tensor Core Usage (i.e. pointers and matrix
    // dimension must support 16-byte alignment)", Tensor Core Usage: "((op_A == CUBLAS_OP_N ? m : k) * AtypeSize) %
    // 16 == 0", "((op_B == CUBLAS_OP_N ? k : n) * BtypeSize) % 16 == 0", "(m * CtypeSize) % 16 == 0",
    // "(lda * AtypeSize) % 16 == 0", "(ldb * BtypeSize) % 16 == 0", "(ldc * CtypeSize) % 16 == 0" (ldd likewise).
    // With TN, A's and B's first term is k. Pointers are checked at the call.
    let rules = [
        (k * a.format.size(), "k * sizeof(A)"),
        (k * b.format.size(), "k * sizeof(B)"),
        (m * c.format.size(), "m * sizeof(C)"),
        (a.ld * a.format.size(), "lda * sizeof(A)"),
        (b.ld * b.format.size(), "ldb * sizeof(B)"),
        (c.ld * c.format.size(), "ldc * sizeof(C)"),
        (d.ld * d.format.size(), "ldd * sizeof(D)"),
    ];
    for (value, what) in rules {
        if value % 16 != 0 {
            return not_supported(format!(
                "FP8 needs {what} to be a multiple of 16 bytes (Tensor Core Usage), got {value} (m = {m}, k = {k}, \
                 lda = {}, ldb = {}, ldc = {}, ldd = {})",
                a.ld, b.ld, c.ld, d.ld
            ));
        }
    }
    // Scaling Mode Support Overview: tensorwide (SCALAR_32F) 8.9+, outer vector 9.0, 128-element / 128x128 block
    // 9.0, 32- and 16-element block 10.0+. "To enable outer vector scaling, the CUBLASLT_MATMUL_DESC_A_SCALE_MODE and
    // CUBLASLT_MATMUL_DESC_B_SCALE_MODE attributes, must be set to CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F, while
    // all the other scaling modes must not be modified."
    let outer = values::SCALE_OUTER_VEC_32F;
    let scalar = values::SCALE_SCALAR_32F;
    match (a_mode, b_mode) {
        (m_a, m_b) if m_a == scalar && m_b == scalar => {}
        (m_a, m_b) if m_a == outer && m_b == outer => {}
        (m_a, m_b) if m_a == outer || m_b == outer => {
            return not_supported(format!(
                "outer-vector scaling needs both A_SCALE_MODE and B_SCALE_MODE = OUTER_VEC_32F, got {m_a} / {m_b}"
            ))
        }
        (m_a, m_b) if [m_a, m_b].iter().any(|&v| v == values::SCALE_VEC16_UE4M3 || v == values::SCALE_VEC32_UE8M0) => {
            return not_supported(format!(
                "scale modes {m_a} / {m_b}: 16/32-element block scaling needs compute capability 10.0+"
            ))
        }
        (m_a, m_b) => return not_supported(format!("scale modes {m_a} / {m_b}: block scaling is not emulated")),
    }
    if c_mode != scalar || d_mode != scalar {
        return not_supported(format!("C / D scale modes {c_mode} / {d_mode} are not emulated"));
    }
    Ok(a_mode == outer)
}

/// The f32 and bf16 rules.
fn check_wide(
    compute: u32,
    scale: u32,
    [a, b, c, d]: [&Operand; 4],
    desc: &MatmulDesc,
    scale_modes: [i32; 4],
) -> Result<(), Refusal> {
    // Datatypes table of cublasLtMatmul: CUBLAS_COMPUTE_32F(_PEDANTIC), scale CUDA_R_32F, with A/B 16BF and C
    // 16BF or 32F, or A/B 32F and C 32F. TF32 and other fast modes are valid but not emulated (they round inputs).
    if compute != compute_type::COMPUTE_32F && compute != compute_type::COMPUTE_32F_PEDANTIC {
        return not_supported(format!("compute type {compute} with f32/bf16 inputs is not emulated"));
    }
    if scale != data_type::R_32F {
        return not_supported(format!("scale type {scale} with compute type {compute} is not in the type table"));
    }
    let supported = matches!(
        (a.format, b.format, c.format),
        (Format::F32, Format::F32, Format::F32) | (Format::Bf16, Format::Bf16, Format::Bf16 | Format::F32)
    );
    if !supported || c.format != d.format {
        return not_supported(format!(
            "A {:?} / B {:?} / C {:?} / D {:?} is not in cublasLtMatmul's type table (or not emulated)",
            a.format, b.format, c.format, d.format
        ));
    }
    // "Scales are only applicable to narrow precisions matmuls. If any scale is set for a non-narrow precisions
    // matmul, cuBLAS will return an error. [...] The one exception is that the C tensor is allowed to have a scale
    // for non-narrow data types with tensorwide scaling mode."
    for (attr, name) in [
        (desc_attr::A_SCALE_POINTER, "A_SCALE_POINTER"),
        (desc_attr::B_SCALE_POINTER, "B_SCALE_POINTER"),
        (desc_attr::D_SCALE_POINTER, "D_SCALE_POINTER"),
    ] {
        if desc.u64(attr) != 0 {
            return invalid(format!("{name} is set for a non-narrow (f32/bf16) matmul"));
        }
    }
    if scale_modes.iter().any(|&mode| mode != values::SCALE_SCALAR_32F) {
        return invalid(format!("scale modes {scale_modes:?} are set for a non-narrow (f32/bf16) matmul"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Algorithms: what a `cublasLtMatmulAlgo_t` holds, its configuration and capabilities, and the heuristic.

/// The `CUBLASLT_ALGO_CONFIG_ID` of every algorithm this emulator makes: one algorithm (the exact f64 product), in
/// several configurations.
pub const EMULATED_ALGO_ID: i32 = 0;

/// The tile ids the algorithm offers (`CUBLASLT_ALGO_CAP_TILE_IDS`), in the heuristic's order: its first result uses
/// the first, its second the second. Tiles change nothing in the emulated arithmetic.
pub const EMULATED_TILE_IDS: [u32; 2] = [values::TILE_128X128, values::TILE_64X128];

/// The stages ids the algorithm offers (`CUBLASLT_ALGO_CAP_STAGES_IDS`); the heuristic's results carry this one.
pub const EMULATED_STAGES_IDS: [u32; 1] = [values::STAGES_64XAUTO];

/// The cluster shapes `cublasLtMatmulAlgoCheck` accepts: AUTO and the three smallest Hopper clusters. The others are
/// valid cuBLASLt values, refused here as "not emulated".
pub const EMULATED_CLUSTER_SHAPES: [u16; 4] =
    [values::CLUSTER_SHAPE_AUTO, values::CLUSTER_SHAPE_1X1X1, values::CLUSTER_SHAPE_2X1X1, values::CLUSTER_SHAPE_1X2X1];

/// `CUBLASLT_ALGO_CAP_CUSTOM_OPTION_MAX`: "custom option range is from 0 to CUBLASLT_ALGO_CAP_CUSTOM_OPTION_MAX
/// (inclusive)"; the emulated algorithm has no custom options.
pub const EMULATED_CUSTOM_OPTION_MAX: i32 = 0;

/// `CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK`: every split-K reduction scheme.
pub const EMULATED_REDUCTION_SCHEME_MASK: u32 =
    values::REDUCTION_INPLACE | values::REDUCTION_COMPUTE_TYPE | values::REDUCTION_OUTPUT_TYPE;

/// An algorithm's configuration (`cublasLtMatmulAlgoConfigAttributes_t`, each field the header's type for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlgoConfig {
    /// `CUBLASLT_ALGO_CONFIG_TILE_ID`.
    pub tile: u32,
    /// `CUBLASLT_ALGO_CONFIG_SPLITK_NUM`: "number of K splits", default 1.
    pub splitk: u32,
    /// `CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME`, default NONE.
    pub reduction: u32,
    /// `CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING`: 0 or 1.
    pub swizzle: u32,
    /// `CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION`.
    pub custom_option: u32,
    /// `CUBLASLT_ALGO_CONFIG_STAGES_ID`.
    pub stages: u32,
    /// `CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID`.
    pub inner_shape: u16,
    /// `CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID`.
    pub cluster_shape: u16,
}

impl AlgoConfig {
    /// What the heuristic's result number `index` carries: one of [`EMULATED_TILE_IDS`], no split-K, the header's
    /// defaults elsewhere, cluster shape AUTO.
    fn heuristic(index: usize) -> AlgoConfig {
        AlgoConfig {
            tile: EMULATED_TILE_IDS[index],
            splitk: 1,
            reduction: values::REDUCTION_NONE,
            swizzle: 0,
            custom_option: 0,
            stages: EMULATED_STAGES_IDS[0],
            inner_shape: values::INNER_SHAPE_UNDEFINED,
            cluster_shape: values::CLUSTER_SHAPE_AUTO,
        }
    }

    /// The attribute's value in its header type (ID: int32; INNER_SHAPE_ID, CLUSTER_SHAPE_ID: uint16; the rest
    /// uint32), `None` for an unknown attribute.
    fn get(&self, attr: u32) -> Option<Vec<u8>> {
        Some(match attr {
            algo_config::ID => EMULATED_ALGO_ID.to_ne_bytes().to_vec(),
            algo_config::TILE_ID => self.tile.to_ne_bytes().to_vec(),
            algo_config::SPLITK_NUM => self.splitk.to_ne_bytes().to_vec(),
            algo_config::REDUCTION_SCHEME => self.reduction.to_ne_bytes().to_vec(),
            algo_config::CTA_SWIZZLING => self.swizzle.to_ne_bytes().to_vec(),
            algo_config::CUSTOM_OPTION => self.custom_option.to_ne_bytes().to_vec(),
            algo_config::STAGES_ID => self.stages.to_ne_bytes().to_vec(),
            algo_config::INNER_SHAPE_ID => self.inner_shape.to_ne_bytes().to_vec(),
            algo_config::CLUSTER_SHAPE_ID => self.cluster_shape.to_ne_bytes().to_vec(),
            _ => return None,
        })
    }

    /// Stores a settable attribute; `value` has the size [`AlgoConfig::get`] gives it.
    fn set(&mut self, attr: u32, value: &[u8]) {
        let v32 = bytes_i32(value) as u32;
        let v16 = value.try_into().map(u16::from_ne_bytes).unwrap_or(0);
        match attr {
            algo_config::TILE_ID => self.tile = v32,
            algo_config::SPLITK_NUM => self.splitk = v32,
            algo_config::REDUCTION_SCHEME => self.reduction = v32,
            algo_config::CTA_SWIZZLING => self.swizzle = v32,
            algo_config::CUSTOM_OPTION => self.custom_option = v32,
            algo_config::STAGES_ID => self.stages = v32,
            algo_config::INNER_SHAPE_ID => self.inner_shape = v16,
            algo_config::CLUSTER_SHAPE_ID => self.cluster_shape = v16,
            _ => {}
        }
    }

    /// The rules `cublasLtMatmulAlgoCheck` and `cublasLtMatmul` apply to a configuration: only what the capabilities
    /// advertise ("CUBLAS_STATUS_NOT_SUPPORTED if algo configuration or data type combination is not currently
    /// supported on given device"). Returns the workspace in bytes the configuration needs for `problem`.
    fn check(&self, problem: &Problem) -> Result<u64, Refusal> {
        let AlgoConfig { tile, splitk, reduction, swizzle, custom_option, stages, inner_shape, cluster_shape } = *self;
        // CUBLASLT_ALGO_CAP_TILE_IDS: "tile ids possible to use"; UNDEFINED lets the library pick.
        if tile != values::TILE_UNDEFINED && !EMULATED_TILE_IDS.contains(&tile) {
            return not_supported(format!(
                "tile id {tile} is not one of the algorithm's CUBLASLT_ALGO_CAP_TILE_IDS {EMULATED_TILE_IDS:?} (or \
                 UNDEFINED)"
            ));
        }
        if stages != values::STAGES_UNDEFINED && !EMULATED_STAGES_IDS.contains(&stages) {
            return not_supported(format!(
                "stages id {stages} is not one of the algorithm's CUBLASLT_ALGO_CAP_STAGES_IDS {EMULATED_STAGES_IDS:?} \
                 (or UNDEFINED)"
            ));
        }
        // SPLITK_NUM: "number of K splits, if != 1, SPLITK_NUM parts of matrix multiplication will be computed in
        // parallel": at least one part, and no more parts than k has elements.
        let k = problem.k.max(1);
        if splitk == 0 || u64::from(splitk) > k {
            return not_supported(format!("SPLITK_NUM = {splitk}: the K splits must number 1 to k = {k}"));
        }
        // CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK: "if reduction scheme is not masked out it is supported"; one
        // scheme, not a combination.
        let single = [
            values::REDUCTION_NONE,
            values::REDUCTION_INPLACE,
            values::REDUCTION_COMPUTE_TYPE,
            values::REDUCTION_OUTPUT_TYPE,
        ]
        .contains(&reduction);
        if !single || reduction & !EMULATED_REDUCTION_SCHEME_MASK != 0 {
            return not_supported(format!(
                "REDUCTION_SCHEME = {reduction} is not one cublasLtReductionScheme_t within the algorithm's \
                 CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK {EMULATED_REDUCTION_SCHEME_MASK}"
            ));
        }
        // CUBLASLT_REDUCTION_SCHEME_NONE: "No reduction scheme, dot-product shall be performed in one sequence",
        // which K splits cannot be.
        if splitk > 1 && reduction == values::REDUCTION_NONE {
            return not_supported(format!(
                "SPLITK_NUM = {splitk} with REDUCTION_SCHEME NONE: the partial products need a reduction scheme"
            ));
        }
        // CTA_SWIZZLING: "possible values: 0, 1, other values reserved".
        if swizzle > 1 {
            return not_supported(format!("CTA_SWIZZLING = {swizzle}: only 0 and 1 are defined"));
        }
        if i64::from(custom_option) > i64::from(EMULATED_CUSTOM_OPTION_MAX) {
            return not_supported(format!(
                "CUSTOM_OPTION = {custom_option} exceeds CUBLASLT_ALGO_CAP_CUSTOM_OPTION_MAX = \
                 {EMULATED_CUSTOM_OPTION_MAX}"
            ));
        }
        if inner_shape != values::INNER_SHAPE_UNDEFINED {
            return not_supported(format!("INNER_SHAPE_ID = {inner_shape} (only UNDEFINED is emulated)"));
        }
        if !EMULATED_CLUSTER_SHAPES.contains(&cluster_shape) {
            return not_supported(format!(
                "CLUSTER_SHAPE_ID = {cluster_shape} is not emulated (only AUTO, 1x1x1, 2x1x1, 1x2x1: \
                 {EMULATED_CLUSTER_SHAPES:?})"
            ));
        }
        Ok(self.workspace(problem))
    }

    /// Workspace the configuration needs: the COMPUTE_TYPE and OUTPUT_TYPE schemes keep `splitk` partial m x n
    /// results "in the workspace and reduced in a separate step" (4 bytes an element: f32 compute, and no D type
    /// here is wider); NONE and INPLACE (which reduces in the output buffer) need none here.
    fn workspace(&self, problem: &Problem) -> u64 {
        let partials_in_workspace =
            self.reduction == values::REDUCTION_COMPUTE_TYPE || self.reduction == values::REDUCTION_OUTPUT_TYPE;
        if self.splitk <= 1 || !partials_in_workspace {
            return 0;
        }
        [problem.n, 4, u64::from(self.splitk)].into_iter().try_fold(problem.m, u64::checked_mul).unwrap_or(u64::MAX)
    }
}

/// What the emulator keeps in a `cublasLtMatmulAlgo_t`: a tag, the problem signature it was chosen for, the alignment
/// of A, B, C and D it needs (what the preference promised, up to 16 bytes: Hopper kernels load 16 bytes at a time,
/// so an algorithm chosen for 256-byte-aligned buffers fails on less than 16-byte-aligned ones), and its
/// configuration.
///
/// Words of `data`: 0 the tag, 1 the signature, 2 the alignments of A, B, C, D as u16s (A in the low bits), 3 tile id
/// (low half) and stages id (high half), 4 split-K and reduction scheme, 5 CTA swizzling and custom option, 6 inner
/// shape (bits 0-15) and cluster shape (bits 16-31), 7 zero. The algorithm id is the constant [`EMULATED_ALGO_ID`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlgoRecord {
    /// The problem's signature: compute, scale, A/B/D types and scale modes.
    pub signature: u64,
    /// Alignment in bytes each of A, B, C, D must have at `cublasLtMatmul`.
    pub alignment: [u64; 4],
    /// The configuration attributes.
    pub config: AlgoConfig,
}

const ALGO_TAG: u64 = 0x5357_5954_4c54_414c; // "SWYTLTAL"

impl AlgoRecord {
    fn encode(&self) -> MatmulAlgo {
        let c = &self.config;
        let alignment = self.alignment.iter().enumerate().fold(0u64, |word, (i, &a)| word | (a & 0xFFFF) << (16 * i));
        MatmulAlgo {
            data: [
                ALGO_TAG,
                self.signature,
                alignment,
                u64::from(c.tile) | u64::from(c.stages) << 32,
                u64::from(c.splitk) | u64::from(c.reduction) << 32,
                u64::from(c.swizzle) | u64::from(c.custom_option) << 32,
                u64::from(c.inner_shape) | u64::from(c.cluster_shape) << 16,
                0,
            ],
        }
    }

    /// Reads back an algorithm; `None` when it was not made by this emulator (wrong tag, or words no encoding
    /// produces).
    pub fn decode(algo: &MatmulAlgo) -> Option<AlgoRecord> {
        let [tag, signature, alignment, tile_stages, splitk_reduction, swizzle_custom, shapes, reserved] = algo.data;
        if tag != ALGO_TAG || reserved != 0 || shapes >> 32 != 0 {
            return None;
        }
        let alignment = [0, 1, 2, 3].map(|i| (alignment >> (16 * i)) & 0xFFFF);
        if !alignment.iter().all(|a| a.is_power_of_two()) {
            return None;
        }
        let (low, high) = (|word: u64| word as u32, |word: u64| (word >> 32) as u32);
        let config = AlgoConfig {
            tile: low(tile_stages),
            stages: high(tile_stages),
            splitk: low(splitk_reduction),
            reduction: high(splitk_reduction),
            swizzle: low(swizzle_custom),
            custom_option: high(swizzle_custom),
            inner_shape: shapes as u16,
            cluster_shape: (shapes >> 16) as u16,
        };
        Some(AlgoRecord { signature, alignment, config })
    }
}

/// The record of an algorithm passed by pointer to the algo functions.
///
/// # Safety
/// `algo` is null or readable for one `cublasLtMatmulAlgo_t`.
unsafe fn emulated_algo(algo: *const MatmulAlgo) -> Result<AlgoRecord, Refusal> {
    if algo.is_null() {
        return invalid("algo is NULL");
    }
    // SAFETY: non-null, and the caller's contract.
    let algo = unsafe { algo.read_unaligned() };
    AlgoRecord::decode(&algo)
        .map_or_else(|| invalid("algo was not made by this emulator (cublasLtMatmulAlgoGetHeuristic)"), Ok)
}

/// An algorithm given for `problem`: made by this emulator, for the same signature.
fn algo_for(algo: &MatmulAlgo, problem: &Problem) -> Result<AlgoRecord, Refusal> {
    let Some(record) = AlgoRecord::decode(algo) else {
        return invalid("algo was not made by this emulator (cublasLtMatmulAlgoGetHeuristic)");
    };
    // cublasLtMatmulAlgoCheck: "CUBLAS_STATUS_INVALID_VALUE if matrix layout descriptors or operation descriptor
    // don't match algo descriptor."
    if record.signature != problem.signature {
        return invalid("algo was chosen for other data / compute types or scale modes than this call's");
    }
    Ok(record)
}

/// The heuristic: the algorithm in each of its heuristic configurations ([`AlgoConfig::heuristic`]), when the problem
/// is supported for buffers of the preference's alignment.
fn heuristic(problem: &Problem, pref: &Preference) -> Result<Vec<AlgoRecord>, Refusal> {
    let formats = [problem.a.format, problem.b.format, problem.c.format, problem.d.format];
    let mut alignment = [0u64; 4];
    for (i, name) in ["A", "B", "C", "D"].iter().enumerate() {
        let promised = u64::from(pref.min_alignment[i]);
        let element = formats[i].size();
        // Tensor Core Usage: FP8 needs "intptr_t(A) % 16 == 0" (B, C likewise; D is written like C).
        let needed = if problem.a.format.is_fp8() { 16 } else { element };
        if promised < needed || !promised.is_power_of_two() {
            return not_supported(format!(
                "no algorithm for MIN_ALIGNMENT_{name}_BYTES = {promised}: this problem needs {needed}-byte aligned \
                 {name}"
            ));
        }
        alignment[i] = promised.min(16);
    }
    let records = (0..EMULATED_TILE_IDS.len()).map(|index| AlgoRecord {
        signature: problem.signature,
        alignment,
        config: AlgoConfig::heuristic(index),
    });
    Ok(records.collect())
}

/// `cublasLtMatmulAlgoGetHeuristic`: `min(requestedAlgoCount, 2)` results for a supported problem, the same algorithm
/// with tile ids [`EMULATED_TILE_IDS`] in that order (no workspace, state SUCCESS, wavesCount 1.0), else
/// `CUBLAS_STATUS_NOT_SUPPORTED` ("If no heuristic function available for current configuration") with
/// `*returnAlgoCount = 0`.
///
/// # Safety
/// `results` is valid for `requested` writes, `return_count` for one write (when not null).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cublasLtMatmulAlgoGetHeuristic(
    light_handle: *mut c_void,
    operation_desc: *mut c_void,
    a_desc: *mut c_void,
    b_desc: *mut c_void,
    c_desc: *mut c_void,
    d_desc: *mut c_void,
    pref: *mut c_void,
    requested: i32,
    results: *mut MatmulHeuristicResult,
    return_count: *mut i32,
) -> u32 {
    entry("cublasLtMatmulAlgoGetHeuristic", || {
        if !return_count.is_null() {
            // SAFETY: the caller's contract.
            unsafe { return_count.write(0) };
        }
        check_handle(light_handle)?;
        // "CUBLAS_STATUS_INVALID_VALUE: If requestedAlgoCount is less or equal to zero."
        if requested <= 0 {
            return invalid(format!("requestedAlgoCount = {requested}"));
        }
        if results.is_null() || return_count.is_null() {
            return invalid("heuristicResultsArray or returnAlgoCount is NULL");
        }
        let desc = desc(operation_desc)?;
        let layouts = [layout(a_desc, "A")?, layout(b_desc, "B")?, layout(c_desc, "C")?, layout(d_desc, "D")?];
        let pref = preference(pref)?;
        let [la, lb, lc, ld] = &layouts;
        let problem = check_problem(&desc, [la, lb, lc, ld], false)?;
        let records = heuristic(&problem, &pref)?;
        // "heuristicResultsArray: [...] ordered in increasing estimated compute time".
        let count = records.len().min(requested as usize);
        for (i, record) in records.iter().take(count).enumerate() {
            let result = MatmulHeuristicResult {
                algo: record.encode(),
                workspaceSize: 0,
                state: status::SUCCESS,
                wavesCount: 1.0,
                reserved: [0; 4],
            };
            // SAFETY: the caller's contract; i < count <= requested.
            unsafe { results.add(i).write(result) };
        }
        // SAFETY: the caller's contract.
        unsafe { return_count.write(count as i32) };
        Ok(())
    })
}

/// `cublasLtMatmulAlgoConfigGetAttribute`: "CUBLAS_STATUS_INVALID_VALUE if sizeInBytes is 0 and sizeWritten is
/// NULL, or if sizeInBytes is non-zero and buf is NULL or sizeInBytes doesn't match size of internal storage for
/// selected attribute" (the header's type: ID int32, INNER_SHAPE_ID and CLUSTER_SHAPE_ID uint16, the rest uint32).
/// An algorithm not made by this emulator is refused the same way.
///
/// # Safety
/// `algo` is null or readable for one `cublasLtMatmulAlgo_t`; `buf` null or valid for `size` bytes of writes;
/// `size_written` null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulAlgoConfigGetAttribute(
    algo: *const MatmulAlgo,
    attr: u32,
    buf: *mut c_void,
    size: usize,
    size_written: *mut usize,
) -> u32 {
    entry("cublasLtMatmulAlgoConfigGetAttribute", || {
        // SAFETY: forwarded contract.
        let record = unsafe { emulated_algo(algo) }?;
        let Some(value) = record.config.get(attr) else {
            return invalid(format!("unknown algo configuration attribute {attr}"));
        };
        // SAFETY: forwarded contract.
        unsafe { write_attr(&value, buf, size, size_written) }
    })
}

/// `cublasLtMatmulAlgoConfigSetAttribute`: "CUBLAS_STATUS_INVALID_VALUE if buf is NULL or sizeInBytes doesn't match
/// size of internal storage for selected attribute"; `CUBLASLT_ALGO_CONFIG_ID` is "readonly". Values are stored as
/// given: `cublasLtMatmulAlgoCheck` and `cublasLtMatmul` judge them.
///
/// # Safety
/// `algo` is null or valid for reading and writing one `cublasLtMatmulAlgo_t`; `buf` null or valid for `size` bytes
/// of reads.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulAlgoConfigSetAttribute(
    algo: *mut MatmulAlgo,
    attr: u32,
    buf: *const c_void,
    size: usize,
) -> u32 {
    entry("cublasLtMatmulAlgoConfigSetAttribute", || {
        // SAFETY: forwarded contract.
        let mut record = unsafe { emulated_algo(algo) }?;
        if attr == algo_config::ID {
            return invalid("CUBLASLT_ALGO_CONFIG_ID is read-only (\"readonly, set by cublasLtMatmulAlgoInit()\")");
        }
        let Some(expected) = record.config.get(attr).map(|value| value.len()) else {
            return invalid(format!("unknown algo configuration attribute {attr}"));
        };
        // SAFETY: forwarded contract.
        let value = unsafe { read_attr(buf, size, expected, &format!("algo configuration attribute {attr}")) }?;
        record.config.set(attr, &value);
        // SAFETY: non-null (emulated_algo checked), and the caller's contract.
        unsafe { algo.write_unaligned(record.encode()) };
        Ok(())
    })
}

/// `cublasLtMatmulAlgoCapGetAttribute`: what the emulated algorithm supports. SPLITK_SUPPORT 1, REDUCTION_SCHEME_MASK
/// [`EMULATED_REDUCTION_SCHEME_MASK`], CTA_SWIZZLING_SUPPORT 1, TILE_IDS [`EMULATED_TILE_IDS`], CUSTOM_OPTION_MAX 0,
/// STAGES_IDS [`EMULATED_STAGES_IDS`], MIN_ALIGNMENT_{A,B,C,D}_BYTES the alignment the algorithm was chosen for;
/// other capabilities are `CUBLAS_STATUS_NOT_SUPPORTED` ("not emulated"). Sizes as for
/// `cublasLtMatmulAlgoConfigGetAttribute`, except that the arrays (TILE_IDS, STAGES_IDS) fit any buffer at least as
/// large as they are: the header's own example passes `cublasLtMatmulTile_t tiles[CUBLASLT_MATMUL_TILE_END]` and
/// reads the count from `sizeWritten` ("use cublasLtMatmulAlgoCapGetAttribute() with sizeInBytes=0 to query actual
/// count").
///
/// # Safety
/// As for [`cublasLtMatmulAlgoConfigGetAttribute`].
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulAlgoCapGetAttribute(
    algo: *const MatmulAlgo,
    attr: u32,
    buf: *mut c_void,
    size: usize,
    size_written: *mut usize,
) -> u32 {
    entry("cublasLtMatmulAlgoCapGetAttribute", || {
        // SAFETY: forwarded contract.
        let record = unsafe { emulated_algo(algo) }?;
        let array = |ids: &[u32]| ids.iter().flat_map(|id| id.to_ne_bytes()).collect::<Vec<u8>>();
        let value = match attr {
            algo_cap::SPLITK_SUPPORT => 1i32.to_ne_bytes().to_vec(),
            algo_cap::REDUCTION_SCHEME_MASK => EMULATED_REDUCTION_SCHEME_MASK.to_ne_bytes().to_vec(),
            algo_cap::CTA_SWIZZLING_SUPPORT => 1u32.to_ne_bytes().to_vec(),
            algo_cap::CUSTOM_OPTION_MAX => EMULATED_CUSTOM_OPTION_MAX.to_ne_bytes().to_vec(),
            algo_cap::TILE_IDS | algo_cap::STAGES_IDS => {
                let ids = array(if attr == algo_cap::TILE_IDS { &EMULATED_TILE_IDS } else { &EMULATED_STAGES_IDS });
                // SAFETY: forwarded contract.
                return unsafe { write_array_attr(&ids, buf, size, size_written) };
            }
            algo_cap::MIN_ALIGNMENT_A_BYTES..=algo_cap::MIN_ALIGNMENT_D_BYTES => {
                let alignment = record.alignment[(attr - algo_cap::MIN_ALIGNMENT_A_BYTES) as usize];
                (alignment as u32).to_ne_bytes().to_vec()
            }
            _ => return not_supported(format!("algo capability attribute {attr} is not emulated")),
        };
        // SAFETY: forwarded contract.
        unsafe { write_attr(&value, buf, size, size_written) }
    })
}

/// `cublasLtMatmulAlgoCheck`: the problem checked as the heuristic and `cublasLtMatmul` check it, the algorithm
/// ("CUBLAS_STATUS_INVALID_VALUE if matrix layout descriptors or operation descriptor don't match algo descriptor")
/// and its configuration (the rules of [`AlgoConfig`]). On success writes the result's `workspaceSize` (for this
/// problem's m and n), `state` (SUCCESS) and `wavesCount` (1.0); its `algo` is left alone ("result structure to
/// report algo runtime characteristics; algo field is never updated", and `algo` "may point to result->algo"). No
/// pointers are given, so alignment is not checked: "CUBLAS_STATUS_SUCCESS doesn't fully guarantee algo will run
/// (will fail if e.g. buffers are not correctly aligned)"; the algorithm keeps the alignment it was chosen for.
///
/// # Safety
/// `algo` is null or readable for one `cublasLtMatmulAlgo_t`; `result` null or valid for writing one
/// `cublasLtMatmulHeuristicResult_t` (it may contain `*algo`).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cublasLtMatmulAlgoCheck(
    light_handle: *mut c_void,
    operation_desc: *mut c_void,
    a_desc: *mut c_void,
    b_desc: *mut c_void,
    c_desc: *mut c_void,
    d_desc: *mut c_void,
    algo: *const MatmulAlgo,
    result: *mut MatmulHeuristicResult,
) -> u32 {
    entry("cublasLtMatmulAlgoCheck", || {
        check_handle(light_handle)?;
        if algo.is_null() || result.is_null() {
            return invalid("algo or result is NULL");
        }
        let desc = desc(operation_desc)?;
        let layouts = [layout(a_desc, "A")?, layout(b_desc, "B")?, layout(c_desc, "C")?, layout(d_desc, "D")?];
        let [la, lb, lc, ld] = &layouts;
        let problem = check_problem(&desc, [la, lb, lc, ld], false)?;
        // SAFETY: non-null, and the caller's contract; read (copied) before anything is written to `result`.
        let algo = unsafe { algo.read_unaligned() };
        let record = algo_for(&algo, &problem)?;
        let workspace = record.config.check(&problem)?;
        // SAFETY: the caller's contract; field by field, never touching `result.algo`.
        unsafe {
            std::ptr::addr_of_mut!((*result).workspaceSize)
                .write_unaligned(usize::try_from(workspace).unwrap_or(usize::MAX));
            std::ptr::addr_of_mut!((*result).state).write_unaligned(status::SUCCESS);
            std::ptr::addr_of_mut!((*result).wavesCount).write_unaligned(1.0);
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Arithmetic.

/// Exact value of an OCP FP8 E4M3 code: bias 7, no infinities, S.1111.111 is NaN.
pub fn e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((code >> 3) & 0xF);
    let mantissa = f32::from(code & 0x7);
    if exponent == 0xF && code & 0x7 == 0x7 {
        return f32::NAN;
    }
    let magnitude =
        if exponent == 0 { mantissa * (2.0f32).powi(-9) } else { (8.0 + mantissa) * (2.0f32).powi(exponent - 10) };
    sign * magnitude
}

/// Exact value of an OCP FP8 E5M2 code: bias 15, IEEE-like infinities and NaNs.
pub fn e5m2_to_f32(code: u8) -> f32 {
    // E5M2 is the upper byte of an f16; f16 -> f32 by hand to stay dependency-free.
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((code >> 2) & 0x1F);
    let mantissa = f32::from(code & 0x3);
    if exponent == 0x1F {
        return if code & 0x3 == 0 { sign * f32::INFINITY } else { f32::NAN };
    }
    let magnitude =
        if exponent == 0 { mantissa * (2.0f32).powi(-16) } else { (4.0 + mantissa) * (2.0f32).powi(exponent - 17) };
    sign * magnitude
}

/// bf16 bits to f32 (exact).
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// f32 to bf16 bits, round to nearest even (NaN stays NaN).
pub fn f32_to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        return ((bits >> 16) as u16) | 0x40;
    }
    let rounding = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// Reads element `index` of a matrix of `format` at `base`.
///
/// # Safety
/// `base + index * size` is readable.
unsafe fn load(format: Format, base: u64, index: u64) -> f32 {
    let address = base + index * format.size();
    // SAFETY: the caller's contract; unaligned reads so a misaligned (already refused) pointer cannot fault.
    unsafe {
        match format {
            Format::F32 => std::ptr::read_unaligned(address as *const f32),
            Format::Bf16 => bf16_to_f32(std::ptr::read_unaligned(address as *const u16)),
            Format::E4m3 => e4m3_to_f32(std::ptr::read(address as *const u8)),
            Format::E5m2 => e5m2_to_f32(std::ptr::read(address as *const u8)),
        }
    }
}

/// Writes element `index` of D.
///
/// # Safety
/// `base + index * size` is writable.
unsafe fn store(format: Format, base: u64, index: u64, value: f64) {
    let address = base + index * format.size();
    // SAFETY: the caller's contract.
    unsafe {
        match format {
            Format::F32 => std::ptr::write_unaligned(address as *mut f32, value as f32),
            Format::Bf16 => std::ptr::write_unaligned(address as *mut u16, f32_to_bf16(value as f32)),
            // Refused by check_problem before any store.
            Format::E4m3 | Format::E5m2 => {}
        }
    }
}

/// The call's buffers and scalars.
#[derive(Debug, Clone, Copy)]
struct Buffers {
    a: u64,
    b: u64,
    c: u64,
    d: u64,
    alpha: f64,
    beta: f64,
    /// Per-row (m) and per-column (n) scale vectors with outer-vector scaling, else scalars (length 1).
    a_scale: u64,
    b_scale: u64,
    c_scale: f64,
}

/// Computes D. Columns of D are split over threads; each computes its columns into a private buffer, and D is
/// written after all have finished, so C may alias D.
///
/// # Safety
/// The buffers hold the matrices `problem` describes.
unsafe fn compute(problem: &Problem, buffers: &Buffers) {
    let Problem { m, n, k, a, b, c, d, outer_vector, .. } = *problem;
    // op(A) as m rows of k, op(B) as n rows of k, decoded once.
    let mut a_rows = vec![0f32; (m * k) as usize];
    for i in 0..m {
        for l in 0..k {
            // SAFETY: within A per the caller's contract.
            a_rows[(i * k + l) as usize] = unsafe { load(a.format, buffers.a, a.op_offset(i, l)) };
        }
    }
    let mut b_cols = vec![0f32; (n * k) as usize];
    for j in 0..n {
        for l in 0..k {
            // SAFETY: within B.
            b_cols[(j * k + l) as usize] = unsafe { load(b.format, buffers.b, b.op_offset(l, j)) };
        }
    }
    // SAFETY: the scale pointers hold m, n or 1 f32s (checked non-null by the caller where required).
    let scale = |pointer: u64, index: u64| -> f64 {
        if pointer == 0 {
            1.0
        } else {
            f64::from(unsafe { std::ptr::read_unaligned((pointer as *const f32).add(index as usize)) })
        }
    };
    let a_scales: Vec<f64> = (0..m).map(|i| scale(buffers.a_scale, if outer_vector { i } else { 0 })).collect();
    let b_scales: Vec<f64> = (0..n).map(|j| scale(buffers.b_scale, if outer_vector { j } else { 0 })).collect();
    let c_factor = buffers.beta * buffers.c_scale;
    let read_c = buffers.beta != 0.0;
    let column = |j: u64| -> Vec<f64> {
        (0..m)
            .map(|i| {
                let row = &a_rows[(i * k) as usize..((i + 1) * k) as usize];
                let col = &b_cols[(j * k) as usize..((j + 1) * k) as usize];
                let sum: f64 = row.iter().zip(col).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
                let mut value = buffers.alpha * a_scales[i as usize] * b_scales[j as usize] * sum;
                if read_c {
                    // SAFETY: within C.
                    value += c_factor * f64::from(unsafe { load(c.format, buffers.c, c.offset(i, j)) });
                }
                value
            })
            .collect()
    };
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n as usize).max(1);
    let work = m * n * k.max(1);
    let columns: Vec<Vec<f64>> = if threads == 1 || work < (1 << 18) {
        (0..n).map(column).collect()
    } else {
        let per_thread = n.div_ceil(threads as u64);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads as u64)
                .map(|t| {
                    let column = &column;
                    let range = (t * per_thread).min(n)..((t + 1) * per_thread).min(n);
                    scope.spawn(move || range.map(column).collect::<Vec<_>>())
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
        })
    };
    for (j, values) in columns.iter().enumerate() {
        for (i, &value) in values.iter().enumerate() {
            // SAFETY: within D.
            unsafe { store(d.format, buffers.d, d.offset(i as u64, j as u64), value) };
        }
    }
}

/// Reads an f32 scalar (alpha, beta, or a tensorwide scale).
///
/// # Safety
/// `pointer` is null or readable for 4 bytes.
unsafe fn read_scalar(pointer: u64, name: &str) -> Result<f64, Refusal> {
    if pointer == 0 {
        return invalid(format!("{name} is NULL"));
    }
    // SAFETY: the caller's contract.
    Ok(f64::from(unsafe { std::ptr::read_unaligned(pointer as *const f32) }))
}

/// `cublasLtMatmul`: checks as the heuristic does, then the call's own rules (the algorithm and its configuration as
/// `cublasLtMatmulAlgoCheck` judges them, the workspace the configuration needs, pointer alignment, scale pointers),
/// then computes D synchronously (the stream is not used: all emulated work is synchronous).
///
/// # Safety
/// `alpha`/`beta` point to f32 (host or "device" memory, both host here); A, B, C, D, the workspace and any scale
/// pointers set on the descriptor address buffers of the sizes the layouts describe.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cublasLtMatmul(
    light_handle: *mut c_void,
    compute_desc: *mut c_void,
    alpha: *const c_void,
    a: *const c_void,
    a_desc: *mut c_void,
    b: *const c_void,
    b_desc: *mut c_void,
    beta: *const c_void,
    c: *const c_void,
    c_desc: *mut c_void,
    d: *mut c_void,
    d_desc: *mut c_void,
    algo: *const MatmulAlgo,
    workspace: *mut c_void,
    workspace_size: usize,
    _stream: *mut c_void,
) -> u32 {
    entry("cublasLtMatmul", || {
        check_handle(light_handle)?;
        let desc = desc(compute_desc)?;
        let layouts = [layout(a_desc, "A")?, layout(b_desc, "B")?, layout(c_desc, "C")?, layout(d_desc, "D")?];
        let [la, lb, lc, ld] = &layouts;
        let pointers = [a as u64, b as u64, c as u64, d as u64];
        let problem = check_problem(&desc, [la, lb, lc, ld], pointers[2] == pointers[3])?;
        // "algo: [...] When NULL, an implicit heuristics query with default search preferences will be performed".
        let record = if algo.is_null() {
            heuristic(&problem, &Preference::default())?[0]
        } else {
            // SAFETY: non-null, and the caller's contract.
            algo_for(&unsafe { algo.read_unaligned() }, &problem)?
        };
        // The configuration as cublasLtMatmulAlgoCheck judges it ("if cublasLtMatmulAlgoCheck fails, the algo will
        // not run"), and its workspace: "CUBLAS_STATUS_INVALID_VALUE [...] For example, when workspaceSizeInBytes is
        // less than workspace required by the configured algo."
        let workspace_needed = record.config.check(&problem)?;
        if (workspace_size as u64) < workspace_needed {
            return invalid(format!(
                "workspaceSizeInBytes = {workspace_size} is less than the {workspace_needed} bytes the algorithm needs \
                 (split-K {} with reduction scheme {})",
                record.config.splitk, record.config.reduction
            ));
        }
        if workspace_needed > 0 && workspace.is_null() {
            return invalid(format!("workspace is NULL but the algorithm needs {workspace_needed} bytes of it"));
        }
        // Alignment: what the algorithm was chosen for (cublasLtMatmulAlgoCheck: "The algo will fail if, for
        // example, the buffers are not correctly aligned"), and for FP8 Tensor Core Usage's "intptr_t(A) % 16 == 0".
        for (i, name) in ["A", "B", "C", "D"].iter().enumerate() {
            let needed = record.alignment[i];
            if pointers[i] == 0 && (i < 2 || problem.m * problem.n > 0) {
                return invalid(format!("{name} is NULL"));
            }
            if pointers[i] % needed != 0 {
                return invalid(format!(
                    "{name} = {:#x} is not {needed}-byte aligned, as the algorithm (or FP8) requires",
                    pointers[i]
                ));
            }
        }
        // "The workspace pointer must be aligned to at least a multiple of 256 bytes."
        if !workspace.is_null() && workspace_size > 0 && (workspace as u64) % 256 != 0 {
            return invalid(format!("workspace {workspace:p} is not 256-byte aligned"));
        }
        // SAFETY: alpha and beta point to f32 per the contract (the scale type is CUDA_R_32F).
        let (alpha, beta) = unsafe { (read_scalar(alpha as u64, "alpha")?, read_scalar(beta as u64, "beta")?) };
        let a_scale = desc.u64(desc_attr::A_SCALE_POINTER);
        let b_scale = desc.u64(desc_attr::B_SCALE_POINTER);
        let c_scale_pointer = desc.u64(desc_attr::C_SCALE_POINTER);
        if problem.outer_vector {
            // "When using this scaling mode, the scale_A and scale_B must be vectors of length M and N".
            for (pointer, name) in [(a_scale, "A_SCALE_POINTER"), (b_scale, "B_SCALE_POINTER")] {
                if pointer == 0 {
                    return invalid(format!("outer-vector scaling with {name} unset"));
                }
                if pointer % 4 != 0 {
                    return invalid(format!("{name} = {pointer:#x} is not 4-byte aligned"));
                }
            }
        }
        if desc.u64(desc_attr::D_SCALE_POINTER) != 0 {
            // Outer vector: "scale_D is not supported because the only supported precisions for D are CUDA_R_16F,
            // CUDA_R_16BF, and CUDA_R_32F"; for tensorwide FP8 with a wide D it is an unsupported combination too
            // (D_SCALE_POINTER "If set for an unsupported matrix data, scale, and compute type combination, calling
            // cublasLtMatmul() will return CUBLAS_INVALID_VALUE").
            return invalid("D_SCALE_POINTER is set but D is not an FP8 matrix");
        }
        if desc.u64(desc_attr::AMAX_D_POINTER) != 0 {
            return not_supported("AMAX_D_POINTER is not emulated");
        }
        let c_scale = if c_scale_pointer == 0 {
            1.0
        } else {
            // SAFETY: a set C scale pointer addresses one f32.
            unsafe { read_scalar(c_scale_pointer, "C_SCALE_POINTER") }?
        };
        let buffers = Buffers {
            a: pointers[0],
            b: pointers[1],
            c: pointers[2],
            d: pointers[3],
            alpha,
            beta,
            a_scale,
            b_scale,
            c_scale,
        };
        if workspace_needed > 0 {
            // A split-K kernel writes its partial sums to the workspace: so does this emulator (all bits set, NaN as
            // f32), so a workspace shorter than declared or shared with live data shows here too.
            // SAFETY: workspace is valid for workspace_size >= needed bytes per the caller's contract.
            unsafe { std::ptr::write_bytes(workspace.cast::<u8>(), 0xFF, workspace_needed as usize) };
        }
        // Split-K and the other configuration attributes change the order of a GPU's additions, not this
        // emulator's: every configuration sums in f64 in ascending k and rounds once, so all give the same D.
        // SAFETY: the caller's contract on the buffers' sizes.
        unsafe { compute(&problem, &buffers) };
        Ok(())
    })
}
