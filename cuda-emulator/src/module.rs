//! Modules, functions and launches. cuModuleLoadData takes the PTX our code compiled with the real NVRTC and keeps
//! only its entry points (names, parameter sizes, `.maxntid` launch bounds); cuModuleGetFunction pairs an entry with
//! the kernel of the same name compiled as C++ into this library (cpp/kernels_*.cpp) after checking that the PTX and
//! the C++ agree on the parameters. cuLaunchKernel checks what the driver checks (dimensions, launch bounds, shared
//! memory) and more (every pointer argument must point into a live allocation), runs the grid synchronously
//! (cpp/runtime.cpp), then checks the allocations' red zones.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::Mutex;

use crate::driver::{check_context, check_stream, lock, new_handle, CUstream, DEFAULT_SHARED_LIMIT, MAX_SHARED_OPTIN};
use crate::error::{code, guard, write_out, CUresult, EmuError};
use crate::memory::{check_red_zones, is_valid_kernel_pointer};
use crate::runtime::{self, KernelInfo};

/// cudarc's `sys::CUmodule` (opaque).
pub type CUmodule = *mut c_void;
/// cudarc's `sys::CUfunction` (opaque).
pub type CUfunction = *mut c_void;

/// One `.entry` of a PTX module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtxEntry {
    /// The kernel's name.
    pub name: String,
    /// The size in bytes of each parameter, in order.
    pub params: Vec<usize>,
    /// `.maxntid` or `.reqntid` (the product of its dimensions): the most threads a block may have.
    pub max_threads: Option<u32>,
    /// Bytes of `.shared` variables the entry (or a function it calls) uses: they count against the same 48 KiB
    /// as the launch's dynamic shared memory.
    pub static_shared: usize,
}

/// The size of one PTX `.param` declaration, e.g. `.param .u64 .ptr .align 1 k_param_0` (8) or
/// `.param .align 4 .b8 k_param_1[12]` (12).
fn param_size(declaration: &str) -> Option<usize> {
    let mut element = None;
    for token in declaration.split_whitespace() {
        element = match token {
            ".u8" | ".s8" | ".b8" => Some(1),
            ".u16" | ".s16" | ".b16" | ".f16" => Some(2),
            ".u32" | ".s32" | ".b32" | ".f32" => Some(4),
            ".u64" | ".s64" | ".b64" | ".f64" => Some(8),
            _ => continue,
        };
    }
    let element = element?;
    let count = match (declaration.find('['), declaration.find(']')) {
        (Some(open), Some(close)) if open < close => declaration[open + 1..close].trim().parse().ok()?,
        _ => 1,
    };
    Some(element * count)
}

/// Whether `text` mentions the identifier `name` (not as part of a longer identifier).
fn mentions(text: &str, name: &str) -> bool {
    let identifier = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '$' || c == '.';
    text.match_indices(name).any(|(at, _)| {
        let before = text[..at].chars().next_back().is_none_or(|c| !identifier(c));
        let after = text[at + name.len()..].chars().next().is_none_or(|c| !identifier(c));
        before && after
    })
}

/// The text between the `{` at `open` and its matching `}`.
fn block_at(text: &str, open: usize) -> &str {
    let mut depth = 0usize;
    for (i, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &text[open..open + i + 1];
                }
            }
            _ => {}
        }
    }
    &text[open..]
}

/// The `.shared` variables a PTX text declares (not the `.extern` dynamic ones): name and size in bytes.
fn shared_variables(ptx: &str) -> Vec<(String, usize)> {
    ptx.lines()
        .map(str::trim)
        .filter(|line| line.starts_with(".shared"))
        .filter_map(|line| {
            let declaration = line.trim_end_matches(';');
            let name = declaration.split_whitespace().last()?.split('[').next()?.to_owned();
            Some((name, param_size(declaration)?))
        })
        .collect()
}

/// The bodies of the `.func` definitions of a PTX text, by name (a call may hide shared memory use in one).
fn function_bodies(ptx: &str) -> Vec<(String, &str)> {
    let mut bodies = Vec::new();
    for (at, _) in ptx.match_indices(".func ") {
        let mut after = ptx[at + ".func ".len()..].trim_start();
        if after.starts_with('(') {
            // The return value's parameter list.
            after = after.find(')').map_or("", |close| after[close + 1..].trim_start());
        }
        let Some(open) = after.find('(') else { continue };
        let name = after[..open].trim().to_owned();
        let start = ptx.len() - after.len();
        // Past the parameter list, a body starts with `{`; a declaration (prototype) ends with `;` first.
        let Some(close) = ptx[start..].find(')').map(|c| start + c) else { continue };
        let Some(brace) = ptx[close..].find(['{', ';']).map(|b| close + b) else { continue };
        if ptx[brace..].starts_with(';') {
            continue;
        }
        bodies.push((name, block_at(ptx, brace)));
    }
    bodies
}

