//! The exported driver API as cudarc uses it: device and context queries, memory (garbage in fresh allocations,
//! range-checked copies, red zones), streams and events, modules from PTX, and the checks a launch makes.

mod driver_support;

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use driver_support::{arg, context, download, free, function, launch, ok, ptx, upload};
use switchyard_cuda_emulator::driver::*;
use switchyard_cuda_emulator::error::{code, name, CUresult};
use switchyard_cuda_emulator::memory::*;
use switchyard_cuda_emulator::module::*;
use switchyard_cuda_emulator::runtime::kernel_names;

#[track_caller]
fn fails(result: CUresult, want: CUresult) {
    assert_eq!(result, want, "expected {}, got {}", name(want), name(result));
}

#[test]
fn the_codes_are_cudarcs() {
    use cudarc::driver::sys::CUresult as C;
    for (ours, theirs) in [
        (code::SUCCESS, C::CUDA_SUCCESS),
        (code::INVALID_VALUE, C::CUDA_ERROR_INVALID_VALUE),
        (code::OUT_OF_MEMORY, C::CUDA_ERROR_OUT_OF_MEMORY),
        (code::NOT_INITIALIZED, C::CUDA_ERROR_NOT_INITIALIZED),
        (code::INVALID_DEVICE, C::CUDA_ERROR_INVALID_DEVICE),
        (code::INVALID_IMAGE, C::CUDA_ERROR_INVALID_IMAGE),
        (code::INVALID_CONTEXT, C::CUDA_ERROR_INVALID_CONTEXT),
        (code::INVALID_HANDLE, C::CUDA_ERROR_INVALID_HANDLE),
        (code::NOT_FOUND, C::CUDA_ERROR_NOT_FOUND),
        (code::ILLEGAL_ADDRESS, C::CUDA_ERROR_ILLEGAL_ADDRESS),
        (code::LAUNCH_OUT_OF_RESOURCES, C::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES),
        (code::LAUNCH_FAILED, C::CUDA_ERROR_LAUNCH_FAILED),
        (code::NOT_SUPPORTED, C::CUDA_ERROR_NOT_SUPPORTED),
        (code::UNKNOWN, C::CUDA_ERROR_UNKNOWN),
    ] {
        assert_eq!(ours, theirs as u32, "{theirs:?}");
        assert_eq!(name(ours), format!("{theirs:?}"));
    }
    use cudarc::driver::sys::CUdevice_attribute as A;
    for (attribute, want) in [
        (A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 9),
        (A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, 0),
        (A::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED, 0),
        (A::CU_DEVICE_ATTRIBUTE_WARP_SIZE, 32),
        (A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK, 1024),
    ] {
        context();
        let mut value = -1;
        // SAFETY: a valid out-pointer.
        ok(unsafe { cuDeviceGetAttribute(&mut value, attribute as c_int, 0) });
        assert_eq!(value, want, "{attribute:?}");
    }
}

#[test]
fn the_device_says_it_is_no_gpu() {
    context();
    let (mut count, mut device) = (0, -1);
    let mut buffer = [0 as c_char; 128];
    let mut total = 0usize;
    // SAFETY: valid out-pointers and buffer sizes.
    unsafe {
        ok(cuDeviceGetCount(&mut count));
        ok(cuDeviceGet(&mut device, 0));
        ok(cuDeviceGetName(buffer.as_mut_ptr(), 128, device));
        ok(cuDeviceTotalMem_v2(&mut total, device));
        fails(cuDeviceGet(&mut device, 1), code::INVALID_DEVICE);
    }
    assert_eq!((count, total), (1, TOTAL_MEMORY));
    // SAFETY: NUL-terminated by cuDeviceGetName.
    let name = unsafe { CStr::from_ptr(buffer.as_ptr()) };
    assert_eq!(name.to_str(), Ok(DEVICE_NAME));
    assert!(DEVICE_NAME.contains("not a GPU"));
}

