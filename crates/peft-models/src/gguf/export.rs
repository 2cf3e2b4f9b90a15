//! Back out to llama.cpp: a LoRA adapter as llama.cpp's own LoRA GGUF, and a merged model as a
//! GGUF file beside its base, so what is fine-tuned here runs in llama.cpp (and Ollama, LM
//! Studio, ... built on it).
//!
//! The adapter layout is `convert_lora_to_gguf.py`'s: `general.type = "adapter"`,
//! `adapter.type = "lora"`, `adapter.lora.alpha`, and per adapted weight `<base tensor>.lora_a`
//! (GGML dims `[in, r]`, i.e. PEFT's `lora_A` `[r, in]` as stored) and `<base tensor>.lora_b`
//! (`[r, out]`, PEFT's `lora_B` `[out, r]`), which `llama-adapter.cpp` checks against the base
//! tensor's shape. llama.cpp scales every pair by `alpha / r` with one `alpha` per file, while
//! PEFT's `rank_pattern` / `alpha_pattern` / rsLoRA give each site its own scaling: `lora_b` is
//! written pre-multiplied so that `alpha / r` times it is the site's `scaling · B`. Llama's
//! `attn_q` / `attn_k` rows are permuted for llama.cpp's RoPE in the base file, so `lora_b`'s rows
//! are permuted the same way (as the converter's `LoraTorchTensor` permutes B).

use std::collections::BTreeMap;
use std::path::Path;

use burn_store::burn_pack::Tensor as PackTensor;
use peft_ops::quant::{QuantFormat, QuantMatrix};

use super::config_json;
use super::reader::{GgufFile, GgufTensor, GgufValue};
use super::weights::{names, unpermute};
use super::writer::GgufWriter;
use crate::arch::{GgufArch, GgufFix};
use crate::error::{ModelError, Result};

/// One adapted linear layer of a LoRA adapter, in PEFT's layout.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// The base module's path under Hugging Face names (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// `lora_A`, `[rank, in_features]` row-major.
    pub a: Vec<f32>,
    /// `lora_B`, `[out_features, rank]` row-major.
    pub b: Vec<f32>,
    /// Rank of this site.
    pub rank: usize,
    /// The site's scaling (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA).
    pub scaling: f64,
}

/// The family of `base` and the Hugging Face parameter name -> GGUF tensor name map.
fn base_names(base: &GgufFile) -> Result<(&'static GgufArch, BTreeMap<String, String>)> {
    let (_, spec, arch) = config_json(base)?;
    let layers = base
        .get(&format!("{}.block_count", arch.name))
        .and_then(GgufValue::as_u64)
        .ok_or_else(|| base.error(format!("no `{}.block_count` in the metadata", arch.name)))?;
    let layers = usize::try_from(layers).map_err(|_| base.error("block_count is too large"))?;
    Ok((arch, names(spec, layers)))
}

/// Attention heads whose rows `tensor` permutes for llama.cpp's RoPE, if it does.
fn permuted_heads(base: &GgufFile, arch: &GgufArch, tensor: &str) -> Option<usize> {
    if arch.fix != GgufFix::LlamaRopePermute {
        return None;
    }
    let key = if tensor.contains(".attn_q.") {
        "attention.head_count"
    } else if tensor.contains(".attn_k.") {
        "attention.head_count_kv"
    } else {
        return None;
    };
    let heads = base.get(&format!("{}.{key}", arch.name))?.as_u64()?;
    usize::try_from(heads).ok()
}

/// Rows of a `[rows, cols]` matrix in llama.cpp's RoPE order (`convert_hf_to_gguf.py`'s
/// `LlamaModel.permute`, the inverse of what loading undoes).
fn permute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Option<Vec<f32>> {
    let order = unpermute(rows, heads)?;
    // Loading reads HF row `k` from GGUF row `order[k]`; writing puts it back there.
    let mut out = vec![0.0; values.len()];
    for (hf_row, &gguf_row) in order.iter().enumerate() {
        out[gguf_row * cols..(gguf_row + 1) * cols]
            .copy_from_slice(&values[hf_row * cols..(hf_row + 1) * cols]);
    }
    Some(out)
}

