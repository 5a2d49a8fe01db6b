//! Device memory: a `CUdeviceptr` is the host address of an allocation (256-byte aligned like cudaMalloc's), so
//! kernels and the cuBLASLt emulation dereference it directly. Fresh allocations are filled with 0xCD (a GPU's memory
//! is not zeroed either; code that reads what it never wrote sees garbage). Each device allocation ends just before a
//! guard page ([`crate::guard_pages`]): reading or writing past its 256-byte-rounded end aborts the process with a
//! message naming the allocation and the kernel. The bytes between its size and that 256-byte boundary are a red zone,
//! checked after every launch and at free, so a kernel writing there fails loudly too (reading there goes unnoticed).
//! Page-locked host allocations, and all of them under `SWITCHYARD_CUDA_EMULATOR_GUARD=0`, are heap memory with a
//! 256-byte red zone after them. Copies and memsets must lie inside one allocation, as with the real driver.

use std::alloc::{alloc, dealloc, Layout};
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::{Mutex, MutexGuard};

use crate::driver::{check_context, check_stream, CUstream};
use crate::error::{code, guard, write_out, CUresult, EmuError};
use crate::guard_pages::{self, GuardedMapping};

/// A device address (cudarc's `sys::CUdeviceptr`).
pub type CUdeviceptr = u64;

/// Device memory the emulated GPU reports (its capacity: allocations beyond it fail with out-of-memory).
pub const TOTAL_MEMORY: usize = 16 << 30;
/// Alignment of every allocation (cudaMalloc guarantees 256 bytes).
const ALIGNMENT: usize = 256;
/// Bytes after each heap allocation that must keep [`RED_ZONE_BYTE`] (guarded ones keep their slack to 256 bytes).
const RED_ZONE: usize = 256;
const RED_ZONE_BYTE: u8 = 0xFB;
/// What fresh allocations hold.
pub const GARBAGE_BYTE: u8 = 0xCD;

/// Where an allocation's bytes come from.
enum Backing {
    /// The heap, `size + RED_ZONE` bytes.
    Heap(Layout),
    /// Its own mapping between guard pages.
    Guarded(GuardedMapping),
}

struct Allocation {
    size: usize,
    /// Bytes after `size` that must keep [`RED_ZONE_BYTE`].
    red_zone: usize,
    backing: Backing,
    /// Page-locked host memory (cuMemHostAlloc): kernels may use it too (unified addressing), but it is not device
    /// memory for cuMemFree, nor counted against the device's capacity.
    host: bool,
}

impl Allocation {
    fn red_zone(&self, base: u64) -> &[u8] {
        // SAFETY: the allocation is `size + red_zone` bytes from `base`, live while it is in the table.
        unsafe { std::slice::from_raw_parts((base as usize + self.size) as *const u8, self.red_zone) }
    }

    fn poison_red_zone(&self, base: u64) {
        // SAFETY: as in `red_zone`.
        unsafe { std::ptr::write_bytes((base as usize + self.size) as *mut u8, RED_ZONE_BYTE, self.red_zone) };
    }
}

#[derive(Default)]
struct Table {
    allocations: BTreeMap<u64, Allocation>,
    device_bytes: usize,
}

static TABLE: Mutex<Table> = Mutex::new(Table { allocations: BTreeMap::new(), device_bytes: 0 });

