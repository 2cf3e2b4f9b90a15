//! The prefix at run time: a table (or the projection MLP that produces it) turned into
//! per-layer keys and values.

use std::sync::Arc;

use burn::tensor::{Tensor, TensorData};
use peft_core::nn::PrefixKv;
use peft_core::{
    AdapterKernel, AdapterState, BaseWeights, MergeDirection, MergeInput, PeftError, Result,
    TensorSource,
};

/// Layout of one prefix adapter.
///
/// Without projection `matrices = [table]`, the table `[num_virtual_tokens, L·2·kv_dim]`.
/// With `prefix_projection` (PEFT's MLP) `matrices = [embedding [nvt, token_dim],
/// w1 [token_dim, hidden], w2 [hidden, L·2·kv_dim]]` and `vectors = [b1, b2]`; the MLP is
/// trained through and kept in our checkpoints, while the bundle holds its output (as PEFT).
#[derive(Debug, Clone)]
pub struct PrefixKernel {
    /// Virtual tokens.
    pub num_virtual_tokens: usize,
    /// Layers.
    pub num_layers: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
    /// Whether the state holds the projection MLP.
    pub projection: bool,
}

impl PrefixKernel {
    fn width(&self) -> usize {
        self.num_layers * 2 * self.kv_heads * self.head_dim
    }

    /// The table `[num_virtual_tokens, L·2·kv_dim]` (through the MLP when there is one).
    pub fn table(&self, state: &AdapterState) -> Tensor<2> {
        if !self.projection {
            return state.matrices[0].val();
        }
        let emb = state.matrices[0].val();
        let w1 = state.matrices[1].val();
        let w2 = state.matrices[2].val();
        let b1 = state.vectors[0].val().unsqueeze::<2>();
        let b2 = state.vectors[1].val().unsqueeze::<2>();
        (emb.matmul(w1) + b1).tanh().matmul(w2) + b2
    }
}

impl AdapterKernel for PrefixKernel {
    fn reads_base_weight(&self) -> bool {
        // The low-rank / scaling path never reads W: a quantized base stays quantized.
        false
    }

    fn forward_prefix(&self, state: &AdapterState, batch: usize) -> Option<PrefixKv> {
        let (n, l, h, d) = (
            self.num_virtual_tokens,
            self.num_layers,
            self.kv_heads,
            self.head_dim,
        );
        // PEFT: view(B, nvt, 2L, H, d).permute(2, 0, 3, 1, 4): slot 2l = keys of layer l,
        // slot 2l+1 = values; each [B, H, nvt, d].
        let slots = self
            .table(state)
            .reshape([n, 2 * l, h, d])
            .swap_dims(0, 1)
            .swap_dims(1, 2);
        let kv = (0..l)
            .map(|layer| {
                let pick = |slot: usize| {
                    slots
                        .clone()
                        .slice([slot..slot + 1, 0..h, 0..n, 0..d])
                        .expand([batch, h, n, d])
                };
                (pick(2 * layer), pick(2 * layer + 1))
            })
            .collect();
        Some(kv)
    }

    fn merge(
        &self,
        state: &mut AdapterState,
        _site: MergeInput<'_>,
        _d: MergeDirection,
    ) -> Result<BaseWeights> {
        Err(PeftError::NotSupportedByMethod {
            adapter: state.name.clone(),
            method: "PREFIX_TUNING".into(),
            reason: "a prefix adds keys and values; there is no weight to merge it into".into(),
        })
    }

    fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)> {
        vec![("prompt_embeddings".into(), self.table(state).into_data())]
    }

    fn import(
        &self,
        mut state: AdapterState,
        source: &mut dyn TensorSource,
    ) -> Result<AdapterState> {
        let table = source.take(
            "prompt_embeddings",
            &[self.num_virtual_tokens, self.width()],
        )?;
        if self.projection {
            // A PEFT bundle holds only the MLP's output; like PEFT, run from the table.
            let device = state.matrices[0].lazy_device();
            let tensor = Tensor::<2>::from_data(table, &device);
            state = AdapterState::new(
                state.name.clone(),
                vec![tensor],
                vec![],
                Arc::new(PrefixKernel {
                    projection: false,
                    ..self.clone()
                }),
            );
        } else {
            state.set_matrix(0, table);
        }
        Ok(state)
    }
}