fn dense(values: Vec<f32>, rows: usize, cols: usize) -> Result<QuantMatrix> {
    QuantMatrix::quantize(QuantFormat::F32, &values, rows, cols)
        .map_err(|e| ModelError::InvalidInput(e.to_string()))
}

/// Write `pairs` as a llama.cpp LoRA adapter for the GGUF model `base` to `out`.
///
/// `alpha` goes to `adapter.lora.alpha` (PEFT's `lora_alpha`; any positive value gives the same
/// result since `lora_b` is pre-scaled). A module that has no tensor in `base`, or whose shapes
/// do not fit it, is an error naming it.
pub fn write_lora_adapter(
    base: &GgufFile,
    pairs: &[LoraPair],
    alpha: f64,
    name: Option<&str>,
    out: &Path,
) -> Result<()> {
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(ModelError::InvalidInput(format!(
            "adapter.lora.alpha must be a positive number, got {alpha}"
        )));
    }
    let (arch, names) = base_names(base)?;
    let mut writer = GgufWriter::new();
    writer.set("general.architecture", GgufValue::String(arch.name.into()));
    writer.set("general.type", GgufValue::String("adapter".into()));
    writer.set("adapter.type", GgufValue::String("lora".into()));
    writer.set("adapter.lora.alpha", GgufValue::Float(alpha));
    if let Some(name) = name {
        writer.set("general.name", GgufValue::String(name.into()));
    }
    for pair in pairs {
        let key = format!("{}.weight", pair.module);
        let tensor = names
            .get(&key)
            .and_then(|n| base.tensor(n))
            .ok_or_else(|| {
                base.error(format!(
                    "the adapter adapts `{}`, which has no tensor in this GGUF model (llama.cpp \
                     adapters can adapt only the model's own weight matrices)",
                    pair.module
                ))
            })?;
        let (out_features, in_features) = tensor.matrix();
        let r = pair.rank;
        if r == 0
            || tensor.dims.len() != 2
            || pair.a.len() != r * in_features
            || pair.b.len() != out_features * r
        {
            return Err(base.error(format!(
                "`{}`: lora_A has {} values and lora_B {} for rank {r}, but `{}` is \
                 [{out_features}, {in_features}]",
                pair.module,
                pair.a.len(),
                pair.b.len(),
                tensor.name
            )));
        }
        // llama.cpp applies `alpha / r · B A`; the site needs `scaling · B A`.
        let factor = (pair.scaling * r as f64 / alpha) as f32;
        let mut b: Vec<f32> = pair.b.iter().map(|v| v * factor).collect();
        if let Some(heads) = permuted_heads(base, arch, &tensor.name) {
            b = permute_rows(&b, out_features, r, heads).ok_or_else(|| {
                base.error(format!(
                    "`{}` has {out_features} rows, not whole RoPE pairs for {heads} heads",
                    tensor.name
                ))
            })?;
        }
        let stem = tensor.name.clone();
        writer.tensor(
            format!("{stem}.lora_a"),
            vec![in_features, r],
            &dense(pair.a.clone(), r, in_features)?,
        );
        writer.tensor(
            format!("{stem}.lora_b"),
            vec![r, out_features],
            &dense(b, out_features, r)?,
        );
    }
    writer.write(out)
}

/// llama.cpp's `general.file_type` (`LlamaFileType`) for weights mostly in `format`.
fn file_type(format: QuantFormat) -> Option<u64> {
    Some(match format {
        QuantFormat::F32 => 0,
        QuantFormat::F16 => 1,
        QuantFormat::Q4_0 => 2,
        QuantFormat::Q4_1 => 3,
        QuantFormat::Q8_0 => 7,
        QuantFormat::Q5_0 => 8,
        QuantFormat::Q5_1 => 9,
        QuantFormat::BF16 => 32,
        _ => return None,
    })
}