fn table() -> MutexGuard<'static, Table> {
    TABLE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Table {
    /// The allocation holding `[address, address + len)`, by its base.
    fn holding(&self, address: u64, len: usize) -> Option<(u64, &Allocation)> {
        let (&base, allocation) = self.allocations.range(..=address).next_back()?;
        let end = address.checked_add(len as u64)?;
        (end <= base + allocation.size as u64).then_some((base, allocation))
    }

    fn allocate(&mut self, size: usize, host: bool) -> Result<u64, EmuError> {
        if size == 0 {
            return Err(EmuError::invalid("an allocation of 0 bytes"));
        }
        if !host && self.device_bytes.saturating_add(size) > TOTAL_MEMORY {
            return Err(EmuError::new(
                code::OUT_OF_MEMORY,
                format!("{size} bytes requested, {} of {TOTAL_MEMORY} in use", self.device_bytes),
            ));
        }
        let guarded = if host || !guard_pages::enabled() { None } else { guard_pages::map(size, ALIGNMENT) };
        let (base, allocation) = match guarded {
            Some((base, mapping)) => {
                let red_zone = size.next_multiple_of(ALIGNMENT) - size;
                (base, Allocation { size, red_zone, backing: Backing::Guarded(mapping), host })
            }
            None => {
                let layout = size
                    .checked_add(RED_ZONE)
                    .and_then(|total| Layout::from_size_align(total, ALIGNMENT).ok())
                    .ok_or_else(|| EmuError::new(code::OUT_OF_MEMORY, format!("{size} bytes cannot be allocated")))?;
                // SAFETY: the layout has a non-zero size.
                let pointer = unsafe { alloc(layout) };
                if pointer.is_null() {
                    return Err(EmuError::new(code::OUT_OF_MEMORY, format!("the host has no {size} bytes to spare")));
                }
                (pointer as u64, Allocation { size, red_zone: RED_ZONE, backing: Backing::Heap(layout), host })
            }
        };
        // SAFETY: the allocation holds `size` bytes from `base`.
        unsafe { std::ptr::write_bytes(base as usize as *mut u8, GARBAGE_BYTE, size) };
        allocation.poison_red_zone(base);
        self.allocations.insert(base, allocation);
        if !host {
            self.device_bytes += size;
        }
        Ok(base)
    }

    fn free(&mut self, base: u64, host: bool) -> Result<(), EmuError> {
        let kind = if host { "page-locked host" } else { "device" };
        match self.allocations.get(&base) {
            Some(allocation) if allocation.host == host => {}
            _ => return Err(EmuError::invalid(format!("0x{base:x} is not the start of a live {kind} allocation"))),
        }
        let allocation = self.allocations.remove(&base).ok_or_else(|| EmuError::invalid("vanished allocation"))?;
        let overrun = red_zone_damage(base, &allocation);
        if !host {
            self.device_bytes -= allocation.size;
        }
        match allocation.backing {
            // SAFETY: allocated in `allocate` with this layout, and removed from the table so never freed twice.
            Backing::Heap(layout) => unsafe { dealloc(base as *mut u8, layout) },
            Backing::Guarded(mapping) => guard_pages::unmap(mapping),
        }
        match overrun {
            None => Ok(()),
            Some(message) => Err(EmuError::new(code::ILLEGAL_ADDRESS, message)),
        }
    }
}

fn red_zone_damage(base: u64, allocation: &Allocation) -> Option<String> {
    let zone = allocation.red_zone(base);
    let first = zone.iter().position(|&b| b != RED_ZONE_BYTE)?;
    Some(format!(
        "something wrote {} bytes past the end of the {}-byte allocation at 0x{base:x} (first at byte {first} past it)",
        zone.iter().filter(|&&b| b != RED_ZONE_BYTE).count(),
        allocation.size,
    ))
}

/// Checks every allocation's red zone (after a launch): the first damaged one as an error, all repaired so the next
/// check reports only new damage.
pub(crate) fn check_red_zones() -> Result<(), EmuError> {
    let table = table();
    let mut first = None;
    for (&base, allocation) in &table.allocations {
        if let Some(message) = red_zone_damage(base, allocation) {
            first.get_or_insert(message);
            allocation.poison_red_zone(base);
        }
    }
    match first {
        None => Ok(()),
        Some(message) => Err(EmuError::new(code::ILLEGAL_ADDRESS, message)),
    }
}

/// Whether `address` points into (or one past the end of) a live allocation: what a kernel's pointer argument must
/// be, unless null.
pub(crate) fn is_valid_kernel_pointer(address: u64) -> bool {
    table().holding(address, 0).is_some()
}

/// Checks that `[address, address + len)` lies in one live allocation; `what` names the argument.
pub(crate) fn check_range(address: CUdeviceptr, len: usize, what: &str) -> Result<(), EmuError> {
    if table().holding(address, len).is_some() {
        Ok(())
    } else {
        Err(EmuError::invalid(format!("{what} [0x{address:x}, +{len} bytes) is not inside one live device allocation")))
    }
}

fn check_host(pointer: *const c_void, len: usize, what: &str) -> Result<(), EmuError> {
    if pointer.is_null() && len > 0 {
        return Err(EmuError::invalid(format!("{what} is a null host pointer")));
    }
    Ok(())
}

