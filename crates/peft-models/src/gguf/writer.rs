//! Writing GGUF files (version 3): metadata, tensor descriptions, aligned tensor data, as
//! gguf-py's `GGUFWriter` lays them out. Saved atomically through the project's one helper.

use std::path::Path;

use peft_core::atomic;
use peft_ops::quant::{QuantFormat, QuantMatrix};

use super::reader::GgufValue;
use crate::error::{ModelError, Result};

/// Data alignment (`general.alignment`'s default).
const ALIGNMENT: usize = 32;

/// A GGUF file being assembled.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, Vec<usize>, QuantFormat, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set metadata `key` (replacing an earlier value).
    pub fn set(&mut self, key: impl Into<String>, value: GgufValue) {
        let key = key.into();
        self.metadata.retain(|(k, _)| *k != key);
        self.metadata.push((key, value));
    }

    /// Add a tensor: `matrix` (rows of `cols` values) with GGML dims innermost first
    /// (`[cols, rows]` for a matrix, `[cols]` for a vector).
    pub fn tensor(&mut self, name: impl Into<String>, dims: Vec<usize>, matrix: &QuantMatrix) {
        let bytes = matrix_bytes(matrix);
        self.tensors
            .push((name.into(), dims, matrix.format(), bytes));
    }

    /// Write the file to `path` atomically (a crash leaves the old file or none).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut out, key);
            put_value(&mut out, value, true)?;
        }
        let mut offset = 0usize;
        for (name, dims, format, bytes) in &self.tensors {
            put_string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            let ggml = format.ggml_type().ok_or_else(|| ModelError::Save {
                file: path.to_path_buf(),
                reason: format!("tensor `{name}`: {} has no GGML type", format.name()),
            })?;
            out.extend_from_slice(&ggml.to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + bytes.len()).next_multiple_of(ALIGNMENT);
        }
        out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        for (_, _, _, bytes) in &self.tensors {
            out.extend_from_slice(bytes);
            out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        }
        atomic::write_file(path, &out).map_err(ModelError::from)
    }
}

/// The stored bytes of `matrix`, row by row.
fn matrix_bytes(matrix: &QuantMatrix) -> Vec<u8> {
    matrix.bytes().as_slice().to_vec()
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The GGUF type code of a value (`UINT32` for unsigned integers that fit, as llama.cpp
/// writes counts; `INT32` likewise; `FLOAT32` for floats).
fn type_code(value: &GgufValue) -> u32 {
    match value {
        GgufValue::UInt(v) if *v <= u64::from(u32::MAX) => 4,
        GgufValue::UInt(_) => 10,
        GgufValue::Int(v) if i32::try_from(*v).is_ok() => 5,
        GgufValue::Int(_) => 11,
        GgufValue::Float(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
    }
}

fn put_value(out: &mut Vec<u8>, value: &GgufValue, with_type: bool) -> Result<()> {
    if with_type {
        out.extend_from_slice(&type_code(value).to_le_bytes());
    }
    match value {
        GgufValue::UInt(v) if *v <= u64::from(u32::MAX) => {
            out.extend_from_slice(&(*v as u32).to_le_bytes())
        }
        GgufValue::UInt(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Int(v) => match i32::try_from(*v) {
            Ok(v) => out.extend_from_slice(&v.to_le_bytes()),
            Err(_) => out.extend_from_slice(&v.to_le_bytes()),
        },
        GgufValue::Float(v) => out.extend_from_slice(&(*v as f32).to_le_bytes()),
        GgufValue::Bool(v) => out.push(u8::from(*v)),
        GgufValue::String(s) => put_string(out, s),
        GgufValue::Array(items) => {
            // One element type for the whole array: the widest the items need.
            let code = items.iter().map(type_code).max().unwrap_or(4);
            if items
                .iter()
                .any(|i| type_code(i) != code && !integer_widens(i, code))
            {
                return Err(ModelError::InvalidInput(
                    "a GGUF array holds values of different types".into(),
                ));
            }
            out.extend_from_slice(&code.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_array_item(out, item, code)?;
            }
        }
    }
    Ok(())
}

fn integer_widens(item: &GgufValue, code: u32) -> bool {
    matches!(
        (item, code),
        (GgufValue::UInt(_), 10) | (GgufValue::Int(_), 11)
    )
}

fn put_array_item(out: &mut Vec<u8>, item: &GgufValue, code: u32) -> Result<()> {
    match (item, code) {
        (GgufValue::UInt(v), 10) => out.extend_from_slice(&v.to_le_bytes()),
        (GgufValue::Int(v), 11) => out.extend_from_slice(&v.to_le_bytes()),
        _ => put_value(out, item, false)?,
    }
    Ok(())
}
