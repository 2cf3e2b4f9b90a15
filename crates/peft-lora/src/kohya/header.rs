//! The one reader of a safetensors file's header and tensors for the kohya code (`LoraFile::read`,
//! [`fuse`](super::fuse), [`combine`](super::combine)): the header size, every tensor's extent
//! and byte count are checked against the file's length before anything is allocated from them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use burn::tensor::{bf16, f16};
use safetensors::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};

/// The safetensors crate refuses headers over 100 MB (tensor.rs `MAX_HEADER_SIZE`); so do we,
/// before allocating them.
const MAX_HEADER: u64 = 100_000_000;

/// A safetensors header: tensors by name and where the data section starts.
pub(super) struct Header {
    pub(super) tensors: BTreeMap<String, TensorInfo>,
    pub(super) data_start: u64,
}

/// Why a header could not be read: the file (I/O), or what it holds.
pub(super) enum HeaderError {
    Io(std::io::Error),
    Corrupt(String),
}

impl HeaderError {
    /// The caller's error for this failure.
    pub(super) fn into<E>(
        self,
        io: impl FnOnce(std::io::Error) -> E,
        corrupt: impl FnOnce(String) -> E,
    ) -> E {
        match self {
            HeaderError::Io(e) => io(e),
            HeaderError::Corrupt(reason) => corrupt(reason),
        }
    }
}

/// Open `path` and read and check its header; the file is returned to read tensors from.
pub(super) fn read_header(path: &Path) -> Result<(File, Header), HeaderError> {
    let mut file = File::open(path).map_err(HeaderError::Io)?;
    let file_len = file.metadata().map_err(HeaderError::Io)?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n).map_err(|_| {
        HeaderError::Corrupt(format!(
            "{file_len} bytes, shorter than the 8-byte header size"
        ))
    })?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n + 8 > file_len {
        return Err(HeaderError::Corrupt(format!(
            "header size {n} does not fit the file ({file_len} bytes)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(HeaderError::Io)?;
    let metadata: Metadata = serde_json::from_slice(&header)
        .map_err(|e| HeaderError::Corrupt(format!("header: {e}")))?;
    let data_start = 8 + n;
    let tensors: BTreeMap<String, TensorInfo> = metadata
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect();
    for (key, info) in &tensors {
        check_extent(key, info, file_len - data_start).map_err(HeaderError::Corrupt)?;
    }
    Ok((
        file,
        Header {
            tensors,
            data_start,
        },
    ))
}

/// A tensor's data offsets hold exactly its dtype and shape, inside the data section.
pub(super) fn check_extent(key: &str, info: &TensorInfo, data_len: u64) -> Result<(), String> {
    let (start, end) = info.data_offsets;
    let numel = info
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("`{key}`: shape {:?} overflows", info.shape))?;
    let bytes = numel
        .checked_mul(info.dtype.bitsize())
        .map(|bits| bits.div_ceil(8));
    if end < start || end as u64 > data_len || bytes != Some(end - start) {
        return Err(format!(
            "`{key}`: data offsets {start}..{end} do not hold {dtype:?} {shape:?} inside the {data_len}-byte data section",
            dtype = info.dtype,
            shape = info.shape
        ));
    }
    Ok(())
}

/// Little-endian bytes of `dtype` (F16 / BF16 / F64, else F32) -> f32.
pub(super) fn to_f32(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect(),
    }
}

/// f32 -> little-endian bytes of `dtype` (F16 / BF16, else F32).
pub(super) fn from_f32(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Read one tensor's bytes (its extent was checked against the file's length).
pub(super) fn read_bytes(
    file: &mut File,
    data_start: u64,
    info: &TensorInfo,
) -> std::io::Result<Vec<u8>> {
    let (start, end) = info.data_offsets;
    let mut bytes = vec![0u8; end - start];
    file.seek(SeekFrom::Start(data_start + start as u64))?;
    file.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Read one tensor as f32.
pub(super) fn read_f32(
    file: &mut File,
    data_start: u64,
    info: &TensorInfo,
) -> std::io::Result<Vec<f32>> {
    Ok(to_f32(&read_bytes(file, data_start, info)?, info.dtype))
}
