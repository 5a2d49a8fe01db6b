//! The safetensors header of one file: dtypes, shapes and byte ranges, each checked against the file's size.
//!
//! Parsed by hand rather than with `safetensors::SafeTensors::read_metadata` so that every failure can name the file
//! and the tensor, and so that a tensor in a dtype we do not read (an integer buffer, say) does not make the whole
//! file unreadable: it is recorded and only refused when someone asks for it.

use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde_json::Value;

use crate::error::ModelError;

/// Largest header accepted; the safetensors crate uses the same bound. Anything bigger is garbage, not a header.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The element types this runtime reads from a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// bfloat16.
    BF16,
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
    /// OCP FP8 E4M3 ("e4m3fn"): the quantised expert weights.
    F8E4M3,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
            DType::F8E4M3 => 1,
        }
    }

    /// The dtype's name in a safetensors header.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F32 => "F32",
            DType::F8E4M3 => "F8_E4M3",
        }
    }

    /// Parses a safetensors header dtype; `None` for the ones this runtime does not read.
    pub fn from_safetensors(name: &str) -> Option<DType> {
        match name {
            "BF16" => Some(DType::BF16),
            "F16" => Some(DType::F16),
            "F32" => Some(DType::F32),
            "F8_E4M3" => Some(DType::F8E4M3),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One tensor as a file's header declares it, before name canonicalisation.
pub(crate) struct HeaderEntry {
    /// The name exactly as stored.
    pub name: String,
    /// The dtype, or the header's string when it is not one we read.
    pub dtype: Result<DType, String>,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file (header included), already checked to lie inside it.
    pub range: Range<usize>,
}

/// The length prefix and JSON header of a safetensors file (everything before the tensor data).
pub(crate) fn header_bytes<'a>(file: &Path, bytes: &'a [u8]) -> Result<&'a [u8], ModelError> {
    let data_start = header_span(file, bytes)?;
    Ok(&bytes[..data_start])
}

/// Where the tensor data starts, and the header text's length, checked against the file's length.
fn header_span(file: &Path, bytes: &[u8]) -> Result<usize, ModelError> {
    let actual = bytes.len() as u64;
    let bad = |reason: String| ModelError::BadHeader { file: file.to_path_buf(), reason };
    let Some(prefix) = bytes.get(..8) else {
        return Err(ModelError::Truncated { file: file.to_path_buf(), needed: 8, actual, tensor: None });
    };
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(prefix);
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "header length {header_len} is implausible (limit {MAX_HEADER_BYTES}): not a safetensors file"
        )));
    }
    let data_start = 8 + header_len;
    if data_start > actual {
        return Err(ModelError::Truncated { file: file.to_path_buf(), needed: data_start, actual, tensor: None });
    }
    // Both fit in usize: they are at most the length of a slice.
    Ok(data_start as usize)
}

/// Parses and checks the header of `bytes`, the whole content of `file`.
pub(crate) fn parse_header(file: &Path, bytes: &[u8]) -> Result<Vec<HeaderEntry>, ModelError> {
    let actual = bytes.len() as u64;
    let bad = |reason: String| ModelError::BadHeader { file: file.to_path_buf(), reason };
    let data_start = header_span(file, bytes)?;
    let header_text =
        std::str::from_utf8(&bytes[8..data_start]).map_err(|e| bad(format!("header is not UTF-8: {e}")))?;
    let header: Value = serde_json::from_str(header_text).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let Value::Object(entries) = header else {
        return Err(bad("header is not a JSON object".to_string()));
    };

    let mut out = Vec::with_capacity(entries.len());
    let mut needed = data_start as u64;
    let mut first_short: Option<(u64, String)> = None;
    for (name, entry) in entries {
        if name == "__metadata__" {
            continue;
        }
        let tensor_bad = |reason: &str| bad(format!("tensor {name}: {reason}"));
        let Value::Object(fields) = &entry else {
            return Err(tensor_bad("entry is not an object"));
        };
        let dtype_name =
            fields.get("dtype").and_then(Value::as_str).ok_or_else(|| tensor_bad("missing or non-string dtype"))?;
        let shape: Vec<usize> = fields
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| tensor_bad("missing or malformed shape"))?;
        let offsets: [u64; 2] = fields
            .get("data_offsets")
            .and_then(|o| serde_json::from_value(o.clone()).ok())
            .ok_or_else(|| tensor_bad("missing or malformed data_offsets"))?;
        let [begin, end] = offsets;
        if begin > end {
            return Err(tensor_bad(&format!("data_offsets [{begin}, {end}] run backwards")));
        }
        let dtype = DType::from_safetensors(dtype_name).ok_or_else(|| dtype_name.to_string());
        if let Ok(dtype) = dtype {
            let expected = shape
                .iter()
                .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
                .ok_or_else(|| tensor_bad("shape overflows"))?;
            if expected != end - begin {
                return Err(tensor_bad(&format!(
                    "shape {shape:?} of {dtype} needs {expected} bytes but data_offsets [{begin}, {end}] hold {}",
                    end - begin
                )));
            }
        }
        let abs_end = (data_start as u64).saturating_add(end);
        if abs_end > actual {
            // Keep scanning: the error names the first tensor (by offset) whose data runs past the end, and the
            // size the whole header needs.
            needed = needed.max(abs_end);
            if first_short.as_ref().is_none_or(|(b, _)| begin < *b) {
                first_short = Some((begin, name));
            }
            continue;
        }
        needed = needed.max(abs_end);
        // Both ends fit in usize: they are at most the length of a slice.
        let range = (data_start + begin as usize)..(abs_end as usize);
        out.push(HeaderEntry { name, dtype, shape, range });
    }
    if let Some((_, tensor)) = first_short {
        return Err(ModelError::Truncated { file: file.to_path_buf(), needed, actual, tensor: Some(tensor) });
    }
    Ok(out)
}
