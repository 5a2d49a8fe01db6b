//! Guard pages around device allocations, so that a kernel (or the cuBLASLt and NCCL emulation) reading or writing
//! past the end of a buffer faults at once instead of reading a neighbour's bytes. Each device allocation gets its own
//! mapping: a `PROT_NONE` page, the data pages, a `PROT_NONE` page. The allocation ends at the 256-byte boundary just
//! before the trailing guard page (its start stays 256-byte aligned, as cudaMalloc promises), so the bytes between its
//! size and that boundary (under 256) are not guarded: writes there are caught by the red zone ([`crate::memory`]),
//! reads there go unnoticed. The leading guard page catches underflows only beyond the unused head of the first data
//! page (exactly at the start for allocations of whole pages).
//!
//! A fault in a guard page cannot be recovered from (the kernel's thread is a fiber in the middle of its code), so the
//! SIGSEGV/SIGBUS handler prints which allocation the address borders, how far out it is, whether it was a read or a
//! write, and the kernel, block and thread being run, then aborts the process. Faults anywhere else go to the handler
//! that was installed before ours (Rust's stack-overflow report, or the default action).
//!
//! The handler must be async-signal-safe: it reads a fixed table of guarded ranges through atomics (no lock, no
//! allocation), formats into a stack buffer and `write(2)`s the message. `SWITCHYARD_CUDA_EMULATOR_GUARD=0` turns
//! guard pages off (plain heap allocations with a 256-byte red zone, as before).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// Guarded allocations live at once; beyond this (or when the kernel refuses more mappings) allocations fall back to
/// the heap, unguarded, with one warning on stderr.
const SLOTS: usize = 1 << 16;

/// One guarded allocation as the fault handler sees it. `mapping` is 0 while the slot is free; it is stored last when
/// a slot is filled and cleared first when it is emptied, so the handler never pairs a mapping with stale fields.
struct Slot {
    mapping: AtomicUsize,
    mapping_len: AtomicUsize,
    base: AtomicUsize,
    size: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: Slot = Slot {
    mapping: AtomicUsize::new(0),
    mapping_len: AtomicUsize::new(0),
    base: AtomicUsize::new(0),
    size: AtomicUsize::new(0),
};

static SLOTS_TABLE: [Slot; SLOTS] = [EMPTY_SLOT; SLOTS];

/// Slots not in use, for `map`; only touched under the memory table's mutex (the caller's), but a mutex of its own
/// keeps this module sound on its own.
static FREE_SLOTS: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());
static NEXT_UNUSED_SLOT: AtomicUsize = AtomicUsize::new(0);
static FALLBACK_WARNED: AtomicBool = AtomicBool::new(false);

/// The handlers ours replaced, called for faults outside guard pages.
static PREVIOUS_SEGV: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());
static PREVIOUS_BUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());
static INSTALL: Once = Once::new();

extern "C" {
    /// runtime.cpp: the kernel the calling thread is running, with the block and thread being run; null outside a
    /// launch. Async-signal-safe.
    fn switchyard_emu_faulting_kernel(block: *mut c_uint, thread: *mut c_uint) -> *const c_char;
}

/// Whether device allocations get guard pages: yes unless `SWITCHYARD_CUDA_EMULATOR_GUARD=0` (read once).
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("SWITCHYARD_CUDA_EMULATOR_GUARD").map_or(true, |value| value.trim() != "0"))
}

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(4096))
}

/// A device allocation placed between guard pages; [`unmap`] releases it.
#[derive(Debug)]
pub(crate) struct GuardedMapping {
    mapping: usize,
    mapping_len: usize,
    slot: usize,
}

