//! Adapters attached to a plain Burn module's weights through Burn's own parameter
//! reparameterization (`burn::module::Reparameterization`, the machinery of
//! `Module::apply_lora`): the weight `Param` keeps its frozen base and materializes
//! `effective_weight(W)` of every active adapter whenever the layer reads it, so the layer's code
//! is untouched and the adapters' tensors are ordinary parameters of the model (optimizers,
//! records, device moves and autodiff see them).
//!
//! Burn attaches a reparameterization once (`Module::apply_reparameterization` keeps one already
//! there) and removes it only by folding it into the weight (`Module::materialize`). Every change
//! of the adapter set, of which adapters are active or merged, is therefore a rebuild: the
//! adapters are taken off without folding ([`strip`]) and attached again ([`Attach`]).

use std::any::Any;
use std::cell::Cell;
use std::collections::HashMap;

use burn::module::{Module, Param, Reparameterization, Reparameterizer};
use burn::tensor::Tensor;

use crate::adapter::AdapterState;

/// The name of our reparameterization: the path segment of the adapters' parameters
/// (`q_proj.weight.peft.adapters.0.matrices.0`).
pub(crate) const NAME: &str = "peft";

/// The adapters of one weight, in the order they were added.
#[derive(Module, Debug)]
pub struct WeightAdapters {
    /// The adapters; the active, unmerged ones take part.
    pub adapters: Vec<AdapterState>,
}

thread_local! {
    /// Set while [`strip`] folds the reparameterizations away: they then give the base weight.
    static BYPASS: Cell<bool> = const { Cell::new(false) };
}

/// Holds [`BYPASS`] while alive (reset even if the traversal panics).
struct Bypass;

impl Bypass {
    fn on() -> Self {
        BYPASS.set(true);
        Bypass
    }
}

impl Drop for Bypass {
    fn drop(&mut self) {
        BYPASS.set(false);
    }
}

impl Reparameterization for WeightAdapters {
    const NAME: &'static str = NAME;

    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        // Matrices (linear, embedding) and convolution kernels carry adapters; a kernel
        // `[out, in/g, kh, kw]` is seen as the matrix `[in/g·kh·kw, out]` kernels work on.
        if !(D == 2 || D == 4) || BYPASS.get() {
            return base;
        }
        let shape = base.shape();
        let kernel = (D == 4).then(|| [shape[0], shape[1], shape[2], shape[3]]);
        let base: Tensor<2> = match kernel {
            Some(dims) => crate::nn::kernel_as_matrix(base.reshape(dims)),
            None => base.reshape([shape[0], shape[1]]),
        };
        let mut weight = base.clone();
        for adapter in self.adapters.iter().filter(|a| a.active && !a.merged) {
            weight = adapter.kernel.effective_weight(adapter, &base, weight);
        }
        match kernel {
            Some(dims) => crate::nn::matrix_as_kernel(weight, dims).reshape(shape),
            None => weight.reshape(shape),
        }
    }
}

/// `module` with every reparameterization removed and each weight left at its stored base, bit
/// for bit (the base keeps its id and trainability). The adapters' parameters are dropped:
/// read them first ([`AdapterParams`](super::scan::AdapterParams)).
pub(crate) fn strip<M: Module>(module: M) -> M {
    let _bypass = Bypass::on();
    module.materialize()
}

/// `tensor` as a `Tensor<D>` when its rank is `D`.
pub(crate) fn ranked<const D: usize>(tensor: &dyn Any) -> Option<Tensor<D>> {
    tensor.downcast_ref::<Tensor<D>>().cloned()
}

/// A site's weight as kernels see it: a matrix (`[in, out]`, `[vocab, dim]`), or a
/// convolution's kernel `[out, in/g, kh, kw]` as the matrix `[in/g·kh·kw, out]`
/// ([`kernel_as_matrix`](crate::nn::kernel_as_matrix)) with the kernel's dims to write it back.
pub(crate) fn as_matrix(tensor: &dyn Any) -> Option<(Tensor<2>, Option<[usize; 4]>)> {
    if let Some(matrix) = ranked::<2>(tensor) {
        return Some((matrix, None));
    }
    let kernel = ranked::<4>(tensor)?;
    let dims = kernel.dims();
    Some((crate::nn::kernel_as_matrix(kernel), Some(dims)))
}

/// `matrix` back in its site's rank (see [`as_matrix`]), as [`Attach::values`] holds it.
pub(crate) fn from_matrix(matrix: Tensor<2>, kernel: Option<[usize; 4]>) -> Box<dyn Any> {
    match kernel {
        Some(dims) => Box::new(crate::nn::matrix_as_kernel(matrix, dims)),
        None => Box::new(matrix),
    }
}

/// Attaches adapters to a module without reparameterizations (see [`strip`]), replaces base
/// values where asked, and freezes every base parameter (or makes it train: `train_base`).
#[derive(Default)]
pub(crate) struct Attach {
    /// The adapters of each weight, by the weight's path (`q_proj.weight`).
    pub adapters: HashMap<String, Vec<AdapterState>>,
    /// New base values (`Tensor<D>` behind `Any`), by parameter path: merged weights and biases.
    pub values: HashMap<String, Box<dyn Any>>,
    /// Base parameters train (full fine-tuning) instead of being frozen.
    pub train_base: bool,
}

impl Reparameterizer for Attach {
    type Reparam = WeightAdapters;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<WeightAdapters>) {
        let mut param = param.set_require_grad(self.train_base);
        if let Some(value) = self.values.remove(path)
            && let Some(value) = ranked::<D>(value.as_ref())
        {
            param = param.map(|_| value.detach());
        }
        let adapters = match D {
            2 | 4 => self.adapters.remove(path),
            _ => None,
        };
        (param, adapters.map(|adapters| WeightAdapters { adapters }))
    }
}
