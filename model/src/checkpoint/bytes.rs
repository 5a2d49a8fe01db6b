//! Zero-copy views of checkpoint bytes and the ledger that records every view handed out.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use memmap2::{Mmap, MmapMut};

use crate::error::ModelError;

/// A byte range of a memory-mapped checkpoint file, shared without copying. Cloning is cheap (an `Arc`).
#[derive(Clone)]
pub struct TensorBytes {
    mmap: Arc<Mmap>,
    range: Range<usize>,
}

impl TensorBytes {
    /// Only the checkpoint builds views of its files, after checking `range` lies inside `mmap`.
    pub(crate) fn new(mmap: Arc<Mmap>, range: Range<usize>) -> TensorBytes {
        debug_assert!(range.start <= range.end && range.end <= mmap.len());
        TensorBytes { mmap, range }
    }

    /// Copies `bytes` into an anonymous read-only mapping: for tests and generated weights that never were in a
    /// file, so that code taking [`TensorBytes`] needs no second path.
    pub fn from_bytes(bytes: &[u8]) -> Result<TensorBytes, ModelError> {
        let io = |source| ModelError::Io { path: PathBuf::from("<anonymous mapping>"), source };
        // A zero-length anonymous mapping is refused by the kernel; map one byte and expose none.
        let mut map = MmapMut::map_anon(bytes.len().max(1)).map_err(io)?;
        map[..bytes.len()].copy_from_slice(bytes);
        let mmap = map.make_read_only().map_err(io)?;
        Ok(TensorBytes::new(Arc::new(mmap), 0..bytes.len()))
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // The range was checked against the mapping when the view was made; an empty slice is unreachable.
        self.mmap.get(self.range.clone()).unwrap_or(&[])
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// Absolute byte range of this view in its file.
    pub fn file_range(&self) -> Range<usize> {
        self.range.clone()
    }
}

impl fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TensorBytes({} bytes at {:?})", self.range.len(), self.range)
    }
}

impl AsRef<[u8]> for TensorBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// A byte range of one tensor in one checkpoint file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ByteRange {
    /// Canonical name of the tensor the bytes belong to.
    pub tensor: String,
    /// The file.
    pub file: PathBuf,
    /// Absolute byte range in the file.
    pub range: Range<usize>,
}

/// Ordered by file, then start, then end, then tensor name: sorted ranges read like a map of the files.
impl Ord for ByteRange {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.file, self.range.start, self.range.end, &self.tensor).cmp(&(
            &other.file,
            other.range.start,
            other.range.end,
            &other.tensor,
        ))
    }
}

impl PartialOrd for ByteRange {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl ByteRange {
    /// Whether the two ranges share at least one byte of the same file.
    pub fn intersects(&self, other: &ByteRange) -> bool {
        self.file == other.file && self.range.start < other.range.end && other.range.start < self.range.end
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

/// Record of every tensor byte range the checkpoint handed out, in order, duplicates included. Headers are not
/// recorded: they are metadata, read once at open. Operators and tests use it to see exactly what a load touched.
#[derive(Debug, Default)]
pub struct Ledger {
    entries: Mutex<Vec<ByteRange>>,
}

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, Vec<ByteRange>> {
        // A panic while holding the lock cannot leave a half-written Vec push behind; keep going.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn record(&self, range: ByteRange) {
        self.lock().push(range);
    }

    /// Every range handed out so far, in order.
    pub fn ranges(&self) -> Vec<ByteRange> {
        self.lock().clone()
    }

    /// Total bytes handed out so far (a range read twice counts twice).
    pub fn bytes_read(&self) -> u64 {
        self.lock().iter().map(|r| r.range.len() as u64).sum()
    }

    /// Number of ranges handed out so far.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing was handed out yet.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Forgets everything recorded so far (to measure one phase of a load on its own).
    pub fn clear(&self) {
        self.lock().clear();
    }
}