/// Write the merged model `tensors` (Hugging Face names, PyTorch layout, f32: what
/// [`crate::hf_tensors`] gives) as a GGUF file laid out like `base`: the same metadata
/// (tokenizer and chat template included), the same tensors in the same order, weight
/// matrices in `format` (F32, F16, BF16, Q8_0, Q4_0, ...), vectors in F32 as llama.cpp keeps
/// them. A matrix whose rows are not whole blocks of `format` falls back to F16, as
/// `convert_hf_to_gguf.py` does. Base tensors the model does not have (llama.cpp's own
/// `rope_freqs`, ...) are copied as they are.
pub fn write_merged(
    base: &GgufFile,
    tensors: Vec<(String, PackTensor)>,
    format: QuantFormat,
    out: &Path,
) -> Result<()> {
    let ftype = file_type(format).ok_or_else(|| {
        ModelError::InvalidInput(format!(
            "cannot write a GGUF model in {format}; write F32, F16, BF16, Q8_0, Q5_1, Q5_0, \
             Q4_1 or Q4_0 (and quantize further with llama.cpp's llama-quantize)"
        ))
    })?;
    let (arch, names) = base_names(base)?;
    let mut by_gguf: BTreeMap<&str, PackTensor> = BTreeMap::new();
    for (hf, tensor) in tensors {
        if let Some(name) = names.get(&hf) {
            by_gguf.insert(name.as_str(), tensor);
        }
    }
    let mut writer = GgufWriter::new();
    for (key, value) in &base.metadata {
        writer.set(key.clone(), value.clone());
    }
    writer.set("general.file_type", GgufValue::UInt(ftype));
    for tensor in &base.tensors {
        let matrix = match by_gguf.remove(tensor.name.as_str()) {
            Some(merged) => merged_tensor(base, arch, tensor, &merged, format)?,
            None => {
                let (rows, cols) = tensor.matrix();
                QuantMatrix::new(tensor.format, rows, cols, base.tensor_bytes(tensor)?)
                    .map_err(|e| base.error(format!("tensor `{}`: {e}", tensor.name)))?
            }
        };
        writer.tensor(tensor.name.clone(), tensor.dims.clone(), &matrix);
    }
    writer.write(out)
}

/// One merged tensor in the base file's layout and `format`.
fn merged_tensor(
    base: &GgufFile,
    arch: &GgufArch,
    tensor: &GgufTensor,
    merged: &PackTensor,
    format: QuantFormat,
) -> Result<QuantMatrix> {
    let (rows, cols) = tensor.matrix();
    let bytes = merged.to_bytes().map_err(|e| {
        ModelError::InvalidInput(format!("cannot read merged tensor `{}`: {e}", merged.name))
    })?;
    let mut values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if values.len() != rows * cols {
        return Err(base.error(format!(
            "merged `{}` holds {} values, but `{}` is [{rows}, {cols}]",
            merged.name,
            values.len(),
            tensor.name
        )));
    }
    if let Some(heads) = permuted_heads(base, arch, &tensor.name) {
        values = permute_rows(&values, rows, cols, heads)
            .ok_or_else(|| base.error(format!("`{}`: rows do not fit the heads", tensor.name)))?;
    }
    if arch.fix == GgufFix::GemmaNormPlusOne && tensor.name.contains("norm.weight") {
        values.iter_mut().for_each(|v| *v += 1.0);
    }
    let format = if tensor.dims.len() < 2 {
        QuantFormat::F32
    } else if format.row_bytes(cols).is_none() {
        QuantFormat::F16
    } else {
        format
    };
    QuantMatrix::quantize(format, &values, rows, cols)
        .map_err(|e| base.error(format!("tensor `{}` to {format}: {e}", tensor.name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_rows_inverts_unpermute() {
        let (rows, cols, heads) = (8, 3, 2);
        let values: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let permuted = permute_rows(&values, rows, cols, heads).unwrap();
        let order = unpermute(rows, heads).unwrap();
        for (hf_row, &gguf_row) in order.iter().enumerate() {
            assert_eq!(
                permuted[gguf_row * cols..(gguf_row + 1) * cols],
                values[hf_row * cols..(hf_row + 1) * cols]
            );
        }
        // llama.cpp's permute for one head of 4 rows: [0, 2, 1, 3].
        assert_eq!(
            &permuted[..cols * 4],
            &[0., 1., 2., 6., 7., 8., 3., 4., 5., 9., 10., 11.]
        );
    }
}
