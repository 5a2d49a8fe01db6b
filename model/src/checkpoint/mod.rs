//! Memory-mapped safetensors checkpoints: one `model.safetensors` or shards listed by
//! `model.safetensors.index.json`.
//!
//! Each file is mapped once and shared through an `Arc`; headers are parsed and every byte range is checked against
//! the file size at open, so later reads cannot run off a file. Tensor names are canonicalised (a leading
//! `language_model.` is stripped, `vision_model.*` and `multi_modal_projector.*` are skipped) so the same names work
//! for multimodal and text-only checkpoints. Every read goes through the [`Ledger`], which records the exact byte
//! ranges handed out: that is how selective expert loading is proven, and nothing else reads the mappings.
//!
//! What comes out is already normalised: [`Checkpoint::linear`] gives nn.Linear-layout weights (f32, or FP8 codes
//! still in the mapping plus per-row scales) and [`Checkpoint::expert`] hides the two expert layouts (fused BF16
//! tensors or per-expert FP8 ones) behind one [`ExpertWeights`].

mod bytes;
mod check;
mod experts;
mod header;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;
use switchyard_kernels::fp8::e4m3_to_f32;

use crate::error::ModelError;
use crate::linear::LinearWeight;

pub use bytes::{ByteRange, Ledger, TensorBytes};
pub use experts::{ExpertLayout, ExpertWeights};
pub use header::DType;

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of a sharded checkpoint's index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one tensor lives. Reading it is a separate step that goes through the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Canonical name (no `language_model.` prefix).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// The safetensors file holding it.
    pub file: PathBuf,
    /// Absolute byte range in that file.
    pub range: Range<usize>,
    file_index: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// This tensor's bytes as a [`ByteRange`].
    pub fn byte_range(&self) -> ByteRange {
        ByteRange { tensor: self.name.clone(), file: self.file.clone(), range: self.range.clone() }
    }
}

/// A tensor in a dtype this runtime does not read: kept so that asking for it gives a precise error.
#[derive(Debug, Clone)]
struct UnsupportedTensor {
    file: PathBuf,
    dtype: String,
}

struct MappedFile {
    mmap: Arc<Mmap>,
}

/// An opened checkpoint. Cheap to share by reference across threads; reads take `&self`.
pub struct Checkpoint {
    dir: PathBuf,
    /// The index file, or the single file: what errors about the checkpoint as a whole name.
    source: PathBuf,
    files: Vec<MappedFile>,
    file_paths: Vec<PathBuf>,
    tensors: HashMap<String, TensorInfo>,
    unsupported: HashMap<String, UnsupportedTensor>,
    expert_layout: Option<ExpertLayout>,
    ledger: Ledger,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("source", &self.source)
            .field("files", &self.file_paths.len())
            .field("tensors", &self.tensors.len())
            .field("expert_layout", &self.expert_layout)
            .finish()
    }
}

/// Bytes of each end of every tensor that [`Checkpoint::fingerprint`] hashes.
const FINGERPRINT_SAMPLE: usize = 4096;

