//! Mixed precision: the frozen base in half precision, adapters and optimizer state in `f32`.
//!
//! This is the usual LoRA recipe for large models (the base is most of the memory and never
//! gets a gradient, so it can live in `f16`/`bf16`; the few trainable tensors and their AdamW
//! moments stay `f32`). [`cast_frozen_base`] casts the weights of every frozen linear and
//! embedding site; the sites then run their base product in the weight's precision and hand
//! `f32` activations on ([`nn::Linear::forward`](crate::nn::Linear::forward)), as PyTorch's
//! autocast does for a matmul. Norms, biases, adapters and `modules_to_save` copies keep `f32`.
//!
//! ```
//! use burn::tensor::Device;
//! use peft_core::precision::BaseDType;
//!
//! let dtype: BaseDType = "bf16".parse().unwrap();
//! assert_eq!(dtype, BaseDType::BF16);
//! assert!("f8".parse::<BaseDType>().is_err());
//! // Flex (the CPU backend) computes in every one of them.
//! assert!(dtype.check_device(&Device::flex()).is_ok());
//! ```

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use burn::module::{Module, Param, ParamId};
use burn::tensor::{DType, Device, FloatDType, Tensor};
use serde::{Deserialize, Serialize};

use crate::adaptable::{Adaptable, SiteMut, SitePath};
use crate::peft_model::PeftModel;

/// The precision of the frozen base weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BaseDType {
    /// Single precision (the default; parity tests run here).
    #[default]
    #[serde(rename = "f32", alias = "float32", alias = "fp32")]
    F32,
    /// IEEE half precision.
    #[serde(rename = "f16", alias = "float16", alias = "fp16")]
    F16,
    /// bfloat16.
    #[serde(rename = "bf16", alias = "bfloat16")]
    BF16,
    /// QLoRA's 4-bit NormalFloat (bitsandbytes' NF4, blocks of 64 with an absmax scale): the
    /// frozen linear weights stay quantized and multiply through a dequantizing kernel
    /// ([`quantize_frozen_base`]).
    #[serde(rename = "nf4")]
    Nf4,
    /// 8-bit blocks (llama.cpp's Q8_0: 32 values with an f16 scale), as [`BaseDType::Nf4`].
    #[serde(rename = "q8", alias = "int8")]
    Q8,
}

/// Why a precision cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PrecisionError {
    /// A name that is no precision we know.
    #[error("unknown dtype `{0}`; expected f32, f16, bf16, nf4 or q8")]
    Unknown(String),
    /// The device cannot compute in this precision.
    #[error(
        "the device {device} cannot compute in {dtype} (no {dtype} arithmetic on it){hint}; use dtype f32{alternative}"
    )]
    Unsupported {
        /// The precision asked for.
        dtype: BaseDType,
        /// The device, as Burn prints it.
        device: String,
        /// A precision the device does support, if any.
        alternative: String,
        /// Why, where known.
        hint: String,
    },
    /// Half precision or quantization applies to the frozen base only; full fine-tuning trains
    /// the base.
    #[error(
        "dtype {0} keeps the frozen base weights in {kind}, but full fine-tuning trains them; use dtype f32 for `method: full`",
        kind = if .0.is_quantized() { "a quantized format" } else { "half precision" }
    )]
    TrainedBase(BaseDType),
    /// A quantized dtype given to [`cast_frozen_base`], which casts floats only.
    #[error("dtype {0} is a quantized format: apply it with quantize_frozen_base")]
    NotAFloat(BaseDType),
    /// A weight could not be quantized.
    #[error("quantizing the frozen weight of `{path}` to {dtype}: {reason}")]
    Quantize {
        /// The site.
        path: String,
        /// The format.
        dtype: BaseDType,
        /// Why.
        reason: String,
    },
}

