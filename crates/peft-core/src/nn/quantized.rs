//! A frozen base weight kept quantized: the site multiplies through it without a dense copy
//! (QLoRA, a GGUF base). The format and its kernels live in the crate that implements
//! [`QuantizedWeight`] (peft-ops' block formats); core only routes the site's base product
//! through it and asks for the dense weight where one is unavoidable (merging, a weight-aware
//! adapter such as DoRA, as PEFT dequantizes there too).

use std::fmt;
use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor};

/// A matrix stored in a quantized format, as a site's frozen base weight.
///
/// The matrix is held by output feature: `d_output` rows of `d_input` values (a linear layer's
/// `[out, in]` as PyTorch and GGUF store it; for an embedding table, one row per token). It is
/// never trained; gradients flow to the input only.
pub trait QuantizedWeight: fmt::Debug + Send + Sync {
    /// `[d_input, d_output]`.
    fn dims(&self) -> [usize; 2];

    /// `x · Wᵀ`-style product of the rows: `x` `[n, d_input]` -> `[n, d_output]`, where output
    /// `j` is the dot product of `x` with row `j`; differentiable in `x`.
    fn matmul(&self, x: Tensor<2>) -> Tensor<2>;

    /// Rows `ids` (`[k]`) dequantized: `[k, d_input]` (an embedding lookup).
    fn rows(&self, ids: Tensor<1, Int>) -> Tensor<2>;

    /// Every row dequantized, `[d_output, d_input]` in f32 on `device`: for merging and for
    /// adapters that read the base weight. Costs the dense matrix while it is held.
    fn dequantize(&self, device: &Device) -> Tensor<2>;

    /// The storage format (`Q4_1`, `NF4`, ...).
    fn format(&self) -> String;

    /// Bytes held by the quantized storage.
    fn stored_bytes(&self) -> usize;

    /// The matrix as peft-ops' block format, where it is one: fused ops over several frozen
    /// matrices (`peft_ops::quant::quant_swiglu`) take it directly. `None` by default.
    fn blocks(&self) -> Option<std::sync::Arc<peft_ops::quant::QuantMatrix>> {
        None
    }
}

/// A shared [`QuantizedWeight`]: what a site holds as its quantized base.
#[derive(Clone)]
pub struct QuantizedBase(pub Arc<dyn QuantizedWeight>);

impl QuantizedBase {
    /// Wrap a quantized matrix.
    pub fn new(weight: impl QuantizedWeight + 'static) -> Self {
        Self(Arc::new(weight))
    }
}

impl fmt::Debug for QuantizedBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [i, o] = self.0.dims();
        write!(f, "QuantizedBase({} [{i}, {o}])", self.0.format())
    }
}

impl std::ops::Deref for QuantizedBase {
    type Target = dyn QuantizedWeight;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref()
    }
}

/// The stand-in a quantized site keeps as its `weight` parameter: no elements, so nothing
/// dense is held, trained or saved by mistake; the site's `dims()` come from the quantized
/// matrix.
pub(crate) fn placeholder(d_output: usize, device: &Device) -> Tensor<2> {
    Tensor::zeros([0, d_output], device)
}

/// How many sites of `model` hold their frozen base quantized (a GGUF base, or QLoRA's
/// `nf4` / `q8`): such weights cannot be trained (full fine-tuning needs them dense).
///
/// ```
/// use burn::tensor::Device;
/// use peft_core::nn::{Linear, LinearConfig, quantized_sites};
///
/// let layer: Linear = LinearConfig::new(4, 2).init(&Device::flex());
/// assert_eq!(quantized_sites(&layer), 0);
/// ```
pub fn quantized_sites<M: crate::Adaptable>(model: &M) -> usize {
    let mut count = 0;
    model.visit_sites(&mut crate::SitePath::root(), &mut |_, site| {
        let quantized = match site {
            crate::Site::Linear(l) => l.quantized.is_some(),
            crate::Site::Embedding(e) => e.quantized.is_some(),
            _ => false,
        };
        count += usize::from(quantized);
    });
    count
}

/// Make every quantized base of `model` dense (f32), as writing a full model needs (PEFT's
/// merge writes float weights too); returns how many sites were quantized.
///
/// ```
/// use burn::tensor::Device;
/// use peft_core::nn::{Linear, LinearConfig, dequantize_sites};
///
/// let device = Device::flex();
/// let mut layer: Linear = LinearConfig::new(4, 2).init(&device);
/// assert_eq!(dequantize_sites(&mut layer), 0); // nothing was quantized
/// ```
pub fn dequantize_sites<M: crate::Adaptable>(model: &mut M) -> usize {
    let mut count = 0;
    model.visit_sites_mut(&mut crate::SitePath::root(), &mut |_, site| {
        let done = match site {
            crate::SiteMut::Linear(l) => l.dequantize_base(),
            crate::SiteMut::Embedding(e) => e.dequantize_base(),
            _ => false,
        };
        count += usize::from(done);
    });
    count
}