// ---- exported: allocation --------------------------------------------------------------------------------------

/// cuMemAlloc_v2: `bytesize` bytes of 0xCD garbage, 256-byte aligned.
///
/// # Safety
/// `dptr` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    guard("cuMemAlloc_v2", || {
        check_context()?;
        let base = table().allocate(bytesize, false)?;
        // SAFETY: the caller's contract.
        unsafe { write_out(dptr, "dptr", base) }
    })
}

/// cuMemFree_v2: frees an allocation; CUDA_ERROR_ILLEGAL_ADDRESS when something wrote past its end.
#[no_mangle]
pub extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    guard("cuMemFree_v2", || {
        check_context()?;
        table().free(dptr, false)
    })
}

/// cuMemAllocAsync: memory pools are not emulated (the device reports none, so cudarc never asks).
#[no_mangle]
pub extern "C" fn cuMemAllocAsync(_dptr: *mut CUdeviceptr, _bytesize: usize, _stream: CUstream) -> CUresult {
    guard("cuMemAllocAsync", || Err(EmuError::new(code::NOT_SUPPORTED, "memory pools are not emulated")))
}

/// cuMemFreeAsync: see [`cuMemAllocAsync`].
#[no_mangle]
pub extern "C" fn cuMemFreeAsync(_dptr: CUdeviceptr, _stream: CUstream) -> CUresult {
    guard("cuMemFreeAsync", || Err(EmuError::new(code::NOT_SUPPORTED, "memory pools are not emulated")))
}

/// cuMemGetInfo_v2: free and total device memory.
///
/// # Safety
/// `free` and `total` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    guard("cuMemGetInfo_v2", || {
        check_context()?;
        let used = table().device_bytes;
        // SAFETY: the caller's contract.
        unsafe {
            write_out(free, "free", TOTAL_MEMORY.saturating_sub(used))?;
            write_out(total, "total", TOTAL_MEMORY)
        }
    })
}

/// cuMemHostAlloc: page-locked host memory (plain host memory here), usable by kernels like device memory.
///
/// # Safety
/// `pp` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(pp: *mut *mut c_void, bytesize: usize, _flags: u32) -> CUresult {
    guard("cuMemHostAlloc", || {
        check_context()?;
        let base = table().allocate(bytesize, true)?;
        // SAFETY: the caller's contract.
        unsafe { write_out(pp, "pp", base as *mut c_void) }
    })
}

/// cuMemAllocHost_v2: as [`cuMemHostAlloc`] with no flags.
///
/// # Safety
/// `pp` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytesize: usize) -> CUresult {
    // SAFETY: the same contract.
    unsafe { cuMemHostAlloc(pp, bytesize, 0) }
}

/// cuMemFreeHost: frees page-locked host memory.
#[no_mangle]
pub extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    guard("cuMemFreeHost", || {
        check_context()?;
        table().free(p as u64, true)
    })
}

// ---- exported: copies and memsets (all synchronous) -------------------------------------------------------------

fn copy_htod(dst: CUdeviceptr, src: *const c_void, bytes: usize) -> Result<(), EmuError> {
    check_context()?;
    check_range(dst, bytes, "the destination")?;
    check_host(src, bytes, "the source")?;
    if bytes > 0 {
        // SAFETY: the destination range is inside a live allocation; the source is the caller's `bytes` bytes.
        unsafe { std::ptr::copy(src as *const u8, dst as usize as *mut u8, bytes) };
    }
    Ok(())
}

fn copy_dtoh(dst: *mut c_void, src: CUdeviceptr, bytes: usize) -> Result<(), EmuError> {
    check_context()?;
    check_range(src, bytes, "the source")?;
    check_host(dst, bytes, "the destination")?;
    if bytes > 0 {
        // SAFETY: as in `copy_htod`, the other way round.
        unsafe { std::ptr::copy(src as usize as *const u8, dst as *mut u8, bytes) };
    }
    Ok(())
}

fn copy_dtod(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) -> Result<(), EmuError> {
    check_context()?;
    check_range(dst, bytes, "the destination")?;
    check_range(src, bytes, "the source")?;
    if bytes > 0 {
        // SAFETY: both ranges lie inside live allocations; `copy` allows overlap.
        unsafe { std::ptr::copy(src as usize as *const u8, dst as usize as *mut u8, bytes) };
    }
    Ok(())
}