impl BaseDType {
    /// Burn's float type the base computes in (quantized formats dequantize to f32).
    pub fn float_dtype(self) -> FloatDType {
        match self {
            Self::F32 | Self::Nf4 | Self::Q8 => FloatDType::F32,
            Self::F16 => FloatDType::F16,
            Self::BF16 => FloatDType::BF16,
        }
    }

    /// Whether the base is kept in a quantized block format.
    pub fn is_quantized(self) -> bool {
        matches!(self, Self::Nf4 | Self::Q8)
    }

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Nf4 => "nf4",
            Self::Q8 => "q8",
        }
    }

    /// Bytes per element (quantized formats: rounded up; their scales add to it).
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Nf4 | Self::Q8 => 1,
        }
    }

    /// `Ok` when `device` can store, convert and compute in this precision
    /// (`Device::supports_dtype`; bf16 on a Vulkan device, for example, often has storage but no
    /// arithmetic, and computing in it would give garbage).
    pub fn check_device(self, device: &Device) -> Result<(), PrecisionError> {
        if self == Self::F32 || device.supports_dtype(self.float_dtype()) {
            return Ok(());
        }
        let other = [Self::F16, Self::BF16]
            .into_iter()
            .find(|d| *d != self && device.supports_dtype(d.float_dtype()));
        let hint = match self {
            Self::BF16 => " (Vulkan exposes bf16 for conversion and dot products only)",
            _ => "",
        };
        Err(PrecisionError::Unsupported {
            dtype: self,
            device: format!("{device:?}"),
            alternative: other
                .map(|d| format!(" or {}", d.name()))
                .unwrap_or_default(),
            hint: hint.into(),
        })
    }
}

impl fmt::Display for BaseDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BaseDType {
    type Err = PrecisionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(Self::F32),
            "f16" | "float16" | "fp16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            "nf4" => Ok(Self::Nf4),
            "q8" | "int8" => Ok(Self::Q8),
            _ => Err(PrecisionError::Unknown(s.to_string())),
        }
    }
}

/// What [`cast_frozen_base`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CastReport {
    /// Weight tensors cast.
    pub tensors: usize,
    /// Their elements.
    pub elements: usize,
    /// Weights left as they were because the format cannot hold their shape (a row that is
    /// not whole blocks of a quantized format).
    pub skipped: usize,
}

/// A fresh, untracked tensor in `dtype` with the values of `t` (a frozen weight never needs
/// the cast in its autodiff history).
fn cast_leaf<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    Tensor::from_inner(t.inner().cast(dtype))
}

fn cast_param(
    param: &mut Param<Tensor<2>>,
    dtype: DType,
    trainable: &HashSet<ParamId>,
    report: &mut CastReport,
) {
    if trainable.contains(&param.id) || param.dtype() == dtype {
        return;
    }
    report.tensors += 1;
    report.elements += param.shape().num_elements();
    *param = param.clone().map(|t| cast_leaf(t, dtype));
}

/// Cast the frozen weights of every linear and embedding site of `model` to `dtype` (after
/// [`PeftModel::add_adapter`], which freezes them). Trainable tensors — adapters,
/// `modules_to_save` copies — stay as they are, and so does everything outside a site (norms).
///
/// Errors with [`PrecisionError::TrainedBase`] when the base is being trained (full
/// fine-tuning) and with [`PrecisionError::Unsupported`] when `device` lacks the precision.
pub fn cast_frozen_base<M: Module + Adaptable>(
    model: &mut PeftModel<M>,
    dtype: BaseDType,
    device: &Device,
) -> Result<CastReport, PrecisionError> {
    dtype.check_device(device)?;
    if dtype.is_quantized() {
        return Err(PrecisionError::NotAFloat(dtype));
    }
    if dtype == BaseDType::F32 {
        return Ok(CastReport::default());
    }
    if model.trains_base() {
        return Err(PrecisionError::TrainedBase(dtype));
    }
    let trainable = model.trainable_param_ids().clone();
    let target: DType = dtype.float_dtype().into();
    let mut report = CastReport::default();
    model.update(|mut m| {
        m.visit_sites_mut(&mut SitePath::root(), &mut |_, site| match site {
            SiteMut::Linear(linear) => {
                cast_param(&mut linear.weight, target, &trainable, &mut report)
            }
            SiteMut::Embedding(table) => {
                cast_param(&mut table.weight, target, &trainable, &mut report)
            }
            _ => {}
        });
        m
    });
    Ok(report)
}