/// The `.entry` points of a PTX text with their parameter sizes, launch bounds and static shared memory.
pub fn parse_ptx_entries(ptx: &str) -> Result<Vec<PtxEntry>, String> {
    let shared = shared_variables(ptx);
    let functions = function_bodies(ptx);
    let mut entries = Vec::new();
    let mut rest = ptx;
    while let Some(at) = rest.find(".entry ") {
        let after = &rest[at + ".entry ".len()..];
        let open = after.find('(').ok_or("an .entry without a parameter list")?;
        let name = after[..open].trim().to_owned();
        let close = after.find(')').ok_or_else(|| format!(".entry {name}: unterminated parameter list"))?;
        let mut params = Vec::new();
        for declaration in after[open + 1..close].split(',').map(str::trim).filter(|d| !d.is_empty()) {
            params.push(param_size(declaration).ok_or_else(|| format!(".entry {name}: cannot size `{declaration}`"))?);
        }
        // Performance directives sit between the parameter list and the body.
        let brace = after[close..].find('{').map_or(after.len(), |b| close + b);
        let directives = &after[close + 1..brace];
        let mut max_threads = None;
        for directive in [".maxntid", ".reqntid"] {
            if let Some(d) = directives.find(directive) {
                let values = directives[d + directive.len()..].lines().next().unwrap_or("");
                let product = values
                    .split(',')
                    .map(|v| v.trim().trim_end_matches(';').parse::<u32>())
                    .try_fold(1u32, |acc, v| v.map(|v| acc.saturating_mul(v)))
                    .map_err(|_| format!(".entry {name}: cannot read `{directive}{values}`"))?;
                max_threads = Some(max_threads.map_or(product, |m: u32| m.min(product)));
            }
        }
        let body = if brace < after.len() { block_at(after, brace) } else { "" };
        // The bodies this entry runs: its own and, transitively, those of the functions it mentions.
        let mut reached = vec![body];
        let mut seen: Vec<&str> = Vec::new();
        while let Some(text) = reached.pop() {
            for (function, function_body) in &functions {
                if !seen.contains(&function.as_str()) && mentions(text, function) {
                    seen.push(function);
                    reached.push(function_body);
                }
            }
        }
        let bodies: Vec<&str> = std::iter::once(body)
            .chain(functions.iter().filter(|(f, _)| seen.contains(&f.as_str())).map(|(_, b)| *b))
            .collect();
        let static_shared = shared
            .iter()
            .filter(|(variable, _)| bodies.iter().any(|b| mentions(b, variable)))
            .map(|(_, size)| size)
            .sum();
        entries.push(PtxEntry { name, params, max_threads, static_shared });
        rest = &after[(brace + body.len()).min(after.len())..];
    }
    Ok(entries)
}

struct Module {
    entries: Vec<PtxEntry>,
    functions: HashMap<String, usize>,
}

struct Function {
    name: String,
    kernel: KernelInfo,
    max_threads: u32,
    /// Static shared memory (from the PTX).
    static_shared: c_int,
    /// CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: 48 KiB less the static shared memory until raised.
    max_dynamic_shared: c_int,
}

#[derive(Default)]
struct Registry {
    modules: HashMap<usize, Module>,
    functions: HashMap<usize, Function>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);
/// Launches run one at a time (the kernels' `__shared__` variables are statics of the block being run).
static LAUNCH: Mutex<()> = Mutex::new(());

fn with_registry<R>(f: impl FnOnce(&mut Registry) -> Result<R, EmuError>) -> Result<R, EmuError> {
    let mut registry = lock(&REGISTRY);
    f(registry.get_or_insert_with(Registry::default))
}

// ---- exported: modules and functions --------------------------------------------------------------------------------

