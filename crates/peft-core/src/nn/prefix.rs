use burn::module::Module;
use burn::tensor::{IndexingUpdateOp, Tensor};

use crate::adapter::AdapterState;
use crate::nn::RowAdapters;

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

/// The prefixes of a mixed batch: each row has its adapter's prefix (or none), padded at the
/// end to the longest, so `kv` is `[batch, kv_heads, max(lengths), head_dim]` per layer and
/// row `i`'s real prefix is its first `lengths[i]` positions.
#[derive(Debug, Clone)]
pub struct RowPrefix {
    /// Per-layer keys and values.
    pub kv: PrefixKv,
    /// Real prefix length of each row (0 for rows without a prefix adapter).
    pub lengths: Vec<usize>,
}

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

    /// The prefixes of a mixed batch (see [`RowPrefix`]): each row's adapter, if it is a prefix
    /// adapter at this site, gives that row's prefix. `None` when no row has one.
    pub fn row_prefixes(&self, rows: &RowAdapters) -> Option<RowPrefix> {
        let parts: Vec<_> = rows
            .adapter_groups()
            .filter_map(|(name, group)| {
                let adapter = self.adapters.iter().find(|a| a.name == name)?;
                let kv = adapter.kernel.forward_prefix(adapter, group.rows.len())?;
                Some((group, kv))
            })
            .collect();
        let first = parts.first()?.1.first()?.0.clone();
        let [_, heads, _, head_dim] = first.dims();
        let device = first.device();
        let len = |kv: &PrefixKv| kv.first().map_or(0, |(k, _)| k.dims()[2]);
        let longest = parts.iter().map(|(_, kv)| len(kv)).max().unwrap_or(0);
        let batch = rows.batch();
        let mut lengths = vec![0; batch];
        for (group, kv) in &parts {
            for &row in &group.rows {
                lengths[row] = len(kv);
            }
        }
        let pad = |t: Tensor<4>| {
            let [n, _, l, _] = t.dims();
            if l == longest {
                t
            } else {
                let zeros = Tensor::zeros([n, heads, longest - l, head_dim], &device);
                Tensor::cat(vec![t, zeros], 2)
            }
        };
        let kv = (0..self.num_layers)
            .map(|layer| {
                let mut k = Tensor::zeros([batch, heads, longest, head_dim], &device);
                let mut v = k.clone();
                for (group, kv) in &parts {
                    let (gk, gv) = kv[layer].clone();
                    let index = group.index.clone();
                    k = k.select_assign(0, index.clone(), pad(gk), IndexingUpdateOp::Add);
                    v = v.select_assign(0, index, pad(gv), IndexingUpdateOp::Add);
                }
                (k, v)
            })
            .collect();
        Some(RowPrefix { kv, lengths })
    }
}
