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
    /// Values a kernel keeps from [`AdapterKernel::merge`] for the matching unmerge (DoRA keeps
    /// the weight norm it merged with, as PEFT caches it): not a parameter, so it is neither
    /// trained, saved nor counted. Host data, so it survives device moves.
    #[module(skip)]
    pub merge_cache: Option<TensorData>,
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
            merge_cache: None,
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
///
/// Kernels receive the weights the forward pass uses (a `modules_to_save` copy when one is
/// active); cloning a tensor clones a handle, not the data.
#[derive(Debug, Clone)]
pub struct BaseWeights {
    /// The weight.
    pub weight: Tensor<2>,
    /// The bias, if the site has one.
    pub bias: Option<Tensor<1>>,
}

/// The weights handed to [`AdapterKernel::merge`]: the site's weights now, and a way back to the
/// base weights the forward pass sees.
#[derive(Debug)]
pub struct MergeInput<'a> {
    /// The site's weights now. When merging, they hold every adapter of the site merged before
    /// this one; when unmerging, they hold this adapter and the ones merged before it.
    pub current: BaseWeights,
    /// The site's adapters before this one (only the merged ones count).
    earlier: &'a [AdapterState],
}

impl<'a> MergeInput<'a> {
    /// Weights `current` of a site whose adapters before this one are `earlier`.
    pub fn new(current: BaseWeights, earlier: &'a [AdapterState]) -> Self {
        Self { current, earlier }
    }

    /// `current` with the adapters merged before this one taken out again, on copies (nothing
    /// changes): the base weights as the unmerged forward pass sees them. Methods whose delta
    /// depends on the base weight (DoRA's column norms) compute it from these when merging, as
    /// PEFT does (`LoraLayer._unmerged_base_weight`, peft/tuners/lora/layer.py). When nothing
    /// else is merged this is `current` and costs nothing.
    pub fn unmerged(&self) -> Result<BaseWeights> {
        let mut weights = self.current.clone();
        for (index, adapter) in self.earlier.iter().enumerate().rev() {
            if !adapter.merged {
                continue;
            }
            let mut copy = adapter.clone();
            let input = MergeInput::new(weights, &self.earlier[..index]);
            weights = adapter
                .kernel
                .merge(&mut copy, input, MergeDirection::Unmerge)?;
        }
        Ok(weights)
    }
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
/// # Linear sites
/// A [`Linear`](crate::nn::Linear) site with active adapters `a1, a2, ...` computes
///
/// ```text
/// x' = a2.transform_input(a1.transform_input(x))      // default: x' = x
/// y  = x' · W + b                                      // the one base GEMM
/// y  = a1.forward_linear(base, x, y); y = a2.forward_linear(base, x, y); ...
/// ```
///
/// on flattened activations: `x` is `[n, d_in]`, `y` `[n, d_out]`, and `base` holds the weight
/// `W` (`[d_in, d_out]`) and bias the GEMM used. `forward_linear` gets the site's input `x` as it
/// arrived (not `x'`) and the output so far, and returns the new output, which covers additive
/// methods (LoRA: `y + B(A(x))·s`), multiplicative ones (IA3: `y ⊙ l`) and weight-aware ones
/// (DoRA reads `W` for its column norms). Input scaling (IA3's feedforward layers) is
/// [`transform_input`](Self::transform_input). Nothing is computed for a hook a kernel does not
/// override: a plain LoRA forward is one base GEMM plus its two low-rank GEMMs.
///
/// ```
/// use std::sync::Arc;
/// use burn::tensor::{Device, Tensor, TensorData};
/// use peft_core::nn::Linear;
/// use peft_core::{AdapterKernel, AdapterState, BaseWeights, MergeDirection, MergeInput, Result, TensorSource};
///
/// /// Scales the layer's input by a learned vector `l` (`vectors[0]`, `[d_in]`).
/// #[derive(Debug)]
/// struct InputScale;
///
/// impl AdapterKernel for InputScale {
///     fn transform_input(&self, state: &AdapterState, x: Tensor<2>) -> Tensor<2> {
///         x * state.vectors[0].val().unsqueeze::<2>()
///     }
///     fn transforms_input(&self, _state: &AdapterState) -> bool {
///         true
///     }
///     fn merge(&self, state: &mut AdapterState, site: MergeInput<'_>, direction: MergeDirection) -> Result<BaseWeights> {
///         // (x ⊙ l) W = x (diag(l) W): scale the rows of W.
///         let l = state.vectors[0].val().unsqueeze_dim::<2>(1);
///         let weight = match direction {
///             MergeDirection::Merge => site.current.weight * l,
///             MergeDirection::Unmerge => site.current.weight / l,
///         };
///         Ok(BaseWeights { weight, bias: site.current.bias })
///     }
///     fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)> {
///         vec![("scale".into(), state.vectors[0].val().into_data())]
///     }
///     fn import(&self, mut state: AdapterState, source: &mut dyn TensorSource) -> Result<AdapterState> {
///         let data = source.take("scale", &state.vectors[0].dims())?;
///         state.set_vector(0, data);
///         Ok(state)
///     }
/// }
///
/// let device = Device::flex();
/// let weight = Tensor::<2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &device); // [in 2, out 2]
/// let mut layer = Linear::from_tensors(weight, None);
/// let l = Tensor::<1>::from_floats([10.0, 0.0], &device);
/// layer.adapters.push(AdapterState::new("default", vec![], vec![l], Arc::new(InputScale)));
/// let y = layer.forward(Tensor::<2>::from_floats([[1.0, 1.0]], &device));
/// // x' = [10, 0]; y = x' W = [10, 20]
/// assert_eq!(y.into_data().try_to_vec::<f32>().unwrap(), vec![10.0, 20.0]);
/// ```
///
/// A kernel that reads the base weight: the output of the adapted layer is normalised by the
/// column norms of `W` (the kind of weight-aware rescaling DoRA does).
///
/// ```
/// # use std::sync::Arc;
/// # use burn::tensor::{Device, Tensor, TensorData};
/// # use peft_core::nn::Linear;
/// # use peft_core::{AdapterKernel, AdapterState, BaseWeights, MergeDirection, MergeInput, PeftError, Result, TensorSource};
/// #[derive(Debug)]
/// struct ColumnNormalised;
///
/// impl AdapterKernel for ColumnNormalised {
///     fn forward_linear(&self, _state: &AdapterState, base: &BaseWeights, _x: Tensor<2>, y: Tensor<2>) -> Tensor<2> {
///         let norms = base.weight.clone().square().sum_dim(0).sqrt(); // [1, d_out]
///         y / norms
///     }
///     fn merge(&self, state: &mut AdapterState, _site: MergeInput<'_>, _d: MergeDirection) -> Result<BaseWeights> {
///         Err(PeftError::InvalidState(format!("`{}` does not merge", state.name)))
///     }
///     fn export(&self, _state: &AdapterState) -> Vec<(String, TensorData)> { vec![] }
///     fn import(&self, state: AdapterState, _source: &mut dyn TensorSource) -> Result<AdapterState> { Ok(state) }
/// }
///
/// let device = Device::flex();
/// let weight = Tensor::<2>::from_floats([[3.0, 0.0], [4.0, 2.0]], &device); // column norms 5, 2
/// let mut layer = Linear::from_tensors(weight, None);
/// layer.adapters.push(AdapterState::new("default", vec![], vec![], Arc::new(ColumnNormalised)));
/// let y = layer.forward(Tensor::<2>::from_floats([[1.0, 1.0]], &device));
/// assert_eq!(y.into_data().try_to_vec::<f32>().unwrap(), vec![7.0 / 5.0, 1.0]);
/// ```
///
/// # Merging
/// [`merge`](Self::merge) folds the adapter into `site.current` (or takes it out) and may keep
/// what the matching unmerge needs in [`AdapterState::merge_cache`].
pub trait AdapterKernel: Debug + Send + Sync {
    /// Transform the input of the site's base GEMM (`x` is `[n, d_in]`); the default leaves it
    /// as it is. Applied in adapter order before the GEMM.
    fn transform_input(&self, state: &AdapterState, x: Tensor<2>) -> Tensor<2> {
        let _ = state;
        x
    }

