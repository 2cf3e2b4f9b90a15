//! The frozen base in another precision, one rule for every command that runs a model (train,
//! eval, generate, serve): `f16` / `bf16` keep the base weights in half precision (on the CPU
//! as half-precision rows behind the fused kernels, elsewhere cast Burn tensors), `nf4` / `q8`
//! quantize every linear layer whose rows are whole blocks (QLoRA); adapters stay f32.

use burn::tensor::{Device, Tensor};
use peft_core::precision::{
    BaseDType, CastReport, PrecisionError, cast_frozen_base, quantize_frozen_base,
};
use peft_core::{Adaptable, PeftModel, SiteMut, SitePath};
use peft_ops::quant::QuantMatrix;

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
            Some(_) if !self.dtype.is_quantized() => write!(
                f,
                "base weights in {} rows read by the CPU kernels with f32 activations: {} \
                 tensors, {:.1} MiB (adapters, norms and any untied output or classification \
                 head stay f32)",
                self.dtype,
                c.tensors,
                (c.elements * self.dtype.size()) as f64 / (1024.0 * 1024.0)
            ),
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
    if dtype == BaseDType::F32 {
        return Ok(BaseDTypeReport {
            dtype,
            format: None,
            cast: CastReport::default(),
        });
    }
    if !dtype.is_quantized() {
        if peft_ops::is_flex(device) {
            return half_rows(model, dtype, device);
        }
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

/// A half-precision base on the CPU (flex): the frozen linear weights and token tables as
/// F16 / BF16 rows read by peft-ops' row kernels, which widen each weight to f32 as they load
/// it and accumulate in f32, as llama.cpp runs an F16 / BF16 GGUF on a CPU. Half the bytes of
/// f32 per weight, which is what a decode step is bound by; Burn's own half-precision matmul
/// on flex converts whole tensors and ran batch-1 decode of SmolLM2-135M at 6.1 tokens/s
/// against 33.9 in f32 (benches/llm_shape.rs). Activations, adapters, norms and any untied
/// output or classification head stay f32, so outputs are the f32 model's with the weights
/// rounded to the half format.
fn half_rows(
    model: &mut PeftModel<HfModel>,
    dtype: BaseDType,
    device: &Device,
) -> Result<BaseDTypeReport, PrecisionError> {
    let format = if dtype == BaseDType::F16 {
        QuantFormat::F16
    } else {
        QuantFormat::BF16
    };
    let mut cast = quantize_frozen_base(model, dtype, &|weight| {
        quantize_linear(weight, format)
            .map(Some)
            .map_err(|e| e.to_string())
    })?;
    let trainable = model.trainable_param_ids().clone();
    let mut error = None;
    model.update(|mut m| {
        m.visit_sites_mut(&mut SitePath::root(), &mut |path, site| {
            let SiteMut::Embedding(table) = site else {
                return;
            };
            let skip = table.quantized.is_some()
                || trainable.contains(&table.weight.id)
                || table.adapters.iter().any(|a| a.merged)
                || error.is_some();
            if skip {
                return;
            }
            match half_table(&table.weight.val(), format) {
                Ok(rows) => {
                    let [n, d] = table.dims();
                    table.set_quantized_base(crate::quantized::base(rows), device);
                    cast.tensors += 1;
                    cast.elements += n * d;
                }
                Err(reason) => {
                    error = Some(PrecisionError::Quantize {
                        path: path.to_string(),
                        dtype,
                        reason,
                    })
                }
            }
        });
        m
    });
    if let Some(e) = error {
        return Err(e);
    }
    Ok(BaseDTypeReport {
        dtype,
        format: Some(format),
        cast,
    })
}

/// A token table `[n, d]` as `n` rows of `format`.
fn half_table(table: &Tensor<2>, format: QuantFormat) -> Result<QuantMatrix, String> {
    let [n, d] = table.dims();
    let values = table
        .clone()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| format!("cannot read the table: {e:?}"))?;
    QuantMatrix::quantize(format, &values, n, d).map_err(|e| e.to_string())
}