#[test]
fn calls_without_a_current_context_are_refused() {
    ok(cuInit(0));
    // A fresh thread has no current context until it sets one, as with the real driver.
    let result = std::thread::spawn(|| {
        let mut pointer = 0;
        // SAFETY: a valid out-pointer.
        unsafe { cuMemAlloc_v2(&mut pointer, 16) }
    })
    .join()
    .expect("thread");
    fails(result, code::INVALID_CONTEXT);
}

#[test]
fn errors_carry_their_detail_to_cu_get_error_string() {
    context();
    fails(cuMemFree_v2(0x1234), code::INVALID_VALUE);
    let mut text: *const c_char = std::ptr::null();
    // SAFETY: a valid out-pointer; the answer is a static NUL-terminated string.
    let text = unsafe {
        ok(cuGetErrorString(code::INVALID_VALUE, &mut text));
        CStr::from_ptr(text)
    };
    assert!(text.to_string_lossy().contains("0x1234 is not the start of a live device allocation"), "{text:?}");
}

#[test]
fn fresh_memory_is_garbage_and_memsets_and_copies_stay_in_bounds() {
    context();
    let mut pointer = 0;
    // SAFETY: a valid out-pointer.
    ok(unsafe { cuMemAlloc_v2(&mut pointer, 1000) });
    assert_eq!(pointer % 256, 0, "256-byte aligned like cudaMalloc");
    assert!(download::<u8>(pointer, 1000).iter().all(|&b| b == GARBAGE_BYTE));
    ok(cuMemsetD8_v2(pointer, 0, 1000));
    assert!(download::<u8>(pointer, 1000).iter().all(|&b| b == 0));
    ok(cuMemsetD32_v2(pointer + 8, 0x0102_0304, 4));
    assert_eq!(download::<u32>(pointer, 6), [0, 0, 0x0102_0304, 0x0102_0304, 0x0102_0304, 0x0102_0304]);
    // One byte too many, or starting past the end: refused, as the driver refuses ranges outside an allocation.
    fails(cuMemsetD8_v2(pointer, 0, 1001), code::INVALID_VALUE);
    let host = [0u8; 16];
    // SAFETY: the host buffer holds 16 bytes.
    unsafe {
        fails(cuMemcpyHtoD_v2(pointer + 990, host.as_ptr() as *const c_void, 16), code::INVALID_VALUE);
        ok(cuMemcpyHtoD_v2(pointer + 984, host.as_ptr() as *const c_void, 16));
    }
    let other = upload(&[7u8; 100]);
    ok(cuMemcpyDtoD_v2(pointer, other, 100));
    assert!(download::<u8>(pointer, 100).iter().all(|&b| b == 7));
    fails(cuMemcpyDtoD_v2(pointer, other, 101), code::INVALID_VALUE);
    free(other);
    free(pointer);
    fails(cuMemFree_v2(pointer), code::INVALID_VALUE);
    // SAFETY: a valid out-pointer.
    unsafe {
        fails(cuMemAlloc_v2(&mut pointer, 0), code::INVALID_VALUE);
        fails(cuMemAlloc_v2(&mut pointer, TOTAL_MEMORY + 1), code::OUT_OF_MEMORY);
    }
}

#[test]
fn a_kernel_writing_past_a_buffer_is_caught_by_the_red_zone() {
    context();
    let kernel = "switchyard_emu_test_indices";
    let (_, f) = function(&ptx(&[(kernel, &[".u64"], "")]), kernel);
    // 64 threads write 4 words each: 1024 bytes into a 1000-byte buffer.
    let mut pointer = 0;
    // SAFETY: a valid out-pointer.
    ok(unsafe { cuMemAlloc_v2(&mut pointer, 1000) });
    fails(launch(f, [1, 1, 1], [64, 1, 1], 0, &mut [arg(&mut pointer)]), code::ILLEGAL_ADDRESS);
    // Reported once: the red zone is repaired, so the next launch that stays in bounds succeeds.
    ok(launch(f, [1, 1, 1], [62, 1, 1], 0, &mut [arg(&mut pointer)]));
    free(pointer);
}