    /// Whether [`transform_input`](Self::transform_input) changes the input. In a mixed-adapter
    /// batch the base GEMM runs once for all rows, and is recomputed only for the rows of
    /// adapters that transform their input; the default (no transform) says `false`.
    fn transforms_input(&self, state: &AdapterState) -> bool {
        let _ = state;
        false
    }

    /// Forward contribution at a linear site: `base` is the weight `[d_in, d_out]` and bias the
    /// base GEMM used, `x` the site's input `[n, d_in]`, `y` the output so far `[n, d_out]`.
    fn forward_linear(
        &self,
        state: &AdapterState,
        base: &BaseWeights,
        x: Tensor<2>,
        y: Tensor<2>,
    ) -> Tensor<2> {
        let _ = (state, base, x);
        y
    }

    /// Whether [`forward_linear`](Self::forward_linear), [`linear_delta`](Self::linear_delta)
    /// or [`forward_embedding`](Self::forward_embedding) read `base.weight`. A quantized frozen
    /// base ([`QuantizedBase`](crate::nn::QuantizedBase)) is dequantized on each forward for the
    /// kernels that do (DoRA's column norms, as PEFT dequantizes there); kernels that never read
    /// it return `false` so the base stays quantized. The default, `true`, is always correct.
    fn reads_base_weight(&self) -> bool {
        true
    }

    /// For additive methods (LoRA): the change this adapter adds to the output,
    /// `forward_linear(state, base, x, y) == y + linear_delta(state, base, x)`. A mixed-adapter
    /// batch then adds it to its rows directly instead of gathering and diffing their outputs.
    /// The default, `None`, is always correct.
    fn linear_delta(
        &self,
        state: &AdapterState,
        base: &BaseWeights,
        x: Tensor<2>,
    ) -> Option<Tensor<2>> {
        let _ = (state, base, x);
        None
    }