/// cuModuleLoadData: `image` must be PTX text (NUL-terminated); its `.entry` points become the module's functions.
///
/// # Safety
/// `module` must be valid for a write; `image` must be a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut CUmodule, image: *const c_void) -> CUresult {
    guard("cuModuleLoadData", || {
        check_context()?;
        if image.is_null() {
            return Err(EmuError::invalid("image is a null pointer"));
        }
        // SAFETY: a NUL-terminated PTX string (the caller's contract).
        let text = unsafe { CStr::from_ptr(image as *const c_char) };
        let text = text.to_str().map_err(|_| {
            EmuError::new(code::INVALID_IMAGE, "the image is not PTX text (cubins and fatbins are not emulated)")
        })?;
        if !text.contains(".version") || !text.contains(".target") {
            return Err(EmuError::new(code::INVALID_IMAGE, "the image is not PTX (no .version / .target)"));
        }
        let entries = parse_ptx_entries(text).map_err(|e| EmuError::new(code::INVALID_IMAGE, e))?;
        let handle = new_handle();
        // SAFETY: the caller's contract.
        unsafe { write_out(module, "module", handle as CUmodule)? };
        with_registry(|r| {
            r.modules.insert(handle, Module { entries, functions: HashMap::new() });
            Ok(())
        })
    })
}

/// cuModuleUnload: the module and its functions become invalid.
#[no_mangle]
pub extern "C" fn cuModuleUnload(module: CUmodule) -> CUresult {
    guard("cuModuleUnload", || {
        check_context()?;
        with_registry(|r| {
            let removed = r
                .modules
                .remove(&(module as usize))
                .ok_or_else(|| EmuError::new(code::INVALID_HANDLE, format!("module {module:?} is not loaded")))?;
            for function in removed.functions.values() {
                r.functions.remove(function);
            }
            Ok(())
        })
    })
}

/// cuModuleGetFunction: the module's PTX must declare `.entry name`, the emulator must have the C++ build of it,
/// and the two must agree on the parameters.
///
/// # Safety
/// `function` must be valid for a write; `name` must be a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    function: *mut CUfunction,
    module: CUmodule,
    name: *const c_char,
) -> CUresult {
    guard("cuModuleGetFunction", || {
        check_context()?;
        if name.is_null() {
            return Err(EmuError::invalid("name is a null pointer"));
        }
        // SAFETY: NUL-terminated (the caller's contract).
        let name = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
        let handle = with_registry(|r| {
            let module_id = module as usize;
            let loaded = r
                .modules
                .get_mut(&module_id)
                .ok_or_else(|| EmuError::new(code::INVALID_HANDLE, format!("module {module:?} is not loaded")))?;
            if let Some(&existing) = loaded.functions.get(&name) {
                return Ok(existing);
            }
            let entry = loaded
                .entries
                .iter()
                .find(|e| e.name == name)
                .ok_or_else(|| EmuError::new(code::NOT_FOUND, format!("the module's PTX has no .entry {name}")))?;
            let kernel = runtime::kernel(&name).ok_or_else(|| {
                EmuError::new(
                    code::NOT_FOUND,
                    format!("kernel {name} is in the PTX but has no C++ build in the emulator"),
                )
            })?;
            let sizes: Vec<usize> = kernel.params.iter().map(|p| p.size).collect();
            if sizes != entry.params {
                return Err(EmuError::new(
                    code::INVALID_IMAGE,
                    format!(
                        "kernel {name}: the PTX's parameter sizes {:?} differ from its C++ build's {sizes:?}",
                        entry.params
                    ),
                ));
            }
            let handle = new_handle();
            let max_threads = entry.max_threads.unwrap_or(1024).min(1024);
            let static_shared = c_int::try_from(entry.static_shared).unwrap_or(c_int::MAX);
            if static_shared > DEFAULT_SHARED_LIMIT {
                return Err(EmuError::new(
                    code::INVALID_IMAGE,
                    format!("kernel {name}: {static_shared} bytes of static shared memory exceed 48 KiB"),
                ));
            }
            loaded.functions.insert(name.clone(), handle);
            let function = Function {
                name: name.clone(),
                kernel,
                max_threads,
                static_shared,
                max_dynamic_shared: DEFAULT_SHARED_LIMIT - static_shared,
            };
            r.functions.insert(handle, function);
            Ok(handle)
        })?;
        // SAFETY: the caller's contract.
        unsafe { write_out(function, "hfunc", handle as CUfunction) }
    })
}

fn with_function<R>(function: CUfunction, f: impl FnOnce(&mut Function) -> Result<R, EmuError>) -> Result<R, EmuError> {
    with_registry(|r| {
        let found = r
            .functions
            .get_mut(&(function as usize))
            .ok_or_else(|| EmuError::new(code::INVALID_HANDLE, format!("function {function:?} is not loaded")))?;
        f(found)
    })
}

