//! Adapter state held inside a site, and the kernel trait through which a method gives it
//! behaviour.

use std::fmt::Debug;
use std::sync::Arc;

use burn::module::{Flag, Module, Param};
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::Result;

/// The trainable tensors of one named adapter at one site, plus the method code that uses them.
///
/// The tensors are ordinary Burn [`Param`]s, so autodiff, optimizers, device moves and records
/// see them; the behaviour comes from [`kernel`](Self::kernel), which belongs to the method crate.
/// This keeps core free of any method (the plugin boundary) while staying a plain Burn module.
#[derive(Module, Debug)]
pub struct AdapterState {
    /// Matrices of the adapter, in the order the kernel defines (LoRA: `[A, B]`).
    pub matrices: Vec<Param<Tensor<2>>>,
    /// Vectors of the adapter, in the order the kernel defines (e.g. IA3 scales).
    pub vectors: Vec<Param<Tensor<1>>>,
    /// Whether training-only behaviour (adapter dropout) is on. `valid()`/`freeze()` clear it.
    pub training: Param<Flag>,
    /// The method's code for this adapter at this site.
    #[module(skip)]
    pub kernel: Arc<dyn AdapterKernel>,
    /// The adapter name (`default`, ...).
    #[module(skip)]
    pub name: String,
    /// Whether the adapter takes part in the forward pass.
    #[module(skip)]
    pub active: bool,
    /// Whether the adapter is currently folded into the base weight.
    #[module(skip)]
    pub merged: bool,
}

impl AdapterState {
    /// A new adapter state named `name` with the given tensors and kernel, active and unmerged.
    pub fn new(
        name: impl Into<String>,
        matrices: Vec<Tensor<2>>,
        vectors: Vec<Tensor<1>>,
        kernel: Arc<dyn AdapterKernel>,
    ) -> Self {
        Self {
            matrices: matrices.into_iter().map(Param::from_tensor).collect(),
            vectors: vectors.into_iter().map(Param::from_tensor).collect(),
            training: Param::from_bool(true),
            kernel,
            name: name.into(),
            active: true,
            merged: false,
        }
    }

    /// Whether dropout-like training behaviour applies to `x` now: the training flag is on and
    /// the tensor is tracked by autodiff (the same rule as `burn::nn::Dropout`).
    pub fn is_training<const D: usize>(&self, x: &Tensor<D>) -> bool {
        self.training.is_enabled() && x.device().is_autodiff()
    }

    /// Replace matrix `index` with `data` (already in this adapter's layout), keeping the
    /// parameter id so optimizer state and trainability follow; for
    /// [`AdapterKernel::import`].
    pub fn set_matrix(&mut self, index: usize, data: TensorData) {
        let param = &mut self.matrices[index];
        let tensor = Tensor::<2>::from_data(data, &param.lazy_device());
        *param = param.clone().map(|_| tensor);
    }

    /// Replace vector `index` with `data`, keeping the parameter id.
    pub fn set_vector(&mut self, index: usize, data: TensorData) {
        let param = &mut self.vectors[index];
        let tensor = Tensor::<1>::from_data(data, &param.lazy_device());
        *param = param.clone().map(|_| tensor);
    }

    /// Number of scalar parameters in this adapter.
    pub fn num_params(&self) -> usize {
        self.matrices
            .iter()
            .map(|m| m.shape().num_elements())
            .sum::<usize>()
            + self
                .vectors
                .iter()
                .map(|v| v.shape().num_elements())
                .sum::<usize>()
    }
}

/// Which way [`AdapterKernel::merge`] folds the adapter into the base weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeDirection {
    /// Fold the adapter in (`W + delta`).
    Merge,
    /// Take it back out (`W - delta`).
    Unmerge,
}

/// Base weight and bias of a site, in Burn layout (linear: `[in, out]`; embedding: `[vocab, dim]`).
#[derive(Debug, Clone)]
pub struct BaseWeights {
    /// The weight.
    pub weight: Tensor<2>,
    /// The bias, if the site has one.
    pub bias: Option<Tensor<1>>,
}

/// Where a kernel reads its tensors when an adapter is loaded from a bundle.
///
/// Names are relative to the site (`lora_A.weight`); the implementation prefixes them with the
/// site path, reports missing and mis-shaped tensors as typed errors naming the file and key, and
/// remembers which keys were used so unused ones can be reported.
pub trait TensorSource {
    /// Take the tensor `name`, check its shape against `expected` and return it as `f32` data.
    fn take(&mut self, name: &str, expected: &[usize]) -> Result<TensorData>;
    /// Whether the tensor `name` exists (for optional tensors).
    fn contains(&self, name: &str) -> bool;
}

/// The behaviour of one method at one site. Implemented by method crates; object-safe.
///
/// Linear sites see flattened activations: `x` is `[n, d_in]` and `y`, the output so far
/// (base output plus earlier adapters), is `[n, d_out]`. A kernel returns the new output, which
/// covers additive methods (LoRA: `y + B(A(x))·s`) and multiplicative ones (IA3: `y ⊙ l`) alike.
pub trait AdapterKernel: Debug + Send + Sync {
    /// Forward contribution at a linear site.
    fn forward_linear(&self, state: &AdapterState, x: Tensor<2>, y: Tensor<2>) -> Tensor<2> {
        let _ = (state, x);
        y
    }

    /// Forward contribution at an embedding site: `ids` is `[batch, seq]`, `y` `[batch, seq, dim]`.
    fn forward_embedding(
        &self,
        state: &AdapterState,
        ids: Tensor<2, Int>,
        y: Tensor<3>,
    ) -> Tensor<3> {
        let _ = (state, ids);
        y
    }

    /// Per-layer prefix keys and values for a batch of `batch` rows, at a
    /// [`KvPrefix`](crate::nn::KvPrefix) site.
    fn forward_prefix(&self, state: &AdapterState, batch: usize) -> Option<crate::nn::PrefixKv> {
        let _ = (state, batch);
        None
    }

    /// Fold the adapter into (or out of) the base weights, returning the new base weights.
    fn merge(
        &self,
        state: &AdapterState,
        base: BaseWeights,
        direction: MergeDirection,
    ) -> Result<BaseWeights>;

    /// The tensors as they are written to a bundle, with names relative to the site
    /// (`lora_A.weight`) and in the file's layout.
    fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)>;

    /// Replace the tensors of `state` with those read from `source`.
    fn import(&self, state: AdapterState, source: &mut dyn TensorSource) -> Result<AdapterState>;
}
