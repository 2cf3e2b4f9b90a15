//! The GGUF container (llama.cpp's `gguf.md`, versions 2 and 3): a header, typed metadata
//! key-value pairs, tensor descriptions, and the aligned tensor data. Every count and length read
//! from the file is checked against the bytes that remain before anything of that size is
//! allocated, so a truncated or hostile file is a typed error, never a panic or an abort.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use peft_ops::quant::{QuantBytes, QuantFormat};

use crate::error::{ModelError, Result};

/// `"GGUF"` read as a little-endian `u32`.
const MAGIC: u32 = 0x4655_4747;
/// The most dimensions a GGML tensor has (`GGML_MAX_DIMS`).
const MAX_DIMS: usize = 4;
/// Data alignment when `general.alignment` is absent (`GGUF_DEFAULT_ALIGNMENT`).
const DEFAULT_ALIGNMENT: u64 = 32;
/// Nested arrays deeper than this are refused (llama.cpp writes none).
const MAX_NESTING: usize = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Unsigned integer (`UINT8` .. `UINT64`).
    UInt(u64),
    /// Signed integer (`INT8` .. `INT64`).
    Int(i64),
    /// Float (`FLOAT32`, `FLOAT64`).
    Float(f64),
    /// `BOOL`.
    Bool(bool),
    /// `STRING` (UTF-8; invalid bytes are replaced).
    String(String),
    /// `ARRAY`.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            GgufValue::UInt(v) => Some(*v),
            GgufValue::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    /// The value as a float (integers converted).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            GgufValue::Float(v) => Some(*v),
            GgufValue::UInt(v) => Some(*v as f64),
            GgufValue::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            GgufValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The elements of an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A tensor's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensor {
    /// llama.cpp's name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, innermost first (GGML's `ne`): a `[out, in]` weight is `[in, out]` here.
    pub dims: Vec<usize>,
    /// The storage format.
    pub format: QuantFormat,
    /// Byte offset in the data section.
    pub offset: u64,
    /// Bytes the tensor takes.
    pub bytes: usize,
}

impl GgufTensor {
    /// `(rows, cols)` as a matrix of rows of `dims[0]` values (a 1-D tensor is one row).
    pub fn matrix(&self) -> (usize, usize) {
        let cols = self.dims.first().copied().unwrap_or(1);
        let rows = self.dims.iter().skip(1).product::<usize>();
        (rows, cols)
    }
}

/// An open GGUF file: its metadata, its tensors' descriptions and its bytes (memory-mapped).
pub struct GgufFile {
    /// The file.
    pub path: PathBuf,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensors in file order.
    pub tensors: Vec<GgufTensor>,
    data_start: usize,
    bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A memory map, shared by the tensors cut from it.
struct Mapped(memmap2::Mmap);

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl GgufFile {
    /// Open and parse `path`. The tensor data is memory-mapped, not read: tensors kept quantized
    /// cost only the pages the kernels touch.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| ModelError::Io {
            file: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // Safety: the map is read-only; a file changed by another process while mapped would
        // give wrong values (not memory unsafety in practice for read-only pages of a regular
        // file), which is how llama.cpp, candle and safetensors loaders map weights too.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Arc::new(Mapped(map)))
    }

    /// Parse GGUF `bytes`; `path` names them in errors.
    pub fn parse(path: &Path, bytes: Arc<dyn AsRef<[u8]> + Send + Sync>) -> Result<Self> {
        let data: &[u8] = (*bytes).as_ref();
        let mut r = Cursor {
            data,
            at: 0,
            file: path,
        };
        let magic = r.u32("magic")?;
        if magic != MAGIC {
            return Err(r.bad(format!(
                "not a GGUF file: the magic is {:02x?}, expected \"GGUF\"",
                magic.to_le_bytes()
            )));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(r.bad(format!(
                "GGUF version {version} is not supported (versions 2 and 3 are)"
            )));
        }
        let tensor_count = r.u64("tensor count")?;
        let kv_count = r.u64("metadata count")?;
        // Each key-value pair takes at least 12 bytes, each tensor description 24: counts
        // beyond what the file can hold are refused before any allocation.
        r.count_fits(kv_count, 12, "metadata entries")?;
        r.count_fits(tensor_count, 24, "tensor descriptions")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = r.string("a metadata key")?;
            let kind = r.u32("a value type")?;
            let value = r.value(kind, &key, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(r.bad(format!("`general.alignment` = {v:?} is not a power of two")));
                }
            },
        };
        let mut tensors = Vec::with_capacity(tensor_count as usize);
        for _ in 0..tensor_count {
            tensors.push(r.tensor_info()?);
        }
        let data_start = (r.at as u64).next_multiple_of(alignment) as usize;
        let data_len = data.len().saturating_sub(data_start);
        for t in &tensors {
            let end = t.offset.checked_add(t.bytes as u64);
            if t.offset % alignment != 0 || end.is_none_or(|e| e > data_len as u64) {
                return Err(r.bad(format!(
                    "tensor `{}` ({} bytes at offset {}) lies past the end of the data ({data_len} \
                     bytes) or is not aligned to {alignment}; the file is truncated or corrupt",
                    t.name, t.bytes, t.offset
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            bytes,
        })
    }

    /// The metadata value `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of `tensor` (shared with the map, not copied).
    pub fn tensor_bytes(&self, tensor: &GgufTensor) -> Result<QuantBytes> {
        let start = self.data_start + tensor.offset as usize;
        QuantBytes::new(self.bytes.clone(), start..start + tensor.bytes).map_err(|e| {
            ModelError::Gguf {
                file: self.path.clone(),
                reason: format!("tensor `{}`: {e}", tensor.name),
            }
        })
    }

    /// An error about this file.
    pub fn error(&self, reason: impl Into<String>) -> ModelError {
        ModelError::Gguf {
            file: self.path.clone(),
            reason: reason.into(),
        }
    }
}

/// A reader over the file's bytes that checks every length against what remains.
struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
    file: &'a Path,
}

