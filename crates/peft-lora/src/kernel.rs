//! LoRA's behaviour at a site: forward on activations, merge, and the bundle layout.

use burn::tensor::module::embedding;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::{
    AdapterKernel, AdapterState, BaseWeights, LowRank, MergeDirection, MergeInput, Result,
    TensorSource, WeightSpace,
};

/// `data` in the file's layout (`[r, in]` / `[out, r]`) transposed to ours. On the host, where
/// the bundle was read: one pass over `r x d` values, and the parameter stays contiguous (a
/// transposed view on the device would make every later product read it strided, and differ in
/// the last bits from an adapter built in place).
pub(crate) fn transposed(data: TensorData) -> TensorData {
    let [rows, cols] = [data.shape()[0], data.shape()[1]];
    let values = data
        .try_to_vec::<f32>()
        .expect("bundle tensors are read as f32");
    let mut out = vec![0f32; values.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = values[i * cols + j];
        }
    }
    TensorData::new(out, [cols, rows])
}

/// `A·B·scaling` in Burn layout (`[in, out]` / `[vocab, dim]`).
pub(crate) fn delta(state: &AdapterState, scaling: f64) -> Tensor<2> {
    let a = state.matrices[0].val();
    let b = state.matrices[1].val();
    a.matmul(b).mul_scalar(scaling)
}

fn apply(base: BaseWeights, delta: Tensor<2>, direction: MergeDirection) -> BaseWeights {
    // A half-precision base (mixed precision) is merged in f32 and rounded once.
    let dtype = base.weight.dtype();
    let weight = base.weight.cast(delta.dtype());
    let weight = match direction {
        MergeDirection::Merge => weight + delta,
        MergeDirection::Unmerge => weight - delta,
    };
    BaseWeights {
        weight: weight.cast(dtype),
        bias: base.bias,
    }
}

/// The weight-space form of LoRA at a linear site with input dropout `p` (shared with DoRA):
/// exact without dropout; with it, exact in inference only, since dropout acts on the layer
/// input, which no weight can express (PEFT's own weight-space LoRA, `ParamWrapper` in
/// peft/tuners/lora/layer.py, refuses `lora_dropout != 0` for the same reason).
pub(crate) fn linear_weight_space(dropout: f64) -> WeightSpace {
    if dropout > 0.0 {
        WeightSpace::InferenceOnly(format!(
            "lora_dropout = {dropout} drops the layer input, which no weight can express; set lora_dropout to 0 to train in weight space"
        ))
    } else {
        WeightSpace::Exact
    }
}

/// LoRA on a linear layer. `A` is stored `[in, r]` and `B` `[r, out]` so the forward is two
/// plain matmuls on activations, `(x·A)·B`, and never builds the `[in, out]` delta; in weight
/// space (plain Burn modules, `peft_core::burn_modules`) the weight is `W + A·B·s`.
///
/// ```
/// use burn::module::Module;
/// use burn::nn::{Linear, LinearConfig};
/// use burn::tensor::{Device, Distribution, Tensor};
/// use peft_core::burn_modules::PeftModule;
/// use peft_lora::{InitLoraWeights, LoraConfig};
///
/// #[derive(Module, Debug)]
/// struct Block {
///     q_proj: Linear,
///     v_proj: Linear,
/// }
///
/// let device = Device::flex();
/// let block = Block {
///     q_proj: LinearConfig::new(8, 8).init(&device),
///     v_proj: LinearConfig::new(8, 8).init(&device),
/// };
/// let mut model = PeftModule::new(block);
/// let lora = LoraConfig {
///     r: 2,
///     lora_alpha: 4.0,
///     target_modules: Some(["v_proj"].into()),
///     init_lora_weights: InitLoraWeights::Bool(false), // non-zero B, to see a difference
///     ..Default::default()
/// };
/// model.add_adapter("default", &lora).unwrap();
/// let tensors = model.adapter_tensors("default").unwrap();
/// assert_eq!(tensors["base_model.model.v_proj.lora_A.weight"].shape().to_vec(), [2, 8]);
/// assert_eq!(tensors["base_model.model.v_proj.lora_B.weight"].shape().to_vec(), [8, 2]);
///
/// // burn::nn::Linear's own forward now computes x (W + A B s) + b.
/// let x = Tensor::<2>::random([3, 8], Distribution::Default, &device);
/// let adapted = model.model().v_proj.forward(x.clone());
/// let plain = model.unload();
/// assert!((adapted - plain.v_proj.forward(x)).abs().max().into_scalar::<f32>() > 1e-3);
/// ```
#[derive(Debug)]
pub struct LoraLinearKernel {
    /// `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
    pub scaling: f64,
    /// Dropout probability on the adapter input.
    pub dropout: f64,
    /// Rank.
    pub r: usize,
}

impl LoraLinearKernel {
    /// The dropout probability for this call: PEFT's `lora_dropout` is an `nn.Dropout`, active
    /// only while training.
    fn dropout_for(&self, state: &AdapterState, x: &Tensor<2>) -> f64 {
        if self.dropout > 0.0 && state.is_training(x) {
            self.dropout
        } else {
            0.0
        }
    }
}

impl AdapterKernel for LoraLinearKernel {
    fn reads_base_weight(&self) -> bool {
        // The low-rank / scaling path never reads W: a quantized base stays quantized.
        false
    }

