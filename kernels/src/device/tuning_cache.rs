//! The on-disk cache of the expert path's cuBLASLt tunings (the CUDA backend's `gemm_tuning`): what one process
//! timed, the next on the same kind of GPU and cuBLASLt release reuses. A worker restarted on a host does not pay the
//! timing again at its first steps, and every process there runs the same algorithm, so their outputs agree to the
//! bit instead of to the tolerance.
//!
//! One file per GPU kind and cuBLASLt release (its name a hash of both, as the PTX cache names its files), one line
//! per shape and token bucket, tab-separated text. A line that does not parse is ignored, as is a file that cannot be
//! read or written: the cache only saves time. What it names is re-checked before it runs: a cuBLASLt algorithm by
//! cuBLASLt, one of our kernels against the shape (and, for the warpgroup kernel, this GPU's wgmma layouts).
//! Plain data and file I/O: no CUDA here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::device::gpu_bench::GemmTuningRow;
use crate::device::plan::{WarpgroupLaunch, WarpgroupStages};
use crate::device::sources::{cache_root, fnv1a, write_atomically};

/// What a tuning chose, as the cache keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachedChoice {
    /// A cuBLASLt algorithm: the opaque words of its `cublasLtMatmulAlgo_t` (written in hex).
    Cublaslt([u64; 8]),
    /// The lone-expert kernel (written `lone`).
    LoneKernel,
    /// The warpgroup expert kernel with this launch (written `wgmma-s<slots>-b<blocks>`).
    WarpgroupKernel(WarpgroupLaunch),
}

impl CachedChoice {
    fn to_field(self) -> String {
        match self {
            CachedChoice::Cublaslt(words) => {
                words.iter().map(|word| format!("{word:016x}")).collect::<Vec<_>>().join(",")
            }
            CachedChoice::LoneKernel => "lone".to_owned(),
            CachedChoice::WarpgroupKernel(launch) => format!("wgmma-s{}-b{}", launch.stages.slots(), launch.blocks),
        }
    }

    fn parse_field(field: &str) -> Option<CachedChoice> {
        if field == "lone" {
            return Some(CachedChoice::LoneKernel);
        }
        if let Some(launch) = field.strip_prefix("wgmma-s") {
            let (slots, blocks) = launch.split_once("-b")?;
            let stages = WarpgroupStages::with_slots(slots.parse().ok()?)?;
            let blocks = blocks.parse().ok().filter(|&blocks| blocks > 0)?;
            return Some(CachedChoice::WarpgroupKernel(WarpgroupLaunch { stages, blocks }));
        }
        let words: Vec<u64> = field.split(',').map(|word| u64::from_str_radix(word, 16).ok()).collect::<Option<_>>()?;
        Some(CachedChoice::Cublaslt(words.try_into().ok()?))
    }
}

/// One tuning as the cache holds it: the report row and what was chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct TuningRecord {
    /// What was timed and chosen (`tokens` is the bucket).
    pub row: GemmTuningRow,
    /// The choice.
    pub choice: CachedChoice,
}

/// Shape and bucket: what a record is for.
pub type TuningCacheKey = (usize, usize, usize);

impl TuningRecord {
    /// The shape and bucket.
    pub fn key(&self) -> TuningCacheKey {
        (self.row.n, self.row.k, self.row.tokens)
    }

    /// The record as one line (no newline): n, k, bucket, alignment, candidates, the four times (heuristic, tuned,
    /// lone-expert kernel, warpgroup kernel; `-` when not timed), the choice ([`CachedChoice`]), and the two
    /// descriptions.
    pub fn to_line(&self) -> String {
        let r = &self.row;
        let us = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |us| format!("{us}"));
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            r.n,
            r.k,
            r.tokens,
            r.alignment,
            r.candidates,
            us(r.heuristic_us),
            us(r.tuned_us),
            us(r.lone_us),
            us(r.warpgroup_us),
            self.choice.to_field(),
            r.heuristic.replace(['\t', '\n'], " "),
            r.tuned.replace(['\t', '\n'], " ")
        )
    }

    /// A line written by [`TuningRecord::to_line`], or `None`.
    pub fn parse_line(line: &str) -> Option<TuningRecord> {
        let fields: Vec<&str> = line.split('\t').collect();
        let [n, k, tokens, alignment, candidates, heuristic_us, tuned_us, lone_us, warpgroup_us, choice, heuristic, tuned] =
            fields[..]
        else {
            return None;
        };
        let us = |field: &str| match field {
            "-" => Some(None),
            value => value.parse::<f64>().ok().filter(|us| us.is_finite() && *us >= 0.0).map(Some),
        };
        Some(TuningRecord {
            row: GemmTuningRow {
                n: n.parse().ok()?,
                k: k.parse().ok()?,
                tokens: tokens.parse().ok()?,
                alignment: alignment.parse().ok()?,
                candidates: candidates.parse().ok()?,
                heuristic_us: us(heuristic_us)?,
                tuned_us: us(tuned_us)?,
                lone_us: us(lone_us)?,
                warpgroup_us: us(warpgroup_us)?,
                heuristic: heuristic.to_owned(),
                tuned: tuned.to_owned(),
                cached: true,
                runners_up: Vec::new(),
            },
            choice: CachedChoice::parse_field(choice)?,
        })
    }
}

/// Where tunings are cached: `$SWITCHYARD_CUBLASLT_CACHE` (`off` for nowhere), else `<cache root>/cublaslt`; `None`
/// when there is no home either.
pub fn tuning_cache_dir() -> Option<PathBuf> {
    match std::env::var_os("SWITCHYARD_CUBLASLT_CACHE").filter(|v| !v.is_empty()) {
        Some(dir) if dir == "off" => None,
        Some(dir) => Some(PathBuf::from(dir)),
        None => cache_root().map(|root| root.join("cublaslt")),
    }
}

