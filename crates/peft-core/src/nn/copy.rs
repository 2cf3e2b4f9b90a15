use burn::module::{Module, Param};
use burn::tensor::Tensor;

/// A trainable copy of a site's base weights, made for `modules_to_save` (PEFT's
/// `ModulesToSaveWrapper`): while its adapter is active the site computes with the copy.
#[derive(Module, Debug)]
pub struct ModuleCopy {
    /// Copy of the weight (Burn layout).
    pub weight: Param<Tensor<2>>,
    /// Copy of the bias.
    pub bias: Option<Param<Tensor<1>>>,
    /// The adapter that owns the copy.
    #[module(skip)]
    pub adapter: String,
    /// Whether the owning adapter is active.
    #[module(skip)]
    pub active: bool,
}

impl ModuleCopy {
    /// A trainable copy of `weight` and `bias` owned by `adapter`. The copy shares no storage and
    /// no parameter id with the original.
    pub fn new(adapter: &str, weight: &Param<Tensor<2>>, bias: Option<&Param<Tensor<1>>>) -> Self {
        // A fresh leaf tensor from the values: autodiff can track it, and it shares nothing.
        // Always f32, also when the base is in half precision (`precision`): copies train.
        fn leaf<const D: usize>(t: Tensor<D>) -> Param<Tensor<D>> {
            let device = t.device();
            Param::from_tensor(Tensor::from_data(t.into_data().convert::<f32>(), &device))
        }
        Self {
            weight: leaf(weight.val()),
            bias: bias.map(|b| leaf(b.val())),
            adapter: adapter.to_string(),
            active: true,
        }
    }

    /// Number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.weight.shape().num_elements()
            + self.bias.as_ref().map_or(0, |b| b.shape().num_elements())
    }
}
