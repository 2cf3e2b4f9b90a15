//! The fused norms on `burn::nn` modules, for models that hold those modules.

use burn::nn::{LayerNorm, RmsNorm};
use burn::tensor::{DType, Tensor};

/// `norm` applied to `x + residual` (or `x`), fused on flex. `eps` is the module's epsilon
/// (`burn::nn::LayerNorm` keeps it private; models pass the one from their config). Other
/// backends and dtypes run `norm.forward`, unchanged.
///
/// ```
/// use burn::nn::LayerNormConfig;
/// use burn::tensor::{Device, Tensor};
///
/// let device = Device::flex();
/// let norm = LayerNormConfig::new(4).init(&device);
/// let x = Tensor::<2>::from_floats([[1.0, 2.0, 3.0, 4.0]], &device);
/// let r = Tensor::<2>::ones([1, 4], &device);
/// let y = peft_ops::nn::layer_norm(&norm, 1e-5, x.clone(), Some(r.clone()));
/// let expected = norm.forward(x + r);
/// y.into_data().assert_approx_eq::<f32>(&expected.into_data(), Default::default());
/// ```
pub fn layer_norm<const D: usize>(
    norm: &LayerNorm,
    eps: f64,
    x: Tensor<D>,
    residual: Option<Tensor<D>>,
) -> Tensor<D> {
    if x.dtype() != DType::F32 || !crate::is_flex(&x.device()) || !crate::fused_enabled() {
        let z = match residual {
            Some(r) => x + r,
            None => x,
        };
        return norm.forward(z);
    }
    crate::layer_norm(
        x,
        residual,
        norm.gamma.val(),
        norm.beta.as_ref().map(|b| b.val()),
        eps,
    )
}

/// `norm.forward(x)`, fused on flex.
pub fn rms_norm<const D: usize>(norm: &RmsNorm, x: Tensor<D>) -> Tensor<D> {
    if x.dtype() != DType::F32 || !crate::is_flex(&x.device()) || !crate::fused_enabled() {
        return norm.forward(x);
    }
    crate::rms_norm(x, norm.gamma.val(), norm.epsilon)
}