/// The name a stored tensor is known by here, or `None` for the vision tower and projector, which are skipped.
pub fn canonical_name(stored: &str) -> Option<&str> {
    if stored.starts_with("vision_model.") || stored.starts_with("multi_modal_projector.") {
        return None;
    }
    Some(stored.strip_prefix("language_model.").unwrap_or(stored))
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`: `model.safetensors.index.json` and its shards if the index exists, else
    /// `model.safetensors`. Maps every file, parses and checks every header; reads no tensor data.
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint, ModelError> {
        let dir = dir.as_ref().to_path_buf();
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let (source, index) = if index_path.is_file() {
            let index = read_index(&dir, &index_path)?;
            (index_path, Some(index))
        } else if single_path.is_file() {
            (single_path.clone(), None)
        } else {
            return Err(ModelError::NoCheckpoint { dir });
        };
        let file_paths = match &index {
            Some(index) => index.shards.clone(),
            None => vec![single_path],
        };

        let mut files = Vec::with_capacity(file_paths.len());
        let mut tensors: HashMap<String, TensorInfo> = HashMap::new();
        let mut unsupported: HashMap<String, UnsupportedTensor> = HashMap::new();
        for (file_index, path) in file_paths.iter().enumerate() {
            let mmap = map_file(path)?;
            for entry in header::parse_header(path, &mmap)? {
                let Some(name) = canonical_name(&entry.name) else {
                    continue;
                };
                let earlier = tensors.get(name).map(|t| &t.file).or_else(|| unsupported.get(name).map(|t| &t.file));
                if let Some(earlier) = earlier {
                    return Err(ModelError::BadHeader {
                        file: path.clone(),
                        reason: format!(
                            "tensor {name} (stored as {}) appears twice; it is also in {}",
                            entry.name,
                            earlier.display()
                        ),
                    });
                }
                match entry.dtype {
                    Ok(dtype) => {
                        tensors.insert(
                            name.to_string(),
                            TensorInfo {
                                name: name.to_string(),
                                dtype,
                                shape: entry.shape,
                                file: path.clone(),
                                range: entry.range,
                                file_index,
                            },
                        );
                    }
                    Err(dtype) => {
                        unsupported.insert(name.to_string(), UnsupportedTensor { file: path.clone(), dtype });
                    }
                }
            }
            files.push(MappedFile { mmap: Arc::new(mmap) });
        }

        if let Some(index) = &index {
            for (name, shard) in &index.weight_map {
                let found = tensors.get(name).map(|t| &t.file).or_else(|| unsupported.get(name).map(|t| &t.file));
                if found != Some(shard) {
                    return Err(ModelError::MissingTensor {
                        name: name.clone(),
                        searched: format!("{} (where {} maps it)", shard.display(), source.display()),
                    });
                }
            }
        }

        let expert_layout = experts::detect_layout(&tensors)?;
        Ok(Checkpoint {
            dir,
            source,
            files,
            file_paths,
            tensors,
            unsupported,
            expert_layout,
            ledger: Ledger::default(),
        })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The index file of a sharded checkpoint, or the single file.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The safetensors files, in the order they were opened.
    pub fn files(&self) -> &[PathBuf] {
        &self.file_paths
    }

    /// A fingerprint of what this checkpoint serves: SHA-256 over `config.json` (when present); per safetensors
    /// file in order, its name, length and header (every tensor's name, dtype, shape and offsets); and a sample of
    /// every tensor's data, its first and last 4 KiB. Workers of one cluster must agree on it.
    ///
    /// Hashing 400 GB would take minutes per worker start; the headers pin every tensor's size and position, and the
    /// samples tell apart two checkpoints of the same layout (other weights, another fine-tune), at a few KiB read per
    /// tensor. The samples are read from the mapping directly, not through the [`Ledger`]: they are not weights
    /// loaded.
    pub fn fingerprint(&self) -> Result<String, ModelError> {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        let config = self.dir.join("config.json");
        match std::fs::read(&config) {
            Ok(bytes) => {
                hasher.update(b"config.json\0");
                hasher.update((bytes.len() as u64).to_le_bytes());
                hasher.update(&bytes);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ModelError::Io { path: config, source: e }),
        }
        for (path, file) in self.file_paths.iter().zip(&self.files) {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let header = header::header_bytes(path, &file.mmap)?;
            hasher.update(name.as_bytes());
            hasher.update(b"\0");
            hasher.update((file.mmap.len() as u64).to_le_bytes());
            hasher.update(header);
        }
        let mut tensors: Vec<&TensorInfo> = self.tensors.values().collect();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        for tensor in tensors {
            let bytes = &self.files[tensor.file_index].mmap[tensor.range.clone()];
            let head = bytes.len().min(FINGERPRINT_SAMPLE);
            hasher.update(tensor.name.as_bytes());
            hasher.update(&bytes[..head]);
            hasher.update(&bytes[bytes.len() - head..]);
        }
        Ok(format!("sha256:{:x}", hasher.finalize()))
    }

    /// The record of every byte range handed out.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Canonical names of all readable tensors, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// All readable tensors, in no particular order.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values()
    }

    /// Whether the checkpoint holds `name` (in any dtype).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.unsupported.contains_key(name)
    }

    /// Where tensor `name` lives; reads nothing.
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo, ModelError> {
        if let Some(info) = self.tensors.get(name) {
            return Ok(info);
        }
        if let Some(t) = self.unsupported.get(name) {
            return Err(ModelError::UnsupportedDtype {
                name: name.to_string(),
                file: t.file.clone(),
                dtype: t.dtype.clone(),
            });
        }
        Err(self.missing(name))
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::MissingTensor { name: name.to_string(), searched: self.source.display().to_string() }
    }

    /// Tensor `name` as f32, from any dtype (FP8 codes are decoded without a scale), after checking its shape.
    pub fn tensor_f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let info = self.tensor_info(name)?;
        check_shape(info, expected_shape)?;
        let bytes = self.view(info, 0..info.range.len());
        Ok(decode_f32(info.dtype, bytes.as_slice()))
    }

    /// Tensor `name`'s raw bytes, zero-copy, after checking its dtype and shape.
    pub fn tensor_bytes(&self, name: &str, dtype: DType, shape: &[usize]) -> Result<TensorBytes, ModelError> {
        let info = self.tensor_info(name)?;
        if info.dtype != dtype {
            return Err(ModelError::DtypeMismatch {
                name: name.to_string(),
                file: info.file.clone(),
                expected: dtype.to_string(),
                found: info.dtype.to_string(),
            });
        }
        check_shape(info, shape)?;
        Ok(self.view(info, 0..info.range.len()))
    }

    /// An nn.Linear weight `name` of shape `[out_features, in_features]`. BF16/F16/F32 become
    /// [`LinearWeight::F32`]; F8_E4M3 stays in the mapping as [`LinearWeight::Fp8`] with the per-row scales of
    /// `{name}_scale` (i.e. `….weight_scale`), which may be `[out, 1]` or `[out]` (or one per-tensor value).
    pub fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<LinearWeight, ModelError> {
        let info = self.tensor_info(name)?;
        check_shape(info, &[out_features, in_features])?;
        if info.dtype == DType::F8E4M3 {
            let scales = self.row_scales(info, out_features)?;
            let codes = self.view(info, 0..info.range.len());
            Ok(LinearWeight::Fp8 { codes, scales, out_features, in_features })
        } else {
            let bytes = self.view(info, 0..info.range.len());
            Ok(LinearWeight::F32 { weight: decode_f32(info.dtype, bytes.as_slice()), out_features, in_features })
        }
    }

    /// The per-output-row scales of FP8 weight `weight`.
    fn row_scales(&self, weight: &TensorInfo, rows: usize) -> Result<Vec<f32>, ModelError> {
        let name = scale_name(&weight.name);
        let info = match self.tensor_info(&name) {
            Err(ModelError::MissingTensor { .. }) => {
                return Err(ModelError::MissingTensor {
                    searched: format!("{} (the scale of FP8 weight {})", weight.file.display(), weight.name),
                    name,
                })
            }
            other => other?,
        };
        if info.dtype == DType::F8E4M3 {
            return Err(ModelError::DtypeMismatch {
                name,
                file: info.file.clone(),
                expected: "F32, BF16 or F16".to_string(),
                found: info.dtype.to_string(),
            });
        }
        let per_row = info.shape == [rows, 1] || info.shape == [rows];
        let per_tensor = info.numel() == 1 && info.shape.len() <= 2;
        if !per_row && !per_tensor {
            return Err(ModelError::ShapeMismatch {
                name,
                file: info.file.clone(),
                expected: vec![rows, 1],
                found: info.shape.clone(),
            });
        }
        let bytes = self.view(info, 0..info.range.len());
        let scales = decode_f32(info.dtype, bytes.as_slice());
        Ok(if per_row { scales } else { vec![scales.first().copied().unwrap_or(1.0); rows] })
    }

    /// Hands out bytes `sub` (relative to the tensor's start, within it) of `info`, recording them in the ledger.
    /// The one place that reads the mappings.
    fn view(&self, info: &TensorInfo, sub: Range<usize>) -> TensorBytes {
        let start = info.range.start + sub.start;
        let end = (info.range.start + sub.end).min(info.range.end);
        self.ledger.record(ByteRange { tensor: info.name.clone(), file: info.file.clone(), range: start..end });
        TensorBytes::new(self.files[info.file_index].mmap.clone(), start..end)
    }
}

/// The scale tensor of FP8 weight `weight` (`x.weight` -> `x.weight_scale`).
pub fn scale_name(weight: &str) -> String {
    format!("{weight}_scale")
}

fn check_shape(info: &TensorInfo, expected: &[usize]) -> Result<(), ModelError> {
    if info.shape != expected {
        return Err(ModelError::ShapeMismatch {
            name: info.name.clone(),
            file: info.file.clone(),
            expected: expected.to_vec(),
            found: info.shape.clone(),
        });
    }
    Ok(())
}

/// Little-endian `bytes` of `dtype` as f32 (FP8 decoded without a scale).
pub(crate) fn decode_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DType::F8E4M3 => bytes.iter().map(|&code| e4m3_to_f32(code)).collect(),
    }
}

fn map_file(path: &Path) -> Result<Mmap, ModelError> {
    let io = |source| ModelError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len < 8 {
        return Err(ModelError::Truncated { file: path.to_path_buf(), needed: 8, actual: len, tensor: None });
    }
    // SAFETY: the mapping is read-only and lives as long as the `Arc` holding it. Like every safetensors loader we
    // rely on checkpoint files not being truncated or rewritten while they are served; every range taken from the
    // mapping was checked against the length seen here.
    unsafe { Mmap::map(&file) }.map_err(io)
}

struct Index {
    /// Canonical tensor name -> shard path, text tensors only.
    weight_map: BTreeMap<String, PathBuf>,
    /// Shards holding text tensors, each once, in order of first mention.
    shards: Vec<PathBuf>,
}

fn read_index(dir: &Path, index_path: &Path) -> Result<Index, ModelError> {
    let bad = |reason: String| ModelError::BadHeader { file: index_path.to_path_buf(), reason };
    let text = std::fs::read_to_string(index_path)
        .map_err(|source| ModelError::Io { path: index_path.to_path_buf(), source })?;
    let json: Value = serde_json::from_str(&text).map_err(|e| bad(format!("index is not valid JSON: {e}")))?;
    let Some(Value::Object(map)) = json.get("weight_map") else {
        return Err(bad("index has no weight_map object".to_string()));
    };
    let mut weight_map = BTreeMap::new();
    let mut shards: Vec<PathBuf> = Vec::new();
    for (stored, shard) in map {
        let Some(name) = canonical_name(stored) else {
            continue;
        };
        let Some(shard) = shard.as_str() else {
            return Err(bad(format!("weight_map entry for {stored} is not a file name: {shard}")));
        };
        // Shards are plain file names next to the index; anything else would let an index point outside the dir.
        if Path::new(shard).file_name().and_then(|n| n.to_str()) != Some(shard) {
            return Err(bad(format!("weight_map entry for {stored} names {shard:?}, which is not a plain file name")));
        }
        let path = dir.join(shard);
        if !shards.contains(&path) {
            if !path.is_file() {
                return Err(ModelError::MissingShard {
                    index_file: index_path.to_path_buf(),
                    shard: path,
                    tensor: stored.clone(),
                });
            }
            shards.push(path.clone());
        }
        if weight_map.insert(name.to_string(), path).is_some() {
            return Err(bad(format!("weight_map maps {name} twice (with and without language_model.)")));
        }
    }
    Ok(Index { weight_map, shards })
}