/// cuFuncGetAttribute
///
/// # Safety
/// `value` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(value: *mut c_int, attrib: c_int, function: CUfunction) -> CUresult {
    guard("cuFuncGetAttribute", || {
        check_context()?;
        let answer = with_function(function, |f| {
            Ok(match attrib {
                0 => f.max_threads as c_int, // MAX_THREADS_PER_BLOCK
                1 => f.static_shared,        // SHARED_SIZE_BYTES
                2 | 3 => 0,                  // CONST / LOCAL_SIZE_BYTES: not known from PTX
                4 => 32,                     // NUM_REGS
                5 | 6 => 90,                 // PTX_VERSION, BINARY_VERSION
                8 => f.max_dynamic_shared,   // MAX_DYNAMIC_SHARED_SIZE_BYTES
                9 => -1,                     // PREFERRED_SHARED_MEMORY_CARVEOUT
                7 | 10..=17 => 0,
                _ => return Err(EmuError::invalid(format!("no function attribute {attrib}"))),
            })
        })?;
        // SAFETY: the caller's contract.
        unsafe { write_out(value, "pi", answer) }
    })
}

/// cuFuncSetAttribute: MAX_DYNAMIC_SHARED_SIZE_BYTES up to the opt-in limit; the carveout is accepted.
#[no_mangle]
pub extern "C" fn cuFuncSetAttribute(function: CUfunction, attrib: c_int, value: c_int) -> CUresult {
    guard("cuFuncSetAttribute", || {
        check_context()?;
        with_function(function, |f| match attrib {
            8 if (0..=MAX_SHARED_OPTIN - f.static_shared).contains(&value) => {
                f.max_dynamic_shared = value;
                Ok(())
            }
            8 => Err(EmuError::invalid(format!(
                "dynamic shared memory {value} plus the static {} exceed the {MAX_SHARED_OPTIN} opt-in",
                f.static_shared
            ))),
            9 => Ok(()),
            _ => Err(EmuError::invalid(format!("function attribute {attrib} cannot be set here"))),
        })
    })
}

/// cuFuncSetCacheConfig: accepted.
#[no_mangle]
pub extern "C" fn cuFuncSetCacheConfig(function: CUfunction, _config: c_int) -> CUresult {
    guard("cuFuncSetCacheConfig", || {
        check_context()?;
        with_function(function, |_| Ok(()))
    })
}

// ---- exported: launch ---------------------------------------------------------------------------------------------

/// A launch's geometry as cuLaunchKernel takes it.
struct Geometry {
    grid: [c_uint; 3],
    block: [c_uint; 3],
    shared_bytes: c_uint,
}

fn check_geometry(name: &str, geometry: &Geometry, max_threads: u32, max_shared: c_int) -> Result<(), EmuError> {
    let Geometry { grid, block, shared_bytes } = geometry;
    let grid_limits = [i32::MAX as u32, 65535, 65535];
    if grid.iter().zip(grid_limits).any(|(&g, limit)| g == 0 || g > limit) {
        return Err(EmuError::invalid(format!("{name}: grid {grid:?} out of range (1..=2^31-1, 65535, 65535)")));
    }
    if block.iter().zip([1024, 1024, 64]).any(|(&b, limit)| b == 0 || b > limit) {
        return Err(EmuError::invalid(format!("{name}: block {block:?} out of range (1..=1024, 1024, 64)")));
    }
    let threads = block.iter().map(|&b| u64::from(b)).product::<u64>();
    if threads > 1024 {
        return Err(EmuError::invalid(format!("{name}: {threads} threads per block exceed 1024")));
    }
    if threads > u64::from(max_threads) {
        return Err(EmuError::new(
            code::LAUNCH_OUT_OF_RESOURCES,
            format!("{name}: {threads} threads per block exceed its launch bounds ({max_threads}, .maxntid)"),
        ));
    }
    if i64::from(*shared_bytes) > i64::from(max_shared) {
        return Err(EmuError::invalid(format!(
            "{name}: {shared_bytes} bytes of dynamic shared memory exceed the function's limit {max_shared} (48 KiB \
             less its static shared memory unless CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES raised it)"
        )));
    }
    Ok(())
}

