//! The C++ side (cpp/runtime.cpp): the kernel registry and the launch entry point.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

use crate::error::{CUresult, EmuError};

extern "C" {
    fn switchyard_emu_kernel_count() -> c_int;
    fn switchyard_emu_kernel_name(kernel: c_int) -> *const c_char;
    fn switchyard_emu_kernel_param_count(kernel: c_int) -> c_int;
    fn switchyard_emu_kernel_param(kernel: c_int, param: c_int, size: *mut usize, is_pointer: *mut c_int) -> c_int;
    fn switchyard_emu_launch(
        kernel: c_int,
        grid: *const c_uint,
        block: *const c_uint,
        shared_bytes: c_uint,
        kernel_params: *const *mut c_void,
        message: *mut c_char,
        message_len: usize,
    ) -> c_int;
    fn switchyard_emu_mma_m16n8k32_e4m3_f32(
        a: *const [u32; 4],
        b: *const [u32; 2],
        c: *const [f32; 4],
        d: *mut [f32; 4],
    );
    fn switchyard_emu_e4m3_to_f32(code: u8) -> f32;
}

/// The warp MMA of cpp/mma.cpp (`mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32`) on the whole warp's
/// fragments: lane `l`'s A, B and C registers in, its D registers out.
pub fn warp_mma_m16n8k32_e4m3(a: &[[u32; 4]; 32], b: &[[u32; 2]; 32], c: &[[f32; 4]; 32]) -> [[f32; 4]; 32] {
    let mut d = [[0f32; 4]; 32];
    // SAFETY: every array holds the 32 lanes the function reads or writes.
    unsafe { switchyard_emu_mma_m16n8k32_e4m3_f32(a.as_ptr(), b.as_ptr(), c.as_ptr(), d.as_mut_ptr()) };
    d
}

/// An E4M3 code's value as cpp/mma.cpp decodes it.
pub fn e4m3_to_f32(code: u8) -> f32 {
    // SAFETY: a pure function of a byte.
    unsafe { switchyard_emu_e4m3_to_f32(code) }
}

/// One parameter of a C++-built kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param {
    /// Its size in bytes.
    pub size: usize,
    /// Whether it is a pointer (checked against the live allocations at launch).
    pub pointer: bool,
}

/// A kernel compiled into the emulator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInfo {
    /// Its index in the C++ registry.
    index: c_int,
    /// Its name (the `extern "C"` name in kernels/cuda/*.cu).
    pub name: String,
    /// Its parameters in order.
    pub params: Vec<Param>,
}

fn registry() -> &'static [KernelInfo] {
    static KERNELS: OnceLock<Vec<KernelInfo>> = OnceLock::new();
    KERNELS.get_or_init(|| {
        // SAFETY: the registry functions only read the C++ registry, which lives for the whole process.
        unsafe {
            (0..switchyard_emu_kernel_count())
                .filter_map(|index| {
                    let name = switchyard_emu_kernel_name(index);
                    if name.is_null() {
                        return None;
                    }
                    let name = CStr::from_ptr(name).to_string_lossy().into_owned();
                    let params = (0..switchyard_emu_kernel_param_count(index))
                        .map(|p| {
                            let (mut size, mut pointer) = (0usize, 0 as c_int);
                            switchyard_emu_kernel_param(index, p, &mut size, &mut pointer);
                            Param { size, pointer: pointer != 0 }
                        })
                        .collect();
                    Some(KernelInfo { index, name, params })
                })
                .collect()
        }
    })
}

/// The names of every kernel compiled into the emulator, in registration order.
pub fn kernel_names() -> Vec<String> {
    registry().iter().map(|k| k.name.clone()).collect()
}

/// The kernel compiled into the emulator under `name`.
pub fn kernel(name: &str) -> Option<KernelInfo> {
    registry().iter().find(|k| k.name == name).cloned()
}

/// Runs `kernel` over the grid, synchronously.
///
/// # Safety
/// The dimensions must have been checked (non-zero, at most 1024 threads per block) and `kernel_params` must hold
/// one valid pointer per parameter, each to a value of that parameter's C++ type.
pub unsafe fn launch(
    kernel: &KernelInfo,
    grid: [c_uint; 3],
    block: [c_uint; 3],
    shared_bytes: c_uint,
    kernel_params: *mut *mut c_void,
) -> Result<(), EmuError> {
    let mut message = [0 as c_char; 1024];
    // SAFETY: the caller's contract; `message` has the room given.
    let status = unsafe {
        switchyard_emu_launch(
            kernel.index,
            grid.as_ptr(),
            block.as_ptr(),
            shared_bytes,
            kernel_params,
            message.as_mut_ptr(),
            message.len(),
        )
    };
    if status == 0 {
        return Ok(());
    }
    // SAFETY: the C++ side NUL-terminates within the buffer (snprintf).
    let text = unsafe { CStr::from_ptr(message.as_ptr()) }.to_string_lossy().into_owned();
    Err(EmuError::new(status as CUresult, text))
}
