use burn::module::Module;
use burn::tensor::Tensor;

use crate::adapter::AdapterState;

/// The key/value stream of a model's attention blocks, where prompt-learning methods (prefix
/// tuning) attach: an active adapter produces, per layer, keys and values
/// `[batch, kv_heads, num_virtual_tokens, head_dim]` that the attention prepends to its own.
///
/// One per model (like PEFT's prompt encoder), so a projection MLP can span all layers.
#[derive(Module, Debug)]
pub struct KvPrefix {
    /// Named prefix adapters.
    pub adapters: Vec<AdapterState>,
    /// Attention layers that take a prefix.
    #[module(skip)]
    pub num_layers: usize,
    /// Key/value heads per layer.
    #[module(skip)]
    pub kv_heads: usize,
    /// Query heads per layer.
    #[module(skip)]
    pub query_heads: usize,
    /// Size of one head.
    #[module(skip)]
    pub head_dim: usize,
    /// Model hidden size.
    #[module(skip)]
    pub hidden_size: usize,
}

/// Per-layer prefix keys and values, `[batch, kv_heads, prefix_len, head_dim]` each.
pub type PrefixKv = Vec<(Tensor<4>, Tensor<4>)>;

impl KvPrefix {
    /// A site for a model with these attention shapes.
    pub fn new(
        num_layers: usize,
        query_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        hidden_size: usize,
    ) -> Self {
        Self {
            adapters: Vec::new(),
            num_layers,
            kv_heads,
            query_heads,
            head_dim,
            hidden_size,
        }
    }

    /// The prefix of the first active adapter, for a batch of `batch` rows; `None` when no
    /// prefix adapter is active.
    pub fn past_key_values(&self, batch: usize) -> Option<PrefixKv> {
        self.adapters
            .iter()
            .filter(|a| a.active)
            .find_map(|a| a.kernel.forward_prefix(a, batch))
    }
}