/// Maps `size` bytes between guard pages, ending at the `alignment` boundary before the trailing one; the base
/// address, or `None` when no mapping or table slot is left (the caller then uses the heap).
pub(crate) fn map(size: usize, alignment: usize) -> Option<(u64, GuardedMapping)> {
    let page = page_size();
    let rounded = size.checked_next_multiple_of(alignment)?;
    let data_len = rounded.checked_next_multiple_of(page)?;
    let mapping_len = data_len.checked_add(2 * page)?;
    let slot = take_slot()?;
    // SAFETY: a fresh anonymous mapping; nothing else refers to it.
    let mapping = unsafe {
        libc::mmap(std::ptr::null_mut(), mapping_len, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    if mapping == libc::MAP_FAILED {
        release_slot(slot);
        warn_fallback(&format!("mmap of {mapping_len} bytes failed: {}", std::io::Error::last_os_error()));
        return None;
    }
    let mapping = mapping as usize;
    // SAFETY: the data pages lie inside the mapping just made.
    if unsafe { libc::mprotect((mapping + page) as *mut c_void, data_len, libc::PROT_READ | libc::PROT_WRITE) } != 0 {
        let error = std::io::Error::last_os_error();
        // SAFETY: the mapping just made, unused.
        unsafe { libc::munmap(mapping as *mut c_void, mapping_len) };
        release_slot(slot);
        warn_fallback(&format!("mprotect of {data_len} bytes failed: {error} (too many mappings? vm.max_map_count)"));
        return None;
    }
    install_handler();
    let base = mapping + page + data_len - rounded;
    let entry = &SLOTS_TABLE[slot];
    entry.mapping_len.store(mapping_len, Ordering::Relaxed);
    entry.base.store(base, Ordering::Relaxed);
    entry.size.store(size, Ordering::Relaxed);
    entry.mapping.store(mapping, Ordering::Release);
    Some((base as u64, GuardedMapping { mapping, mapping_len, slot }))
}

/// Unmaps a guarded allocation (its guard pages too).
pub(crate) fn unmap(guarded: GuardedMapping) {
    SLOTS_TABLE[guarded.slot].mapping.store(0, Ordering::Release);
    // SAFETY: the mapping `map` made, given up by its only owner.
    unsafe { libc::munmap(guarded.mapping as *mut c_void, guarded.mapping_len) };
    release_slot(guarded.slot);
}

fn take_slot() -> Option<usize> {
    let mut free = FREE_SLOTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(slot) = free.pop() {
        return Some(slot);
    }
    let next = NEXT_UNUSED_SLOT.load(Ordering::Relaxed);
    if next >= SLOTS {
        drop(free);
        warn_fallback("the guard table is full");
        return None;
    }
    NEXT_UNUSED_SLOT.store(next + 1, Ordering::Relaxed);
    Some(next)
}

fn release_slot(slot: usize) {
    FREE_SLOTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(slot);
}

fn warn_fallback(why: &str) {
    if !FALLBACK_WARNED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "switchyard CUDA emulator: {why}; further device allocations without guard pages get only a red zone"
        );
    }
}

fn install_handler() {
    INSTALL.call_once(|| {
        for (signal, previous) in [(libc::SIGSEGV, &PREVIOUS_SEGV), (libc::SIGBUS, &PREVIOUS_BUS)] {
            // SAFETY: zeroed sigaction structs are valid; sigaction gets valid pointers. The old action is leaked on
            // purpose: the handler may read it at any time.
            unsafe {
                let old: &'static mut libc::sigaction = Box::leak(Box::new(std::mem::zeroed()));
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_fault as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut action.sa_mask);
                if libc::sigaction(signal, &action, old) == 0 {
                    previous.store(old, Ordering::Release);
                }
            }
        }
    });
}

/// A message built on the stack (the handler may not allocate); overlong text is cut.
struct StackText {
    bytes: [u8; 1024],
    len: usize,
}