/// How [`quantize_frozen_base`] quantizes one frozen weight: `None` when its format cannot
/// hold it (the site stays dense), an error message when it fails.
pub type QuantizeFn<'a> =
    dyn Fn(&Param<Tensor<2>>) -> Result<Option<crate::nn::QuantizedBase>, String> + 'a;

/// Quantize the frozen weight of every linear site of `model` with `quantize` (QLoRA:
/// `dtype` [`BaseDType::Nf4`] or [`BaseDType::Q8`]; or half-precision rows, `F16` / `BF16`,
/// that the same kernels read with f32 activations); the sites then multiply through the
/// quantized kernel and hold no dense weight. As bitsandbytes' `load_in_4bit` (transformers'
/// `modules_to_not_convert`), the output layer and the classification head stay dense, and so
/// do embeddings, trainable tensors and sites whose adapters are merged. `quantize` returns
/// `None` for a weight its format cannot hold (counted in `report.skipped`, left dense).
/// `report.elements` counts the weights quantized.
pub fn quantize_frozen_base<M: Module + Adaptable>(
    model: &mut PeftModel<M>,
    dtype: BaseDType,
    quantize: &QuantizeFn<'_>,
) -> Result<CastReport, PrecisionError> {
    if dtype == BaseDType::F32 {
        return Err(PrecisionError::Unknown(format!(
            "{dtype} (quantize_frozen_base takes nf4, q8, f16 or bf16)"
        )));
    }
    if model.trains_base() {
        return Err(PrecisionError::TrainedBase(dtype));
    }
    let trainable = model.trainable_param_ids().clone();
    let keep: Vec<String> = [
        model.model().output_layer(),
        model.model().classifier_head(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut report = CastReport::default();
    let mut error = None;
    model.update(|mut m| {
        m.visit_sites_mut(&mut SitePath::root(), &mut |path, site| {
            let SiteMut::Linear(linear) = site else {
                return;
            };
            let path = path.to_string();
            let skip = keep.contains(&path)
                || linear.quantized.is_some()
                || trainable.contains(&linear.weight.id)
                || linear.adapters.iter().any(|a| a.merged)
                || error.is_some();
            if skip {
                return;
            }
            let [d_in, d_out] = linear.dims();
            match quantize(&linear.weight) {
                Ok(None) => report.skipped += 1,
                Ok(Some(q)) => {
                    let device = linear.weight.lazy_device();
                    linear.set_quantized_base(q, &device);
                    report.tensors += 1;
                    report.elements += d_in * d_out;
                }
                Err(reason) => {
                    error = Some(PrecisionError::Quantize {
                        path,
                        dtype,
                        reason,
                    })
                }
            }
        });
        m
    });
    match error {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde_and_from_str() {
        for d in [
            BaseDType::F32,
            BaseDType::F16,
            BaseDType::BF16,
            BaseDType::Nf4,
            BaseDType::Q8,
        ] {
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{}\"", d.name()));
            assert_eq!(serde_json::from_str::<BaseDType>(&json).unwrap(), d);
            assert_eq!(d.name().parse::<BaseDType>().unwrap(), d);
        }
        assert_eq!(
            serde_json::from_str::<BaseDType>("\"bfloat16\"").unwrap(),
            BaseDType::BF16
        );
        assert_eq!("int8".parse::<BaseDType>().unwrap(), BaseDType::Q8);
        let e = "int4".parse::<BaseDType>().unwrap_err();
        assert!(
            e.to_string().contains("expected f32, f16, bf16, nf4 or q8"),
            "{e}"
        );
    }
}
