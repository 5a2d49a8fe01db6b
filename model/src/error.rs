//! The one error type of the model crate.
//!
//! Every variant carries what an operator needs to find the problem without a debugger: the tensor name AND the
//! file it came from, the shapes or dtypes on both sides, the config key. Messages are written to be read in a log
//! line on their own.

use std::path::PathBuf;

/// Errors of the model crate: config parsing, checkpoint loading and (later) the forward pass.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be opened, read or memory-mapped.
    #[error("I/O error on {}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A tensor the caller asked for is in no file of the checkpoint.
    #[error("tensor {name} not found in {searched}")]
    MissingTensor {
        /// Canonical tensor name (without a `language_model.` prefix).
        name: String,
        /// What was searched: the checkpoint directory, the index file or the shard that should hold it.
        searched: String,
    },

    /// A tensor's shape is not the one the caller expected.
    #[error("shape mismatch for {name} in {}: expected {expected:?}, found {found:?}", file.display())]
    ShapeMismatch {
        /// Canonical tensor name.
        name: String,
        /// The safetensors file holding it.
        file: PathBuf,
        /// The shape the caller asked for.
        expected: Vec<usize>,
        /// The shape in the file's header.
        found: Vec<usize>,
    },

    /// A tensor's dtype is not the one the caller expected.
    #[error("dtype mismatch for {name} in {}: expected {expected}, found {found}", file.display())]
    DtypeMismatch {
        /// Canonical tensor name.
        name: String,
        /// The safetensors file holding it.
        file: PathBuf,
        /// The dtype(s) the caller accepts.
        expected: String,
        /// The dtype in the file's header.
        found: String,
    },

    /// A tensor is stored in a dtype this runtime cannot read (anything but BF16, F16, F32, F8_E4M3).
    #[error("tensor {name} in {} has unsupported dtype {dtype}", file.display())]
    UnsupportedDtype {
        /// Canonical tensor name.
        name: String,
        /// The safetensors file holding it.
        file: PathBuf,
        /// The dtype string from the header.
        dtype: String,
    },

    /// A file is shorter than its header says.
    #[error(
        "{} is truncated{}: needs {needed} bytes, has {actual}",
        file.display(),
        tensor.as_ref().map(|t| format!(" (tensor {t})")).unwrap_or_default()
    )]
    Truncated {
        /// The short file.
        file: PathBuf,
        /// Bytes the header (or the 8-byte length prefix) requires.
        needed: u64,
        /// Bytes the file has.
        actual: u64,
        /// The tensor whose data runs past the end, when one does.
        tensor: Option<String>,
    },

    /// A safetensors header (or an index file) that cannot be parsed or is inconsistent.
    #[error("bad safetensors header in {}: {reason}", file.display())]
    BadHeader {
        /// The file with the bad header.
        file: PathBuf,
        /// What is wrong, naming the tensor when one is at fault.
        reason: String,
    },

    /// `model.safetensors.index.json` maps a tensor to a shard file that does not exist.
    #[error("{} maps tensor {tensor} to shard {}, which does not exist", index_file.display(), shard.display())]
    MissingShard {
        /// The index file.
        index_file: PathBuf,
        /// The missing shard's path.
        shard: PathBuf,
        /// The first tensor the index maps to it.
        tensor: String,
    },

    /// A directory holds neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error("no checkpoint in {}: expected model.safetensors or model.safetensors.index.json", dir.display())]
    NoCheckpoint {
        /// The directory searched.
        dir: PathBuf,
    },

    /// A `config.json` that is malformed, contradicts itself or asks for something this runtime does not support.
    #[error("bad config {}: {reason}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the key.
        reason: String,
    },

    /// The config and the checkpoint's tensors disagree (vocab size, hidden size, expert count, missing router...).
    #[error("config contradicts tensor {name} in {}: {reason}", file.display())]
    ConfigContradictsTensors {
        /// Canonical tensor name.
        name: String,
        /// The file holding it, or for a missing tensor the checkpoint's index or single file.
        file: PathBuf,
        /// What disagrees, naming the config key.
        reason: String,
    },

    /// A kernel failed.
    #[error(transparent)]
    Kernel(#[from] switchyard_kernels::KernelError),

    /// Bad input from a user or caller: a token id out of range, an expert id out of range, an empty prompt.
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// The field or argument at fault.
        what: String,
        /// Why, naming the limit.
        reason: String,
    },

    /// A member of a context-parallel group (an attention worker holding part of the sequence's KV) failed a step.
    #[error("context-parallel member {member} failed global layer {layer}: {source}")]
    ContextMember {
        /// The member's worker id.
        member: String,
        /// The decoder layer.
        layer: usize,
        /// Whether repeating the step may succeed.
        retryable: bool,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The KV block pool cannot hand out the blocks a step needs.
    #[error("the KV cache is full: the step needs {needed} more blocks, {available} of {capacity} are free")]
    KvCacheFull {
        /// Blocks the step needs.
        needed: usize,
        /// Blocks free in the pool.
        available: usize,
        /// Blocks in the pool.
        capacity: usize,
    },

    /// The tokenizer could not be loaded or used.
    #[error("tokenizer {}: {reason}", path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Routed experts computed elsewhere (an expert worker) failed. The source is the caller's own error type, so
    /// whoever supplied the [`crate::RoutedExperts`] can take it back out with `downcast`.
    #[error("routed experts of layer {layer}: {source}")]
    RoutedExperts {
        /// Decoder layer index of the MoE layer.
        layer: usize,
        /// Whether re-sending the step may succeed (e.g. to a replica of a lost worker).
        retryable: bool,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ModelError {
    /// Whether repeating the same operation may succeed: a file, a config or an input does not fix itself, a full
    /// KV cache or a lost expert worker may. The match is exhaustive on purpose, so a new variant has to decide.
    pub fn retryable(&self) -> bool {
        match self {
            ModelError::Io { .. }
            | ModelError::MissingTensor { .. }
            | ModelError::ShapeMismatch { .. }
            | ModelError::DtypeMismatch { .. }
            | ModelError::UnsupportedDtype { .. }
            | ModelError::Truncated { .. }
            | ModelError::BadHeader { .. }
            | ModelError::MissingShard { .. }
            | ModelError::NoCheckpoint { .. }
            | ModelError::Config { .. }
            | ModelError::ConfigContradictsTensors { .. }
            | ModelError::Kernel(_)
            | ModelError::InvalidInput { .. }
            | ModelError::Tokenizer { .. } => false,
            // Blocks come back as other sequences finish or are preempted.
            ModelError::KvCacheFull { .. } => true,
            ModelError::RoutedExperts { retryable, .. } | ModelError::ContextMember { retryable, .. } => *retryable,
        }
    }
}