impl Cursor<'_> {
    fn bad(&self, reason: String) -> ModelError {
        ModelError::Gguf {
            file: self.file.to_path_buf(),
            reason,
        }
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.at
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        if n > self.remaining() {
            return Err(self.bad(format!(
                "{what} needs {n} bytes at offset {}, but the file ends at {}; it is truncated",
                self.at,
                self.data.len()
            )));
        }
        let out = &self.data[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// `count` items of at least `min_bytes` each must fit in what remains.
    fn count_fits(&self, count: u64, min_bytes: u64, what: &str) -> Result<()> {
        if count.saturating_mul(min_bytes) > self.remaining() as u64 {
            return Err(self.bad(format!(
                "the file claims {count} {what}, more than its {} remaining bytes can hold",
                self.remaining()
            )));
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(self.bad(format!(
                "{what} claims {len} bytes, but {} remain",
                self.remaining()
            )));
        }
        let bytes = self.take(len as usize, what)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, kind: u32, key: &str, depth: usize) -> Result<GgufValue> {
        let what = format!("the value of `{key}`");
        Ok(match kind {
            0 => GgufValue::UInt(u64::from(self.array::<1>(&what)?[0])),
            1 => GgufValue::Int(i64::from(i8::from_le_bytes(self.array(&what)?))),
            2 => GgufValue::UInt(u64::from(u16::from_le_bytes(self.array(&what)?))),
            3 => GgufValue::Int(i64::from(i16::from_le_bytes(self.array(&what)?))),
            4 => GgufValue::UInt(u64::from(self.u32(&what)?)),
            5 => GgufValue::Int(i64::from(i32::from_le_bytes(self.array(&what)?))),
            6 => GgufValue::Float(f64::from(f32::from_le_bytes(self.array(&what)?))),
            7 => GgufValue::Bool(self.array::<1>(&what)?[0] != 0),
            8 => GgufValue::String(self.string(&what)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(
                        self.bad(format!("`{key}`: arrays nested deeper than {MAX_NESTING}"))
                    );
                }
                let inner = self.u32(&what)?;
                let count = self.u64(&what)?;
                let min = match inner {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    other => {
                        return Err(
                            self.bad(format!("`{key}`: unknown array element type {other}"))
                        );
                    }
                };
                self.count_fits(count, min, &format!("elements of `{key}`"))?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(inner, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::UInt(self.u64(&what)?),
            11 => GgufValue::Int(i64::from_le_bytes(self.array(&what)?)),
            12 => GgufValue::Float(f64::from_le_bytes(self.array(&what)?)),
            other => return Err(self.bad(format!("`{key}`: unknown value type {other}"))),
        })
    }

    fn tensor_info(&mut self) -> Result<GgufTensor> {
        let name = self.string("a tensor name")?;
        let n_dims = self.u32("a tensor's dimension count")? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(self.bad(format!(
                "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = self.u64("a tensor dimension")?;
            dims.push(usize::try_from(d).map_err(|_| {
                self.bad(format!(
                    "tensor `{name}`: dimension {d} does not fit in memory"
                ))
            })?);
        }
        let kind = self.u32("a tensor type")?;
        let format = QuantFormat::from_ggml_type(kind).ok_or_else(|| {
            self.bad(format!(
                "tensor `{name}` has GGML type {kind}, which is not read here (F32, F16, BF16, \
                 Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K to Q6_K are)"
            ))
        })?;
        let offset = self.u64("a tensor offset")?;
        let elements = dims
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(*d))
            .ok_or_else(|| self.bad(format!("tensor `{name}`: {dims:?} elements overflow")))?;
        let bytes = format
            .row_bytes(dims[0])
            .and_then(|row| row.checked_mul(elements / dims[0].max(1)))
            .filter(|_| dims[0] > 0 || elements == 0)
            .ok_or_else(|| {
                self.bad(format!(
                    "tensor `{name}`: {dims:?} is not a whole number of {} blocks of {}",
                    format.name(),
                    format.block_size()
                ))
            })?;
        Ok(GgufTensor {
            name,
            dims,
            format,
            offset,
            bytes,
        })
    }
}