impl std::fmt::Write for StackText {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        let room = self.bytes.len() - self.len;
        let take = text.len().min(room);
        self.bytes[self.len..self.len + take].copy_from_slice(&text.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

/// Where a fault address lies relative to a guarded allocation.
enum Border {
    /// In the trailing guard page: this many bytes past the allocation's last byte (0 = the first byte after it).
    After(usize),
    /// In the leading guard page: this many bytes before the allocation's first byte (1 = the byte just before it).
    Before(usize),
}

fn guarded_allocation_at(address: usize) -> Option<(usize, usize, Border)> {
    let page = page_size();
    for slot in &SLOTS_TABLE[..NEXT_UNUSED_SLOT.load(Ordering::Acquire).min(SLOTS)] {
        let mapping = slot.mapping.load(Ordering::Acquire);
        if mapping == 0 {
            continue;
        }
        let (len, base, size) = (
            slot.mapping_len.load(Ordering::Relaxed),
            slot.base.load(Ordering::Relaxed),
            slot.size.load(Ordering::Relaxed),
        );
        if slot.mapping.load(Ordering::Acquire) != mapping {
            continue; // reused while we read it
        }
        if (mapping..mapping + page).contains(&address) {
            return Some((base, size, Border::Before(base - address)));
        }
        if (mapping + len - page..mapping + len).contains(&address) {
            return Some((base, size, Border::After(address - (base + size))));
        }
    }
    None
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn access_kind(context: *mut c_void) -> &'static str {
    if context.is_null() {
        return "access";
    }
    // SAFETY: the kernel passes the interrupted context of an SA_SIGINFO handler; on x86-64 the page-fault error code
    // is in REG_ERR, bit 1 set for a write.
    let error = unsafe { (*(context as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_ERR as usize] };
    if error & 2 != 0 {
        "write"
    } else {
        "read"
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn access_kind(_context: *mut c_void) -> &'static str {
    "access"
}

extern "C" fn on_fault(signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let address = if info.is_null() { 0 } else { unsafe { (*info).si_addr() as usize } };
    let Some((base, size, border)) = guarded_allocation_at(address) else {
        // SAFETY: forwarding the same arguments the kernel gave us.
        unsafe { chain(signal, info, context) };
        return;
    };
    let mut text = StackText { bytes: [0; 1024], len: 0 };
    let _ = write!(text, "\nswitchyard CUDA emulator: out-of-bounds {} at 0x{address:x}: ", access_kind(context));
    let _ = match border {
        Border::After(past) => write!(text, "{past} bytes past the end of"),
        Border::Before(before) => write!(text, "{before} bytes before the start of"),
    };
    let _ = write!(text, " the {size}-byte device allocation at 0x{base:x} (its guard page), ");
    let (mut block, mut thread) = ([0 as c_uint; 3], [0 as c_uint; 3]);
    // SAFETY: two 3-element out arrays; the function is async-signal-safe.
    let kernel = unsafe { switchyard_emu_faulting_kernel(block.as_mut_ptr(), thread.as_mut_ptr()) };
    if kernel.is_null() {
        let _ = write!(text, "outside any kernel (the emulated cuBLASLt or NCCL, or host code)");
    } else {
        // SAFETY: a kernel name from the registry: a NUL-terminated static string.
        let name = unsafe { CStr::from_ptr(kernel) }.to_str().unwrap_or("?");
        let _ = write!(
            text,
            "in kernel {name}, block ({}, {}, {}), thread ({}, {}, {})",
            block[0], block[1], block[2], thread[0], thread[1], thread[2]
        );
    }
    let _ = writeln!(text, "; aborting (a GPU would fail with CUDA_ERROR_ILLEGAL_ADDRESS or read garbage)");
    // SAFETY: write(2) and abort(3) are async-signal-safe; the buffer holds `len` bytes.
    unsafe {
        libc::write(2, text.bytes.as_ptr() as *const c_void, text.len);
        libc::abort();
    }
}

/// Passes a fault that is not ours to the handler installed before: its function, or its default action by resetting
/// to it and returning (the faulting instruction runs again and takes that action).
///
/// # Safety
/// The arguments of a signal handler invocation.
unsafe fn chain(signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    let previous = if signal == libc::SIGBUS { &PREVIOUS_BUS } else { &PREVIOUS_SEGV };
    let previous = previous.load(Ordering::Acquire);
    // SAFETY: a leaked sigaction written before it was published.
    let handler = if previous.is_null() { libc::SIG_DFL } else { unsafe { (*previous).sa_sigaction } };
    let siginfo = !previous.is_null() && unsafe { (*previous).sa_flags } & libc::SA_SIGINFO != 0;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: restoring the default action is async-signal-safe.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    } else if siginfo {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this signature.
        let function: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) = unsafe { std::mem::transmute(handler) };
        function(signal, info, context);
    } else {
        // SAFETY: a plain handler.
        let function: extern "C" fn(c_int) = unsafe { std::mem::transmute(handler) };
        function(signal);
    }
}
