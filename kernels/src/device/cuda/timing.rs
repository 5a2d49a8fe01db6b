//! What `bench gpu` and the cuBLASLt tuner share: event timing on the device's stream (both compare several ways of
//! doing the same work and must not let the order they ran in decide), and the random operands they time on.

use cudarc::driver::sys::CUevent_flags;

use super::{driver, CudaDevice};
use crate::device::gpu_bench::splitmix64;
use crate::error::KernelError;

/// Random E4M3 codes without the NaN codes (0x7F, 0xFF), deterministic in `seed`.
pub(super) fn random_codes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut codes = Vec::with_capacity(len + 8);
    while codes.len() < len {
        codes.extend(splitmix64(&mut state).to_le_bytes().map(|b| if b & 0x7F == 0x7F { b ^ 1 } else { b }));
    }
    codes.truncate(len);
    codes
}

/// How many calls to time, and how they are grouped.
#[derive(Debug, Clone, Copy)]
pub(super) struct Schedule {
    /// Untimed calls of each path first.
    pub warmup: usize,
    /// Timed samples of each path; the median is reported.
    pub iterations: usize,
    /// Calls queued back to back in one sample, which reports their mean: one call alone would also time the host's
    /// launch latency, which a serving step hides by queueing its kernels ahead.
    pub calls_per_sample: usize,
}

/// A way of doing the timed work; gets a running call index, to rotate its inputs.
pub(super) type TimedPath<'a> = &'a mut dyn FnMut(usize) -> Result<(), KernelError>;

/// Event-timed samples of several paths over the same problem, interleaved (a sample of each path in turn, then the
/// next round), so that clock and thermal drift during the run fall on every path alike rather than on whichever ran
/// first. Returns each path's median in microseconds, in the order of `paths`.
pub(super) fn interleaved_medians_us(
    device: &CudaDevice,
    schedule: Schedule,
    paths: &mut [TimedPath<'_>],
) -> Result<Vec<f64>, KernelError> {
    for path in paths.iter_mut() {
        for i in 0..schedule.warmup {
            path(i)?;
        }
    }
    let context = device.context();
    let calls = schedule.calls_per_sample.max(1);
    let iterations = schedule.iterations.max(1);
    let mut times: Vec<Vec<f64>> = paths.iter().map(|_| Vec::with_capacity(iterations)).collect();
    let mut call = schedule.warmup;
    for _ in 0..iterations {
        for (path, times) in paths.iter_mut().zip(times.iter_mut()) {
            let start = context.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver("event"))?;
            let end = context.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver("event"))?;
            start.record(device.stream()).map_err(driver("event record"))?;
            for offset in 0..calls {
                path(call + offset)?;
            }
            end.record(device.stream()).map_err(driver("event record"))?;
            let ms = start.elapsed_ms(&end).map_err(driver("event elapsed"))?;
            times.push(f64::from(ms) * 1e3 / calls as f64);
        }
        call += calls;
    }
    Ok(times
        .into_iter()
        .map(|mut times| {
            times.sort_by(f64::total_cmp);
            times[times.len() / 2]
        })
        .collect())
}
