//! LoRA's behaviour at a site: forward on activations, merge, and the bundle layout.

use burn::tensor::module::embedding;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::{AdapterKernel, AdapterState, BaseWeights, MergeDirection, Result, TensorSource};

/// `data` in the file's layout (`[r, in]` / `[out, r]`) transposed to ours.
fn transposed(data: TensorData) -> TensorData {
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

fn delta(state: &AdapterState, scaling: f64) -> Tensor<2> {
    let a = state.matrices[0].val();
    let b = state.matrices[1].val();
    a.matmul(b).mul_scalar(scaling)
}

fn apply(base: BaseWeights, delta: Tensor<2>, direction: MergeDirection) -> BaseWeights {
    let weight = match direction {
        MergeDirection::Merge => base.weight + delta,
        MergeDirection::Unmerge => base.weight - delta,
    };
    BaseWeights {
        weight,
        bias: base.bias,
    }
}

/// LoRA on a linear layer. `A` is stored `[in, r]` and `B` `[r, out]` so the forward is two
/// plain matmuls on activations, `(x·A)·B`, and never builds the `[in, out]` delta.
#[derive(Debug)]
pub struct LoraLinearKernel {
    /// `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
    pub scaling: f64,
    /// Dropout probability on the adapter input.
    pub dropout: f64,
    /// Rank.
    pub r: usize,
}

impl AdapterKernel for LoraLinearKernel {
    fn forward_linear(&self, state: &AdapterState, x: Tensor<2>, y: Tensor<2>) -> Tensor<2> {
        // Dropout only while training (PEFT's `lora_dropout` is an `nn.Dropout`); on flex one
        // fused op whose mask comes from the device RNG's key (bit-exact on resume).
        let dropout = if state.is_training(&x) {
            self.dropout
        } else {
            0.0
        };
        peft_ops::lora(
            x,
            y,
            state.matrices[0].val(),
            state.matrices[1].val(),
            self.scaling,
            dropout,
        )
    }

    fn merge(
        &self,
        state: &AdapterState,
        base: BaseWeights,
        direction: MergeDirection,
    ) -> Result<BaseWeights> {
        Ok(apply(base, delta(state, self.scaling), direction))
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
    fn forward_linear(&self, _state: &AdapterState, _x: Tensor<2>, y: Tensor<2>) -> Tensor<2> {
        y
    }

    fn forward_embedding(
        &self,
        state: &AdapterState,
        ids: Tensor<2, Int>,
        y: Tensor<3>,
    ) -> Tensor<3> {
        let low = embedding(state.matrices[0].val(), ids);
        let b = state.matrices[1].val().unsqueeze::<3>();
        y + low.matmul(b).mul_scalar(self.scaling)
    }

    fn merge(
        &self,
        state: &AdapterState,
        base: BaseWeights,
        direction: MergeDirection,
    ) -> Result<BaseWeights> {
        Ok(apply(base, delta(state, self.scaling), direction))
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
