//! Guard pages around device allocations: a kernel reading or writing just past the end (or before the start) of a
//! buffer aborts the process with a message naming the allocation and the kernel; in-bounds accesses up to the last
//! element are fine; the red zone still catches writes into the slack before the 256-byte boundary.
//!
//! A fault aborts the whole process, so each crashing case runs in a child: this test binary again, selecting the one
//! test with `--exact` and the case with [`CASE`]; the parent checks how the child died and what it printed.

mod driver_support;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use driver_support::{arg, context, download, free, function, launch, ok, ptx, upload};
use switchyard_cuda_emulator::error::{code, name};
use switchyard_cuda_emulator::guard_pages;
use switchyard_cuda_emulator::memory::cuMemAlloc_v2;

/// Set in a child: the crashing case it must run.
const CASE: &str = "SWITCHYARD_GUARD_PAGES_TEST_CASE";
const GUARD: &str = "SWITCHYARD_CUDA_EMULATOR_GUARD";
const READ: &str = "switchyard_emu_test_read_element";
const WRITE: &str = "switchyard_emu_test_write_element";

fn allocate(bytes: usize) -> u64 {
    let mut pointer = 0;
    // SAFETY: a valid out-pointer.
    ok(unsafe { cuMemAlloc_v2(&mut pointer, bytes) });
    pointer
}

/// Launches the one-thread kernel `kernel` on element `index` of a fresh `bytes`-byte buffer (filled with
/// 0..bytes/4 as f32); the launch's result and the value read (or the buffer's element `index` after the write).
fn access(kernel: &str, bytes: usize, index: i32) -> (u32, f32) {
    context();
    let last = if kernel == READ { ".u64" } else { ".f32" };
    let (_, f) = function(&ptx(&[(kernel, &[".u64", ".u32", last], "")]), kernel);
    let mut data = allocate(bytes);
    let values: Vec<f32> = (0..bytes / 4).map(|i| i as f32).collect();
    // SAFETY: the buffer holds `bytes` bytes.
    ok(unsafe {
        switchyard_cuda_emulator::memory::cuMemcpyHtoD_v2(
            data,
            values.as_ptr().cast(),
            std::mem::size_of_val(&values[..]),
        )
    });
    eprintln!("the {bytes}-byte buffer is at 0x{data:x}");
    let mut index = index;
    let result = if kernel == READ {
        let mut out = upload(&[0f32]);
        let result = launch(f, [1, 1, 1], [32, 1, 1], 0, &mut [arg(&mut data), arg(&mut index), arg(&mut out)]);
        let value = download::<f32>(out, 1)[0];
        free(out);
        (result, value)
    } else {
        let mut value = -1f32;
        let result = launch(f, [1, 1, 1], [32, 1, 1], 0, &mut [arg(&mut data), arg(&mut index), arg(&mut value)]);
        let element = usize::try_from(index)
            .ok()
            .filter(|&i| i < bytes / 4)
            .map_or(f32::NAN, |i| download::<f32>(data, bytes / 4)[i]);
        (result, element)
    };
    free(data);
    result
}

/// Runs `test` alone in a child with [`CASE`] = `case` and the guard setting `guard`.
fn run_child(test: &str, case: &str, guard: &str) -> Output {
    Command::new(std::env::current_exe().expect("the test binary's path"))
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CASE, case)
        .env(GUARD, guard)
        .output()
        .expect("run the test binary as a child")
}

/// In a child: runs the access of `case`, which must not return.
fn crash(kernel: &str, bytes: usize, index: i32) -> ! {
    let (result, value) = access(kernel, bytes, index);
    panic!("the out-of-bounds access did not fault: launch {}, value {value}", name(result));
}

/// Checks that the child aborted with the guard-page message for `kernel` and a `bytes`-byte allocation; its text.
fn assert_aborted(output: &Output, kernel: &str, bytes: usize, access: &str, border: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.signal(), Some(libc::SIGABRT), "the child must abort: {:?}\n{stderr}", output.status);
    let buffer = stderr
        .lines()
        .find_map(|line| line.strip_prefix(&format!("the {bytes}-byte buffer is at ")))
        .unwrap_or_else(|| panic!("the child names its buffer:\n{stderr}"));
    for want in [
        format!("out-of-bounds {access} at 0x"),
        format!("{border} the {bytes}-byte device allocation at {buffer} (its guard page)"),
        format!("in kernel {kernel}, block (0, 0, 0), thread (0, 0, 0)"),
    ] {
        assert!(stderr.contains(&want), "stderr must contain {want:?}:\n{stderr}");
    }
    stderr
}

#[test]
fn reading_one_element_past_the_end_aborts_naming_the_allocation_and_the_kernel() {
    let test = "reading_one_element_past_the_end_aborts_naming_the_allocation_and_the_kernel";
    match std::env::var(CASE).as_deref() {
        // 1024 bytes: a multiple of 256, so element 256 is the first byte of the guard page.
        Ok("read_past_end") => crash(READ, 1024, 256),
        // The opt-out: heap memory, and the read lands in the red zone unnoticed.
        Ok("read_past_end_unguarded") => {
            let (result, value) = access(READ, 1024, 256);
            assert_eq!(result, code::SUCCESS, "{}", name(result));
            assert_eq!(value.to_bits(), 0xFBFB_FBFB, "the red zone's bytes");
            return;
        }
        _ => {}
    }
    let output = run_child(test, "read_past_end", "1");
    assert_aborted(&output, READ, 1024, "read", "0 bytes past the end of");
    let unguarded = run_child(test, "read_past_end_unguarded", "0");
    assert!(unguarded.status.success(), "{}", String::from_utf8_lossy(&unguarded.stderr));
}