    fn forward_linear(
        &self,
        state: &AdapterState,
        _base: &BaseWeights,
        x: Tensor<2>,
        y: Tensor<2>,
    ) -> Tensor<2> {
        // `y + s·(drop(x)·A)·B`: on flex one fused op whose dropout mask comes from the device
        // RNG's key (bit-exact on resume) and whose backward skips `dW`.
        let dropout = self.dropout_for(state, &x);
        peft_ops::lora(
            x,
            y,
            state.matrices[0].val(),
            state.matrices[1].val(),
            self.scaling,
            dropout,
        )
    }

    fn linear_delta(
        &self,
        state: &AdapterState,
        _base: &BaseWeights,
        x: Tensor<2>,
    ) -> Option<Tensor<2>> {
        // `s·(drop(x)·A)·B` alone, for the rows of a mixed-adapter batch.
        let x = peft_ops::dropout(x.clone(), self.dropout_for(state, &x));
        let low = x.matmul(state.matrices[0].val());
        Some(low.matmul(state.matrices[1].val()).mul_scalar(self.scaling))
    }

    fn low_rank(&self, state: &AdapterState, x: &Tensor<2>) -> Option<LowRank> {
        // With dropout active the change is `s·(drop(x)·A)·B`: left to `linear_delta`.
        (self.dropout_for(state, x) == 0.0).then(|| LowRank {
            a: state.matrices[0].val(),
            b: state.matrices[1].val(),
            scaling: self.scaling,
        })
    }

    fn merge(
        &self,
        state: &mut AdapterState,
        site: MergeInput<'_>,
        direction: MergeDirection,
    ) -> Result<BaseWeights> {
        Ok(apply(site.current, delta(state, self.scaling), direction))
    }

    fn weight_space(&self) -> WeightSpace {
        linear_weight_space(self.dropout)
    }

    fn effective_weight(
        &self,
        state: &AdapterState,
        _base: &Tensor<2>,
        weight: Tensor<2>,
    ) -> Tensor<2> {
        weight + delta(state, self.scaling)
    }

    fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)> {
        vec![
            (
                "lora_A.weight".into(),
                state.matrices[0].val().transpose().into_data(),
            ),
            (
                "lora_B.weight".into(),
                state.matrices[1].val().transpose().into_data(),
            ),
        ]
    }

    fn import(
        &self,
        mut state: AdapterState,
        source: &mut dyn TensorSource,
    ) -> Result<AdapterState> {
        let [d_in, r] = state.matrices[0].dims();
        let [_, d_out] = state.matrices[1].dims();
        let a = source.take("lora_A.weight", &[r, d_in])?;
        let b = source.take("lora_B.weight", &[d_out, r])?;
        state.set_matrix(0, transposed(a));
        state.set_matrix(1, transposed(b));
        Ok(state)
    }
}

/// LoRA on an embedding table, as PEFT: `embedding(ids, A) · B · scaling`, no dropout.
/// `A` is stored `[vocab, r]` and `B` `[r, dim]`.
#[derive(Debug)]
pub struct LoraEmbeddingKernel {
    /// `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
    pub scaling: f64,
}

impl AdapterKernel for LoraEmbeddingKernel {
    fn reads_base_weight(&self) -> bool {
        // The low-rank / scaling path never reads W: a quantized base stays quantized.
        false
    }

    fn forward_embedding(
        &self,
        state: &AdapterState,
        _base: &BaseWeights,
        ids: Tensor<2, Int>,
        y: Tensor<3>,
    ) -> Tensor<3> {
        let low = embedding(state.matrices[0].val(), ids);
        let b = state.matrices[1].val().unsqueeze::<3>();
        y + low.matmul(b).mul_scalar(self.scaling)
    }

    fn merge(
        &self,
        state: &mut AdapterState,
        site: MergeInput<'_>,
        direction: MergeDirection,
    ) -> Result<BaseWeights> {
        Ok(apply(site.current, delta(state, self.scaling), direction))
    }

    /// Exact: an embedding's LoRA has no dropout, and a lookup in `W + A·B·s` is
    /// `embedding(ids, W) + embedding(ids, A)·B·s`.
    fn weight_space(&self) -> WeightSpace {
        WeightSpace::Exact
    }

    fn effective_weight(
        &self,
        state: &AdapterState,
        _base: &Tensor<2>,
        weight: Tensor<2>,
    ) -> Tensor<2> {
        weight + delta(state, self.scaling)
    }

    fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)> {
        vec![
            (
                "lora_embedding_A".into(),
                state.matrices[0].val().transpose().into_data(),
            ),
            (
                "lora_embedding_B".into(),
                state.matrices[1].val().transpose().into_data(),
            ),
        ]
    }

    fn import(
        &self,
        mut state: AdapterState,
        source: &mut dyn TensorSource,
    ) -> Result<AdapterState> {
        let [vocab, r] = state.matrices[0].dims();
        let [_, dim] = state.matrices[1].dims();
        let a = source.take("lora_embedding_A", &[r, vocab])?;
        let b = source.take("lora_embedding_B", &[dim, r])?;
        state.set_matrix(0, transposed(a));
        state.set_matrix(1, transposed(b));
        Ok(state)
    }
}
