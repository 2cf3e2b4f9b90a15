//! A frozen base weight that stays quantized: peft-ops' block formats ([`QuantMatrix`]) behind
//! peft-core's [`QuantizedWeight`], for GGUF bases and QLoRA (`dtype: nf4` / `q8`).

use std::sync::Arc;

use burn::module::Param;
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::nn::{QuantizedBase, QuantizedWeight};
use peft_ops::quant::{self, QuantMatrix};

pub use peft_ops::quant::QuantFormat;

use crate::error::{ModelError, Result};

/// A [`QuantMatrix`] as a site's frozen base.
#[derive(Debug, Clone)]
pub struct BlockWeight(pub Arc<QuantMatrix>);

impl QuantizedWeight for BlockWeight {
    fn dims(&self) -> [usize; 2] {
        [self.0.cols(), self.0.rows()]
    }

    fn matmul(&self, x: Tensor<2>) -> Tensor<2> {
        quant::quant_matmul(x, &self.0)
    }

    fn rows(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        quant::quant_rows(&self.0, ids)
    }

    fn dequantize(&self, device: &Device) -> Tensor<2> {
        let data = TensorData::new(self.0.dequantize(), [self.0.rows(), self.0.cols()]);
        Tensor::from_data(data, device)
    }

    fn format(&self) -> String {
        self.0.format().name().to_string()
    }

    fn stored_bytes(&self) -> usize {
        self.0.stored_bytes()
    }

    fn blocks(&self) -> Option<Arc<QuantMatrix>> {
        Some(self.0.clone())
    }
}

/// `matrix` as a site's quantized base.
pub fn base(matrix: QuantMatrix) -> QuantizedBase {
    QuantizedBase::new(BlockWeight(Arc::new(matrix)))
}

/// A dense f32 parameter `[rows, cols]` from `matrix` (for formats not worth keeping
/// quantized, and for tensors that are not sites: norms, biases).
pub fn dense(matrix: &QuantMatrix, device: &Device) -> Tensor<2> {
    let data = TensorData::new(matrix.dequantize(), [matrix.rows(), matrix.cols()]);
    Tensor::from_data(data, device)
}

/// Quantize a dense Burn-layout weight `[in, out]` to `format` (rows = outputs, as the kernels
/// read it): QLoRA's frozen base.
pub fn quantize_linear(weight: &Param<Tensor<2>>, format: QuantFormat) -> Result<QuantizedBase> {
    let [d_in, d_out] = weight.dims();
    let values = weight
        .val()
        .transpose()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| {
            ModelError::InvalidInput(format!("cannot read a weight to quantize: {e:?}"))
        })?;
    let matrix = QuantMatrix::quantize(format, &values, d_out, d_in).map_err(|e| {
        ModelError::InvalidInput(format!(
            "cannot quantize a [{d_out}, {d_in}] weight to {}: {e}",
            format.name()
        ))
    })?;
    Ok(base(matrix))
}