/// Checks each pointer argument: null or inside a live allocation (a host pointer or a freed buffer would fault on
/// the GPU).
///
/// # Safety
/// `params` must hold one valid pointer per parameter of `kernel`.
unsafe fn check_pointer_arguments(name: &str, kernel: &KernelInfo, params: *mut *mut c_void) -> Result<(), EmuError> {
    if kernel.params.is_empty() {
        return Ok(());
    }
    if params.is_null() {
        return Err(EmuError::invalid(format!(
            "{name}: kernelParams is null but the kernel takes {} parameters",
            kernel.params.len()
        )));
    }
    for (index, param) in kernel.params.iter().enumerate() {
        // SAFETY: one pointer per parameter (the caller's contract).
        let slot = unsafe { *params.add(index) };
        if slot.is_null() {
            return Err(EmuError::invalid(format!("{name}: kernelParams[{index}] is null")));
        }
        if !param.pointer {
            continue;
        }
        // SAFETY: a pointer parameter is 8 bytes, what kernelParams[index] points at.
        let address = unsafe { (slot as *const u64).read_unaligned() };
        if address != 0 && !is_valid_kernel_pointer(address) {
            return Err(EmuError::new(
                code::ILLEGAL_ADDRESS,
                format!("{name}: parameter {index} is 0x{address:x}, not inside any live device allocation"),
            ));
        }
    }
    Ok(())
}

/// cuLaunchKernel: runs the grid to completion before returning.
///
/// # Safety
/// `kernel_params` must hold one valid pointer per kernel parameter, each to a value of the parameter's type.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cuLaunchKernel(
    function: CUfunction,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    shared_bytes: c_uint,
    stream: CUstream,
    kernel_params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    guard("cuLaunchKernel", || {
        check_stream(stream)?;
        if !extra.is_null() {
            return Err(EmuError::new(code::NOT_SUPPORTED, "the `extra` parameter form is not emulated"));
        }
        let (name, kernel, max_threads, max_shared) =
            with_function(function, |f| Ok((f.name.clone(), f.kernel.clone(), f.max_threads, f.max_dynamic_shared)))?;
        let geometry = Geometry { grid: [grid_x, grid_y, grid_z], block: [block_x, block_y, block_z], shared_bytes };
        check_geometry(&name, &geometry, max_threads, max_shared)?;
        // SAFETY: the caller's contract.
        unsafe { check_pointer_arguments(&name, &kernel, kernel_params)? };
        let _serialised = lock(&LAUNCH);
        // SAFETY: dimensions checked, kernelParams holds the kernel's arguments (the caller's contract).
        unsafe { runtime::launch(&kernel, geometry.grid, geometry.block, shared_bytes, kernel_params) }
            .map_err(|e| EmuError::new(e.code, format!("{name}: {}", e.message)))?;
        check_red_zones().map_err(|e| EmuError::new(e.code, format!("after {name}: {}", e.message)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC's shape of PTX: `.visible .entry`, one `.param` a line, performance directives before the body.
    const PTX: &str = "
.version 8.8
.target sm_90
.address_size 64

.shared .align 4 .b8 _ZZ10block_amaxfE8warp_max[128];
.shared .align 4 .b8 helper_scratch[64];
.shared .align 4 .b8 unused_elsewhere[4096];
.extern .shared .align 16 .b8 dynamic[];

.func  (.param .b32 func_retval0) helper(
\t.param .b32 helper_param_0
)
;

.func  (.param .b32 func_retval0) helper(
\t.param .b32 helper_param_0
)
{
\tmov.u32 \t%r1, helper_scratch;
\tret;
}

.visible .entry fp8_grouped_gemm_small(
\t.param .u64 .ptr .align 1 fp8_grouped_gemm_small_param_0,
\t.param .u32 fp8_grouped_gemm_small_param_1,
\t.param .f32 fp8_grouped_gemm_small_param_2,
\t.param .align 8 .b8 fp8_grouped_gemm_small_param_3[24]
)
.maxntid 256, 1, 1
.minnctapersm 2
{
\t.reg .pred \t%p<3>;
\tmov.u32 \t%r2, _ZZ10block_amaxfE8warp_max;
\tcall.uni (retval0), helper, (param0);
\tret;
}

.visible .entry no_params()
{
\tret;
}
";

    #[test]
    fn entries_parameters_and_launch_bounds_are_read_from_ptx() {
        let entries = parse_ptx_entries(PTX).expect("parses");
        assert_eq!(
            entries,
            [
                PtxEntry {
                    name: "fp8_grouped_gemm_small".into(),
                    params: vec![8, 4, 4, 24],
                    max_threads: Some(256),
                    static_shared: 128 + 64,
                },
                PtxEntry { name: "no_params".into(), params: vec![], max_threads: None, static_shared: 0 },
            ]
        );
    }

    #[test]
    fn an_unsized_parameter_is_an_error_not_a_guess() {
        let error = parse_ptx_entries(".entry k(\n\t.param .weird k_param_0\n)\n{\n}\n").expect_err("unsized");
        assert!(error.contains("cannot size"), "{error}");
    }
}
