//! The frozen base in another precision, one rule for every command that runs a model (train,
//! eval, generate, serve): `f16` / `bf16` cast the base weights, `nf4` / `q8` quantize every
//! linear layer whose rows are whole blocks (QLoRA); adapters, embeddings and heads stay f32.

use burn::tensor::Device;
use peft_core::PeftModel;
use peft_core::precision::{
    BaseDType, CastReport, PrecisionError, cast_frozen_base, quantize_frozen_base,
};

use crate::HfModel;
use crate::quantized::{QuantFormat, quantize_linear};

/// What [`apply_base_dtype`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseDTypeReport {
    /// The precision.
    pub dtype: BaseDType,
    /// The block format, for a quantized base.
    pub format: Option<QuantFormat>,
    /// Tensors cast or quantized, their elements, and linear layers left f32 (rows that are
    /// not whole blocks).
    pub cast: CastReport,
}

impl std::fmt::Display for BaseDTypeReport {
    /// One line for a log: what changed and what stays f32.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.cast;
        match self.format {
            Some(format) => {
                write!(
                    f,
                    "base weights in {} ({}): {} linear layers, {:.1} M weights (embeddings, \
                     the output and classification heads and adapters stay f32)",
                    self.dtype,
                    format.name(),
                    c.tensors,
                    c.elements as f64 / 1e6
                )?;
                if c.skipped > 0 {
                    write!(
                        f,
                        "; {} linear layers stay f32: their inputs are not a multiple of {}'s \
                         {}-value blocks",
                        c.skipped,
                        format.name(),
                        format.block_size()
                    )?;
                }
                Ok(())
            }
            None => write!(
                f,
                "base weights in {}: {} tensors, {:.1} MiB (adapters stay f32)",
                self.dtype,
                c.tensors,
                (c.elements * self.dtype.size()) as f64 / (1024.0 * 1024.0)
            ),
        }
    }
}

/// Keep the frozen base of `model` in `dtype` (after its adapters are loaded); an error when
/// `device` cannot compute in it. `f32` changes nothing.
pub fn apply_base_dtype(
    model: &mut PeftModel<HfModel>,
    dtype: BaseDType,
    device: &Device,
) -> Result<BaseDTypeReport, PrecisionError> {
    if !dtype.is_quantized() {
        let cast = cast_frozen_base(model, dtype, device)?;
        return Ok(BaseDTypeReport {
            dtype,
            format: None,
            cast,
        });
    }
    let format = match dtype {
        BaseDType::Nf4 => QuantFormat::Nf4,
        _ => QuantFormat::Q8_0,
    };
    let cast = quantize_frozen_base(model, dtype, &|weight| {
        // A layer whose rows are not whole blocks stays dense: Burn-layout `[in, out]`, so a
        // row (one output) holds `in` values.
        let [d_in, _] = weight.dims();
        if format.row_bytes(d_in).is_none() {
            return Ok(None);
        }
        quantize_linear(weight, format)
            .map(Some)
            .map_err(|e| e.to_string())
    })?;
    Ok(BaseDTypeReport {
        dtype,
        format: Some(format),
        cast,
    })
}