#[test]
fn pointer_arguments_must_point_into_live_allocations() {
    context();
    let kernel = "switchyard_emu_test_indices";
    let (_, f) = function(&ptx(&[(kernel, &[".u64"], "")]), kernel);
    let mut host = vec![0u32; 256];
    let mut host_pointer = host.as_mut_ptr() as u64;
    fails(launch(f, [1, 1, 1], [32, 1, 1], 0, &mut [arg(&mut host_pointer)]), code::ILLEGAL_ADDRESS);
    let mut freed = upload(&[0u32; 256]);
    free(freed);
    fails(launch(f, [1, 1, 1], [32, 1, 1], 0, &mut [arg(&mut freed)]), code::ILLEGAL_ADDRESS);
    assert!(host.iter().all(|&v| v == 0), "nothing ran");
}

#[test]
fn launches_are_checked_like_the_drivers() {
    context();
    let kernel = "switchyard_emu_test_indices";
    let (_, f) = function(&ptx(&[(kernel, &[".u64"], ".maxntid 128, 1, 1")]), kernel);
    let mut out = upload(&vec![0u32; 4 * 1024]);
    fails(launch(f, [1, 1, 1], [256, 1, 1], 0, &mut [arg(&mut out)]), code::LAUNCH_OUT_OF_RESOURCES);
    fails(launch(f, [0, 1, 1], [32, 1, 1], 0, &mut [arg(&mut out)]), code::INVALID_VALUE);
    fails(launch(f, [1, 1, 1], [32, 1, 65], 0, &mut [arg(&mut out)]), code::INVALID_VALUE);
    fails(launch(f, [1, 1, 1], [32, 1, 1], 48 * 1024 + 1, &mut [arg(&mut out)]), code::INVALID_VALUE);
    ok(cuFuncSetAttribute(f, 8, 64 * 1024));
    ok(launch(f, [1, 1, 1], [32, 1, 1], 48 * 1024 + 1, &mut [arg(&mut out)]));
    let mut limit = 0;
    // SAFETY: a valid out-pointer.
    ok(unsafe { cuFuncGetAttribute(&mut limit, 0, f) });
    assert_eq!(limit, 128, "MAX_THREADS_PER_BLOCK from .maxntid");
    fails(cuFuncSetAttribute(f, 8, 300 * 1024), code::INVALID_VALUE);
    let null = std::ptr::null_mut();
    // SAFETY: kernelParams is null, which the launch must refuse for a kernel with a parameter.
    fails(
        unsafe { cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, null, null as *mut *mut c_void, null as *mut *mut c_void) },
        code::INVALID_VALUE,
    );
    free(out);
}

#[test]
fn modules_pair_ptx_entries_with_the_cpp_kernels() {
    context();
    let text = ptx(&[
        ("switchyard_emu_test_indices", &[".u64"], ""),
        ("no_such_kernel_anywhere", &[".u64"], ""),
        ("switchyard_emu_test_shuffle", &[".u64", ".u32"], ""),
    ]);
    let (module, _) = function(&text, "switchyard_emu_test_indices");
    let lookup = |name: &str| {
        let mut f: CUfunction = std::ptr::null_mut();
        let name = CString::new(name).expect("no NUL");
        // SAFETY: valid out-pointer and string.
        unsafe { cuModuleGetFunction(&mut f, module, name.as_ptr()) }
    };
    fails(lookup("switchyard_emu_test_dynamic_shared"), code::NOT_FOUND); // compiled in, but not in this PTX
    fails(lookup("no_such_kernel_anywhere"), code::NOT_FOUND); // in the PTX, but no C++ build
    fails(lookup("switchyard_emu_test_shuffle"), code::INVALID_IMAGE); // the parameters disagree
    ok(cuModuleUnload(module));
    fails(lookup("switchyard_emu_test_indices"), code::INVALID_HANDLE);
    let mut other: CUmodule = std::ptr::null_mut();
    // SAFETY: valid out-pointer and NUL-terminated image.
    fails(unsafe { cuModuleLoadData(&mut other, c"\x7fELF not ptx".as_ptr() as *const c_void) }, code::INVALID_IMAGE);
}

