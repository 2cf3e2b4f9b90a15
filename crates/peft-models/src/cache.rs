//! Key/value cache for incremental decoding.

use burn::tensor::{Int, Tensor};
use peft_core::nn::KvPrefix;

/// Keys and values of every layer so far, `[batch, kv_heads, past, head_dim]`, stored before
/// GQA head repetition (and, for Llama, after RoPE).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    prefix_len: usize,
}

impl KvCache {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            prefix_len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map_or(0, |(k, _)| k.dims()[2])
    }

    /// Positions at the start of the cache that hold a prefix-tuning prefix.
    pub fn prefix_len(&self) -> usize {
        self.prefix_len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache and attention mask to run with: `cache` (or `local` when the caller has
    /// none), with the active prefix of `prefix` placed first when the cache is still empty, as
    /// PEFT passes a prefix to transformers as a cache of that length; the mask (over the real
    /// tokens) gains ones for the prefix positions.
    pub fn with_prefix<'a>(
        prefix: &KvPrefix,
        batch: usize,
        cache: Option<&'a mut KvCache>,
        local: &'a mut KvCache,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> (Option<&'a mut KvCache>, Option<Tensor<2, Int>>) {
        let cache = Self::seeded(prefix, batch, cache, local);
        let mask = match cache.as_deref() {
            Some(c) => c.extend_mask(attention_mask),
            None => attention_mask,
        };
        (cache, mask)
    }

    /// [`with_prefix`](Self::with_prefix) for a forward over `[batch, seq]` ids, after checking
    /// that `attention_mask` covers the real tokens so far (`[batch, past + seq]`, the prefix
    /// not included) and that a non-empty `cache` holds the same batch.
    pub fn checked_with_prefix<'a>(
        prefix: &KvPrefix,
        [batch, seq]: [usize; 2],
        cache: Option<&'a mut KvCache>,
        local: &'a mut KvCache,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> crate::Result<(Option<&'a mut KvCache>, Option<Tensor<2, Int>>)> {
        let past = cache.as_deref().map_or(0, |c| c.len() - c.prefix_len);
        if let Some(cached) = cache.as_deref().and_then(KvCache::batch)
            && cached != batch
        {
            return Err(crate::ModelError::InputOutOfRange {
                input: "input_ids".into(),
                found: format!("a batch of {batch} rows"),
                limit: format!("the KV cache holds {cached} rows"),
                fix: "continue a cached sequence with the same rows, or start a new cache".into(),
            });
        }
        crate::input_checks::check_shape(
            attention_mask.as_ref(),
            "attention_mask",
            [batch, past + seq],
            "[batch, cached tokens + new tokens]",
        )?;
        Ok(Self::with_prefix(
            prefix,
            batch,
            cache,
            local,
            attention_mask,
        ))
    }

    /// Rows of the cached keys, if any are cached.
    pub fn batch(&self) -> Option<usize> {
        self.layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.dims()[0])
    }

    fn seeded<'a>(
        prefix: &KvPrefix,
        batch: usize,
        cache: Option<&'a mut KvCache>,
        local: &'a mut KvCache,
    ) -> Option<&'a mut KvCache> {
        let Some(kv) = prefix.past_key_values(batch) else {
            return cache;
        };
        let cache = match cache {
            Some(c) => c,
            None => local,
        };
        if cache.is_empty() {
            if cache.layers.len() < kv.len() {
                cache.layers.resize(kv.len(), None);
            }
            cache.prefix_len = kv.first().map_or(0, |(k, _)| k.dims()[2]);
            for (slot, pair) in cache.layers.iter_mut().zip(kv) {
                *slot = Some(pair);
            }
        }
        Some(cache)
    }

    /// `attention_mask` (over real tokens) with ones prepended for the prefix positions.
    fn extend_mask(&self, attention_mask: Option<Tensor<2, Int>>) -> Option<Tensor<2, Int>> {
        let mask = attention_mask?;
        if self.prefix_len == 0 {
            return Some(mask);
        }
        let [b, _] = mask.dims();
        let ones = Tensor::<2, Int>::ones([b, self.prefix_len], &mask.device());
        Some(Tensor::cat(vec![ones, mask], 1))
    }

    /// Append `k`, `v` for `layer` and return the full keys and values.
    pub fn append(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (k, v) = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        (k, v)
    }
}