fn fill<T: Copy>(dst: CUdeviceptr, value: T, count: usize) -> Result<(), EmuError> {
    check_context()?;
    let bytes = count
        .checked_mul(std::mem::size_of::<T>())
        .ok_or_else(|| EmuError::invalid(format!("{count} elements overflow")))?;
    check_range(dst, bytes, "the destination")?;
    if dst as usize % std::mem::align_of::<T>() != 0 {
        return Err(EmuError::invalid(format!(
            "0x{dst:x} is not aligned to the {}-byte elements being set",
            std::mem::size_of::<T>()
        )));
    }
    // SAFETY: the range is inside a live allocation and aligned for T.
    unsafe { std::slice::from_raw_parts_mut(dst as usize as *mut T, count) }.fill(value);
    Ok(())
}

/// cuMemcpyHtoD_v2
///
/// # Safety
/// `src` must hold `bytes` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(dst: CUdeviceptr, src: *const c_void, bytes: usize) -> CUresult {
    guard("cuMemcpyHtoD_v2", || copy_htod(dst, src, bytes))
}

/// cuMemcpyHtoDAsync_v2 (synchronous here)
///
/// # Safety
/// `src` must hold `bytes` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    bytes: usize,
    stream: CUstream,
) -> CUresult {
    guard("cuMemcpyHtoDAsync_v2", || {
        check_stream(stream)?;
        copy_htod(dst, src, bytes)
    })
}

/// cuMemcpyDtoH_v2
///
/// # Safety
/// `dst` must have room for `bytes` bytes.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, bytes: usize) -> CUresult {
    guard("cuMemcpyDtoH_v2", || copy_dtoh(dst, src, bytes))
}

/// cuMemcpyDtoHAsync_v2 (synchronous here)
///
/// # Safety
/// `dst` must have room for `bytes` bytes.
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    bytes: usize,
    stream: CUstream,
) -> CUresult {
    guard("cuMemcpyDtoHAsync_v2", || {
        check_stream(stream)?;
        copy_dtoh(dst, src, bytes)
    })
}

/// cuMemcpyDtoD_v2
#[no_mangle]
pub extern "C" fn cuMemcpyDtoD_v2(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) -> CUresult {
    guard("cuMemcpyDtoD_v2", || copy_dtod(dst, src, bytes))
}

/// cuMemcpyDtoDAsync_v2 (synchronous here)
#[no_mangle]
pub extern "C" fn cuMemcpyDtoDAsync_v2(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize, stream: CUstream) -> CUresult {
    guard("cuMemcpyDtoDAsync_v2", || {
        check_stream(stream)?;
        copy_dtod(dst, src, bytes)
    })
}

/// cuMemsetD8_v2
#[no_mangle]
pub extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, value: u8, count: usize) -> CUresult {
    guard("cuMemsetD8_v2", || fill(dst, value, count))
}

/// cuMemsetD8Async (synchronous here)
#[no_mangle]
pub extern "C" fn cuMemsetD8Async(dst: CUdeviceptr, value: u8, count: usize, stream: CUstream) -> CUresult {
    guard("cuMemsetD8Async", || {
        check_stream(stream)?;
        fill(dst, value, count)
    })
}

/// cuMemsetD16_v2
#[no_mangle]
pub extern "C" fn cuMemsetD16_v2(dst: CUdeviceptr, value: u16, count: usize) -> CUresult {
    guard("cuMemsetD16_v2", || fill(dst, value, count))
}

/// cuMemsetD32_v2
#[no_mangle]
pub extern "C" fn cuMemsetD32_v2(dst: CUdeviceptr, value: u32, count: usize) -> CUresult {
    guard("cuMemsetD32_v2", || fill(dst, value, count))
}

/// cuMemsetD32Async (synchronous here)
#[no_mangle]
pub extern "C" fn cuMemsetD32Async(dst: CUdeviceptr, value: u32, count: usize, stream: CUstream) -> CUresult {
    guard("cuMemsetD32Async", || {
        check_stream(stream)?;
        fill(dst, value, count)
    })
}