#[test]
fn every_kernel_of_kernels_cuda_is_compiled_in_once() {
    let names = kernel_names();
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "kernel names must be unique across translation units: {names:?}");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernels/cuda");
    for file in ["experts.cu", "attention.cu", "dense.cu", "hopper.cu"] {
        let source = std::fs::read_to_string(root.join(file)).expect("kernel source");
        for declaration in source.split("extern \"C\" __global__ void").skip(1) {
            let head = declaration.split('(').next().unwrap_or_default();
            // `__launch_bounds__(...)` may sit between `void` and the name.
            let kernel = if head.contains("__launch_bounds__") {
                declaration.split(')').nth(1).and_then(|rest| rest.split('(').next()).unwrap_or_default()
            } else {
                head
            }
            .trim();
            assert!(
                names.iter().any(|n| n == kernel),
                "{file}: kernel {kernel} is not registered in cpp/kernels_*.cpp"
            );
        }
    }
}

#[test]
fn streams_and_events_are_checked_bookkeeping() {
    context();
    let mut stream: CUstream = std::ptr::null_mut();
    let (mut start, mut end, mut untimed): (CUevent, CUevent, CUevent) =
        (std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut());
    let mut ms = -1.0f32;
    // SAFETY: valid out-pointers.
    unsafe {
        ok(cuStreamCreate(&mut stream, 1));
        ok(cuEventCreate(&mut start, 0));
        ok(cuEventCreate(&mut end, 0));
        ok(cuEventCreate(&mut untimed, 2));
        fails(cuEventElapsedTime_v2(&mut ms, start, end), code::INVALID_HANDLE); // not recorded yet
        ok(cuEventRecord(start, stream));
        ok(cuEventRecord(end, stream));
        ok(cuEventRecord(untimed, std::ptr::null_mut()));
        ok(cuEventElapsedTime_v2(&mut ms, start, end));
        fails(cuEventElapsedTime_v2(&mut ms, start, untimed), code::INVALID_HANDLE);
    }
    assert!(ms >= 0.0, "{ms}");
    ok(cuStreamSynchronize(stream));
    ok(cuStreamWaitEvent(stream, end, 0));
    for event in [start, end, untimed] {
        ok(cuEventDestroy_v2(event));
    }
    fails(cuEventRecord(start, stream), code::INVALID_HANDLE);
    ok(cuStreamDestroy_v2(stream));
    fails(cuStreamSynchronize(stream), code::INVALID_HANDLE);
    ok(cuStreamSynchronize(std::ptr::null_mut()));
}

#[test]
fn static_shared_memory_counts_against_the_48_kib() {
    context();
    // silu_mul_quantize_e4m3's shape: block_amax's 128-byte __shared__ array plus the launch's dynamic row.
    let kernel = "switchyard_emu_test_indices";
    let text = ptx(&[(kernel, &[".u64"], "")]);
    let text = text
        .to_str()
        .expect("utf-8")
        .replace(".visible .entry", ".shared .align 4 .b8 _ZZ10block_amaxfE8warp_max[128];\n.visible .entry");
    let text =
        CString::new(text.replace("\tret;", "\tmov.u64 %rd1, _ZZ10block_amaxfE8warp_max;\n\tret;")).expect("no NUL");
    let (_, f) = function(&text, kernel);
    let mut static_bytes = 0;
    // SAFETY: a valid out-pointer.
    ok(unsafe { cuFuncGetAttribute(&mut static_bytes, 1, f) });
    assert_eq!(static_bytes, 128);
    let mut out = upload(&vec![0u32; 4 * 32]);
    fails(launch(f, [1, 1, 1], [32, 1, 1], 48 * 1024, &mut [arg(&mut out)]), code::INVALID_VALUE);
    ok(launch(f, [1, 1, 1], [32, 1, 1], 48 * 1024 - 128, &mut [arg(&mut out)]));
    free(out);
}