#[test]
fn writing_one_element_past_the_end_aborts() {
    if std::env::var(CASE).as_deref() == Ok("write_past_end") {
        crash(WRITE, 2048, 512 + 3);
    }
    let output = run_child("writing_one_element_past_the_end_aborts", "write_past_end", "1");
    assert_aborted(&output, WRITE, 2048, "write", "12 bytes past the end of");
}

#[test]
fn reading_one_element_before_a_whole_page_allocation_aborts() {
    if std::env::var(CASE).as_deref() == Ok("read_before_start") {
        crash(READ, 4096, -1);
    }
    let output = run_child("reading_one_element_before_a_whole_page_allocation_aborts", "read_before_start", "1");
    assert_aborted(&output, READ, 4096, "read", "4 bytes before the start of");
}

#[test]
fn host_code_reading_past_the_end_aborts_naming_no_kernel() {
    // What the cuBLASLt or NCCL emulation would do with a bad length: read device memory directly, outside a launch.
    if std::env::var(CASE).as_deref() == Ok("host_read_past_end") {
        context();
        let buffer = allocate(512);
        eprintln!("the 512-byte buffer is at 0x{buffer:x}");
        // SAFETY: deliberately not: byte 512 of a 512-byte allocation, the first byte of its guard page.
        let byte = unsafe { std::ptr::read_volatile((buffer + 512) as usize as *const u8) };
        panic!("the out-of-bounds read did not fault: it read {byte}");
    }
    let output = run_child("host_code_reading_past_the_end_aborts_naming_no_kernel", "host_read_past_end", "1");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.signal(), Some(libc::SIGABRT), "the child must abort: {:?}\n{stderr}", output.status);
    assert!(stderr.contains("out-of-bounds read at 0x"), "{stderr}");
    assert!(stderr.contains("0 bytes past the end of the 512-byte device allocation at 0x"), "{stderr}");
    assert!(stderr.contains("outside any kernel"), "{stderr}");
}

#[test]
fn faults_elsewhere_go_to_the_previous_handler() {
    if std::env::var(CASE).as_deref() == Ok("wild_read") {
        context();
        free(allocate(64)); // installs the handler
                            // SAFETY: deliberately not: the first page is never mapped.
        let byte = unsafe { std::ptr::read_volatile(std::ptr::without_provenance::<u8>(64)) };
        panic!("the wild read did not fault: it read {byte}");
    }
    let output = run_child("faults_elsewhere_go_to_the_previous_handler", "wild_read", "1");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.signal(), Some(libc::SIGSEGV), "a plain segfault: {:?}\n{stderr}", output.status);
    assert!(!stderr.contains("out-of-bounds"), "not reported as a guard-page fault:\n{stderr}");
}

#[test]
fn the_last_element_is_readable_and_writable() {
    for bytes in [4, 1000, 1024, 4096, 5000] {
        let last = (bytes / 4 - 1) as i32;
        let (result, value) = access(READ, bytes, last);
        assert_eq!((result, value), (code::SUCCESS, last as f32), "read the last of {bytes} bytes");
        let (result, value) = access(WRITE, bytes, last);
        assert_eq!((result, value), (code::SUCCESS, -1.0), "write the last of {bytes} bytes");
    }
}

#[test]
fn the_slack_before_the_guard_page_is_a_red_zone_for_writes_only() {
    // 1000 bytes: 24 bytes of slack up to the 256-byte boundary where the guard page begins.
    let (result, _) = access(WRITE, 1000, 250);
    assert_eq!(result, code::ILLEGAL_ADDRESS, "a write into the slack: {}", name(result));
    // Reads there are not detected (they see the red zone's bytes): the guard page starts at the 256-byte boundary.
    let (result, value) = access(READ, 1000, 250);
    assert_eq!((result, value.to_bits()), (code::SUCCESS, 0xFBFB_FBFB));
}

#[test]
fn allocations_stay_256_byte_aligned_and_end_at_the_guard_page() {
    context();
    for bytes in [1, 255, 256, 1000, 4095, 4096, 4097, 1 << 20] {
        let pointer = allocate(bytes);
        assert_eq!(pointer % 256, 0, "{bytes} bytes: 256-byte aligned like cudaMalloc");
        if guard_pages::enabled() {
            let end = pointer + (bytes as u64).next_multiple_of(256);
            assert_eq!(end % 4096, 0, "{bytes} bytes: the rounded end is the guard page's start");
        }
        free(pointer);
    }
}

#[test]
fn many_small_allocations_work() {
    context();
    let pointers: Vec<u64> = (0..5000u32).map(|i| upload(&[i])).collect();
    for (i, &pointer) in pointers.iter().enumerate() {
        assert_eq!(download::<u32>(pointer, 1), [i as u32]);
    }
    for pointer in pointers {
        free(pointer);
    }
}