/// The cache file of one GPU kind and cuBLASLt release, `identity` naming both (the device's name, SM count and
/// architecture, and cuBLASLt's version): another GPU or release misses the cache.
pub fn tuning_cache_file(dir: &Path, identity: &str) -> PathBuf {
    dir.join(format!("tunings-{:016x}.tsv", fnv1a(identity.as_bytes())))
}

/// The records of a cache file whose first line is `# <identity>`, by shape and bucket; empty when the file is
/// missing, unreadable or for another identity (a hash collision).
pub fn read_tuning_cache(file: &Path, identity: &str) -> BTreeMap<TuningCacheKey, TuningRecord> {
    let Ok(text) = std::fs::read_to_string(file) else { return BTreeMap::new() };
    let mut lines = text.lines();
    if lines.next() != Some(&format!("# {identity}")) {
        return BTreeMap::new();
    }
    lines.filter_map(TuningRecord::parse_line).map(|record| (record.key(), record)).collect()
}

/// Adds `record` to the cache file (replacing one for the same shape and bucket), through a temporary file and a
/// rename so a concurrent reader sees the old file or the new. Two processes adding at once may lose one record:
/// the loser times that shape again next time.
pub fn add_to_tuning_cache(file: &Path, identity: &str, record: &TuningRecord) {
    let mut records = read_tuning_cache(file, identity);
    records.insert(record.key(), record.clone());
    let mut text = format!("# {identity}\n");
    for record in records.values() {
        text.push_str(&record.to_line());
        text.push('\n');
    }
    write_atomically(file, &text);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize, tokens: usize, tuned_us: Option<f64>) -> TuningRecord {
        TuningRecord {
            row: GemmTuningRow {
                n,
                k: 5120,
                tokens,
                alignment: 256,
                candidates: 40,
                heuristic_us: tuned_us.map(|us| us * 1.1),
                tuned_us,
                lone_us: None,
                warpgroup_us: None,
                heuristic: "algo 66 tile 20".into(),
                tuned: "algo 66 tile 17 split-k 2".into(),
                cached: true,
                runners_up: Vec::new(),
            },
            choice: CachedChoice::Cublaslt([1, 2, 3, u64::MAX, 0, 0, 7, 0xdead_beef]),
        }
    }

    #[test]
    fn records_round_trip_through_a_line() {
        let mut lone = TuningRecord { choice: CachedChoice::LoneKernel, ..record(5120, 16, Some(15.5)) };
        lone.row.lone_us = Some(15.5);
        let launch = WarpgroupLaunch { stages: WarpgroupStages::Six, blocks: 120 };
        let mut warpgroup =
            TuningRecord { choice: CachedChoice::WarpgroupKernel(launch), ..record(5120, 128, Some(16.0)) };
        warpgroup.row.warpgroup_us = Some(16.0);
        for r in [record(16384, 128, Some(37.25)), record(5120, 16, None), lone, warpgroup.clone()] {
            assert_eq!(TuningRecord::parse_line(&r.to_line()), Some(r.clone()));
        }
        let wgmma = warpgroup.to_line();
        assert!(wgmma.contains("\twgmma-s6-b120\t"), "{wgmma}");
        for (bad, what) in [("wgmma-s4-b120", "no 4-slot ring"), ("wgmma-s6-b0", "no blocks"), ("wgmma-s6", "no -b")] {
            assert_eq!(TuningRecord::parse_line(&wgmma.replace("wgmma-s6-b120", bad)), None, "{what}");
        }
        let line = record(16384, 128, Some(37.25)).to_line();
        assert_eq!(TuningRecord::parse_line(&line.replace("16384", "x")), None, "bad number");
        assert_eq!(TuningRecord::parse_line(&line.replace(",00000000deadbeef", "")), None, "seven words");
        assert_eq!(TuningRecord::parse_line(&line.replace("37.25", "-1")), None, "negative time");
        assert_eq!(TuningRecord::parse_line("16384\t5120"), None, "short");
    }

    #[test]
    fn the_cache_file_keeps_one_record_per_shape_and_bucket_of_its_identity() {
        let dir = std::env::temp_dir().join(format!("switchyard-tuning-cache-{}", std::process::id()));
        let identity = "NVIDIA H100 80GB HBM3; 132 SMs; compute_90; cuBLASLt 130000";
        let file = tuning_cache_file(&dir, identity);
        assert_ne!(file, tuning_cache_file(&dir, "NVIDIA H200; 132 SMs; compute_90; cuBLASLt 130000"));
        assert!(read_tuning_cache(&file, identity).is_empty(), "no file yet");
        add_to_tuning_cache(&file, identity, &record(16384, 128, Some(40.0)));
        add_to_tuning_cache(&file, identity, &record(5120, 128, Some(20.0)));
        add_to_tuning_cache(&file, identity, &record(16384, 128, Some(37.0)));
        let records = read_tuning_cache(&file, identity);
        assert_eq!(records.len(), 2, "{records:?}");
        assert_eq!(records[&(16384, 5120, 128)].row.tuned_us, Some(37.0), "replaced");
        assert!(read_tuning_cache(&file, "another GPU").is_empty(), "another identity's file is not read");
        // A damaged line is skipped, the others kept.
        let text = std::fs::read_to_string(&file).expect("written");
        std::fs::write(&file, format!("{text}garbage\n")).expect("write");
        assert_eq!(read_tuning_cache(&file, identity).len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