    /// For low-rank additive methods (LoRA): the factors when this call's change at a linear
    /// site is exactly `scaling·(x·A)·B` (no dropout active on `x`), so a mixed-adapter batch
    /// adds the rows of every such adapter in one pass ([`peft_ops::mixed_lora`]) instead of
    /// one gather / product / scatter per adapter. The default, `None`, is always correct: the
    /// batch falls back to [`linear_delta`](Self::linear_delta) or
    /// [`forward_linear`](Self::forward_linear).
    fn low_rank(&self, state: &AdapterState, x: &Tensor<2>) -> Option<crate::LowRank> {
        let _ = (state, x);
        None
    }

    /// Forward contribution at an embedding site: `base.weight` is the table `[vocab, dim]` the
    /// lookup used, `ids` is `[batch, seq]`, `y` `[batch, seq, dim]`.
    fn forward_embedding(
        &self,
        state: &AdapterState,
        base: &BaseWeights,
        ids: Tensor<2, Int>,
        y: Tensor<3>,
    ) -> Tensor<3> {
        let _ = (state, base, ids);
        y
    }

    /// Forward contribution at a 2-D convolution site ([`Conv2d`](crate::nn::Conv2d)): `base`
    /// holds the kernel `[out, in / groups, kh, kw]`, bias and geometry the base convolution
    /// used, `x` is the site's input `[b, in, h, w]` and `y` the output so far
    /// `[b, out, h', w']`. A method that adapts convolutions ([`SiteKind::Conv2d`] in its
    /// [`PeftMethod::supports`](crate::PeftMethod::supports)) overrides it; merges see the
    /// kernel as the matrix [`kernel_as_matrix`](crate::nn::kernel_as_matrix) gives.
    ///
    /// [`SiteKind::Conv2d`]: crate::SiteKind::Conv2d
    fn forward_conv2d(
        &self,
        state: &AdapterState,
        base: &crate::nn::ConvBase,
        x: Tensor<4>,
        y: Tensor<4>,
    ) -> Tensor<4> {
        let _ = (state, base, x);
        y
    }

    /// Per-layer prefix keys and values for a batch of `batch` rows, at a
    /// [`KvPrefix`](crate::nn::KvPrefix) site.
    fn forward_prefix(&self, state: &AdapterState, batch: usize) -> Option<crate::nn::PrefixKv> {
        let _ = (state, batch);
        None
    }

    /// Fold the adapter into (or out of) the site's weights, returning the new weights. `state`
    /// is mutable so the kernel can keep what the unmerge needs in
    /// [`AdapterState::merge_cache`].
    fn merge(
        &self,
        state: &mut AdapterState,
        site: MergeInput<'_>,
        direction: MergeDirection,
    ) -> Result<BaseWeights>;

    /// The tensors as they are written to a bundle, with names relative to the site
    /// (`lora_A.weight`) and in the file's layout.
    fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)>;

    /// Replace the tensors of `state` with those read from `source`.
    fn import(&self, state: AdapterState, source: &mut dyn TensorSource) -> Result<AdapterState>;

    /// Whether [`effective_weight`](Self::effective_weight) reproduces this adapter, for the
    /// weight-space path that adapts plain Burn modules
    /// ([`PeftModule`](crate::burn_modules::PeftModule)). That path replaces a layer's weight
    /// `W` by `effective_weight(W)` and leaves the layer's own forward alone, which is right only
    /// when the adapter's forward at this site is `x·W' + b` for that `W'`. The default,
    /// [`WeightSpace::Unsupported`], keeps a method off that path.
    fn weight_space(&self) -> WeightSpace {
        WeightSpace::Unsupported(
            "the method defines no weight-space form (AdapterKernel::effective_weight)".into(),
        )
    }

    /// The weight the site computes with when this adapter is active, as a differentiable
    /// function of the adapter's parameters: `weight` is the weight so far (the stored weight
    /// with the adapters before this one applied), `base` the stored weight itself, both in
    /// Burn layout (linear `[in, out]`, embedding `[vocab, dim]`); the pair plays the role of
    /// `(base, y)` in [`forward_linear`](Self::forward_linear). LoRA: `weight + A·B·s`. Evaluated
    /// on every forward pass of a plain Burn module carrying the adapter (gradients reach the
    /// adapter through it), and only when [`weight_space`](Self::weight_space) is not
    /// `Unsupported`.
    fn effective_weight(
        &self,
        state: &AdapterState,
        base: &Tensor<2>,
        weight: Tensor<2>,
    ) -> Tensor<2> {
        let _ = (state, base);
        weight
    }
}

/// How exactly [`AdapterKernel::effective_weight`] stands for an adapter's forward pass
/// ([`AdapterKernel::weight_space`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightSpace {
    /// Exactly, in training and inference: outputs and gradients are those of the activation
    /// forward.
    Exact,
    /// Exactly in inference; training would differ in the way the text says (LoRA's dropout on
    /// the layer input cannot be folded into a weight). Such adapters can be loaded onto a
    /// plain Burn module but not added to it for training.
    InferenceOnly(String),
    /// Not at all, for the reason the text gives.
    Unsupported(String),
}
