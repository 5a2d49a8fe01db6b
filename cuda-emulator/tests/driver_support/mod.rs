//! Helpers of the driver tests: a current context, checked calls, device buffers and a PTX text declaring kernels
//! (the emulator keeps only a module's entry points, so a hand-written PTX header stands in for NVRTC's output).

#![allow(dead_code)]

use std::ffi::{c_void, CString};

use switchyard_cuda_emulator::driver::{cuCtxSetCurrent, cuDevicePrimaryCtxRetain, cuInit, CUcontext};
use switchyard_cuda_emulator::error::{code, name, CUresult};
use switchyard_cuda_emulator::memory::{cuMemAlloc_v2, cuMemFree_v2, cuMemcpyDtoH_v2, cuMemcpyHtoD_v2, CUdeviceptr};
use switchyard_cuda_emulator::module::{cuLaunchKernel, cuModuleGetFunction, cuModuleLoadData, CUfunction, CUmodule};

/// Panics with the CUresult's name unless it is CUDA_SUCCESS.
#[track_caller]
pub fn ok(result: CUresult) {
    assert_eq!(result, code::SUCCESS, "expected CUDA_SUCCESS, got {}", name(result));
}

/// Initialises the driver and makes the primary context current on this thread (tests run on several threads).
pub fn context() -> CUcontext {
    ok(cuInit(0));
    let mut context: CUcontext = std::ptr::null_mut();
    // SAFETY: a valid out-pointer.
    ok(unsafe { cuDevicePrimaryCtxRetain(&mut context, 0) });
    ok(cuCtxSetCurrent(context));
    context
}

/// A device buffer holding `values`.
pub fn upload<T: Copy>(values: &[T]) -> CUdeviceptr {
    let bytes = std::mem::size_of_val(values).max(1);
    let mut pointer = 0;
    // SAFETY: valid out-pointer; the source holds `bytes` bytes (or is not read when empty).
    unsafe {
        ok(cuMemAlloc_v2(&mut pointer, bytes));
        ok(cuMemcpyHtoD_v2(pointer, values.as_ptr() as *const c_void, std::mem::size_of_val(values)));
    }
    pointer
}

/// `len` values of a device buffer.
pub fn download<T: Copy + Default>(pointer: CUdeviceptr, len: usize) -> Vec<T> {
    let mut values = vec![T::default(); len];
    // SAFETY: the destination has room for `len` values.
    ok(unsafe { cuMemcpyDtoH_v2(values.as_mut_ptr() as *mut c_void, pointer, std::mem::size_of_val(&values[..])) });
    values
}

/// Frees a device buffer.
pub fn free(pointer: CUdeviceptr) {
    ok(cuMemFree_v2(pointer));
}

/// A PTX text with one `.entry` per (name, parameter types, directives after the parameter list).
pub fn ptx(entries: &[(&str, &[&str], &str)]) -> CString {
    let mut text = String::from(".version 8.5\n.target sm_90\n.address_size 64\n\n");
    for (name, params, directives) in entries {
        let params: Vec<String> =
            params.iter().enumerate().map(|(i, ty)| format!("\t.param {ty} {name}_param_{i}")).collect();
        text.push_str(&format!(".visible .entry {name}(\n{}\n)\n{directives}\n{{\n\tret;\n}}\n\n", params.join(",\n")));
    }
    CString::new(text).expect("no NUL in PTX")
}

/// Loads `ptx` and looks `kernel` up in it.
pub fn function(ptx: &CString, kernel: &str) -> (CUmodule, CUfunction) {
    let mut module: CUmodule = std::ptr::null_mut();
    let mut function: CUfunction = std::ptr::null_mut();
    let name = CString::new(kernel).expect("no NUL in a kernel name");
    // SAFETY: valid out-pointers and NUL-terminated strings.
    unsafe {
        ok(cuModuleLoadData(&mut module, ptx.as_ptr() as *const c_void));
        ok(cuModuleGetFunction(&mut function, module, name.as_ptr()));
    }
    (module, function)
}

/// Launches `function` on the default stream with `args` (pointers to each argument's value).
pub fn launch(
    function: CUfunction,
    grid: [u32; 3],
    block: [u32; 3],
    shared: u32,
    args: &mut [*mut c_void],
) -> CUresult {
    // SAFETY: `args` holds one pointer per parameter, each to a value of the parameter's type (the tests' contract).
    unsafe {
        cuLaunchKernel(
            function,
            grid[0],
            grid[1],
            grid[2],
            block[0],
            block[1],
            block[2],
            shared,
            std::ptr::null_mut(),
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
}

/// A pointer to `value` as kernelParams wants it.
pub fn arg<T>(value: &mut T) -> *mut c_void {
    value as *mut T as *mut c_void
}
