//! Key/value cache for incremental decoding, and where a prefix-tuning prefix enters a forward:
//! PEFT passes a prefix to transformers as a cache of that length, so positions of the real
//! tokens start after it and the attention mask gains ones in front.

use burn::tensor::{Device, Int, Tensor, TensorData, s};
use peft_core::nn::{ForwardContext, KvPrefix};

use crate::error::{ModelError, Result};

/// Keys and values of every layer so far, `[batch, kv_heads, past, head_dim]`, stored before
/// GQA head repetition (and, for Llama, after RoPE).
///
/// Rows may be shifted in position: a mixed batch gives rows prefixes of different lengths
/// (padded to the longest), and batched generation left-pads prompts; row `r`'s tokens then sit
/// at positions `past + j + shift[r]`, as they would in a forward of that row alone.
///
/// Each layer's keys and values live in buffers with room for more positions, grown
/// geometrically: a decoding step writes its one position in place instead of concatenating the
/// whole cache into a new tensor (as transformers' `DynamicCache` does with `torch.cat`), and the
/// attention reads the filled part as a strided view.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    prefix_len: usize,
    /// Real prefix length of each row, when rows differ (mixed batches).
    row_prefix: Option<Vec<usize>>,
    /// Per-row position shift (see the type's documentation).
    shift: Option<Vec<i64>>,
}

/// One layer's cache: `[batch, kv_heads, capacity, head_dim]` buffers whose first `len`
/// positions are filled.
#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor<4>,
    v: Tensor<4>,
    len: usize,
}

/// Positions a buffer grows to at least (a prompt of a few tokens then room for a few dozen).
const MIN_CAPACITY: usize = 64;

impl LayerKv {
    /// Exactly `k`, `v` (no room yet: a training forward or a prompt that is never continued
    /// pays nothing for capacity).
    fn exact(k: Tensor<4>, v: Tensor<4>) -> Self {
        let len = k.dims()[2];
        Self { k, v, len }
    }

    /// The filled keys and values (views of the buffers).
    fn filled(&self) -> (Tensor<4>, Tensor<4>) {
        let view = |t: &Tensor<4>| {
            if t.dims()[2] == self.len {
                t.clone()
            } else {
                t.clone().narrow(2, 0, self.len)
            }
        };
        (view(&self.k), view(&self.v))
    }

    /// Append `k`, `v` (`[batch, kv_heads, new, head_dim]`) after the filled positions: written
    /// in place when the buffers have room (and are not shared), else into buffers of twice the
    /// needed size. In an autodiff graph, concatenated as before (a tracked cache is a training
    /// forward, which appends once).
    fn append(self, k: Tensor<4>, v: Tensor<4>) -> Self {
        let new = k.dims()[2];
        let len = self.len + new;
        if k.is_tracked() || v.is_tracked() || self.k.is_tracked() || self.v.is_tracked() {
            let (pk, pv) = self.filled();
            return Self::exact(Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2));
        }
        let (mut bk, mut bv) = (self.k, self.v);
        let capacity = bk.dims()[2];
        if len > capacity {
            let grown = |buffer: Tensor<4>, filled: usize| {
                let [b, h, _, d] = buffer.dims();
                let size = (2 * len).max(MIN_CAPACITY);
                let fresh = Tensor::<4>::zeros([b, h, size, d], (&buffer.device(), buffer.dtype()));
                let old = buffer.narrow(2, 0, filled);
                fresh.slice_assign(s![.., .., 0..filled, ..], old)
            };
            bk = grown(bk, self.len);
            bv = grown(bv, self.len);
        }
        let at = self.len..len;
        Self {
            k: bk.slice_assign(s![.., .., at.clone(), ..], k),
            v: bv.slice_assign(s![.., .., at, ..], v),
            len,
        }
    }
}

impl KvCache {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            ..Default::default()
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.iter().flatten().next().map_or(0, |l| l.len)
    }

    /// Positions at the start of the cache that hold a prefix-tuning prefix (the longest, in a
    /// mixed batch).
    pub fn prefix_len(&self) -> usize {
        self.prefix_len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows of the cached keys, if any are cached.
    pub fn batch(&self) -> Option<usize> {
        self.layers.iter().flatten().next().map(|l| l.k.dims()[0])
    }

    /// Shift the positions of each row by `shift[r]` (added to any shift already set), e.g.
    /// `-pad` for a prompt left-padded with `pad` tokens, as transformers' `generate` derives
    /// `position_ids` from the attention mask.
    pub fn shift_rows(&mut self, shift: &[i64]) {
        let current = self.shift.get_or_insert_with(|| vec![0; shift.len()]);
        current.resize(shift.len(), 0);
        for (c, s) in current.iter_mut().zip(shift) {
            *c += s;
        }
    }

    /// Position ids `[batch, seq]` of the next `seq` tokens: `len + j`, shifted per row and
    /// clamped at 0 (left-padding tokens are masked; transformers gives them position 1).
    pub fn position_ids(&self, batch: usize, seq: usize, device: &Device) -> Tensor<2, Int> {
        Tensor::from_data(
            TensorData::new(self.positions(batch, seq).concat(), [batch, seq]),
            device,
        )
    }

    /// [`position_ids`](Self::position_ids) on the host, one vector per row.
    pub fn positions(&self, batch: usize, seq: usize) -> Vec<Vec<i64>> {
        let past = self.len() as i64;
        (0..batch)
            .map(|r| {
                let shift = self
                    .shift
                    .as_ref()
                    .and_then(|s| s.get(r))
                    .copied()
                    .unwrap_or(0);
                (0..seq as i64).map(|j| (past + j + shift).max(0)).collect()
            })
            .collect()
    }

    /// The position of each of the first `keys` key slots of every row: prefix slots keep
    /// their index (a row's padding slots are masked anyway), token slots their row's shifted
    /// position.
    pub fn key_positions(&self, batch: usize, keys: usize) -> Vec<Vec<i64>> {
        (0..batch)
            .map(|r| {
                let shift = self
                    .shift
                    .as_ref()
                    .and_then(|s| s.get(r))
                    .copied()
                    .unwrap_or(0);
                (0..keys as i64)
                    .map(|k| {
                        if (k as usize) < self.prefix_len {
                            k
                        } else {
                            (k + shift).max(0)
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// Whether rows are shifted in position (so they need per-row position tables).
    pub fn has_row_shift(&self) -> bool {
        self.shift
            .as_ref()
            .is_some_and(|s| s.iter().any(|v| *v != 0))
    }

    /// The cache and attention mask to run a forward of `[batch, seq]` ids with: `cache` (or
    /// `local` when the caller has none), with the prefix of the active prefix adapter (or, in
    /// a mixed batch, of each row's adapter) placed first when the cache is still empty; the
    /// mask (over the real tokens) gains the prefix positions in front.
    ///
    /// Checks first that `attention_mask` covers the real tokens so far (`[batch, past + seq]`,
    /// the prefix not included) and that a non-empty `cache` holds the same batch.
    pub fn checked_with_prefix<'a>(
        prefix: &KvPrefix,
        [batch, seq]: [usize; 2],
        cache: Option<&'a mut KvCache>,
        local: &'a mut KvCache,
        attention_mask: Option<Tensor<2, Int>>,
        ctx: &ForwardContext,
    ) -> Result<(Option<&'a mut KvCache>, Option<Tensor<2, Int>>)> {
        let past = cache.as_deref().map_or(0, |c| c.len() - c.prefix_len);
        if let Some(cached) = cache.as_deref().and_then(KvCache::batch)
            && cached != batch
        {
            return Err(ModelError::InputOutOfRange {
                input: "input_ids".into(),
                found: format!("a batch of {batch} rows"),
                limit: format!("the KV cache holds {cached} rows"),
                fix: "continue a cached sequence with the same rows, or start a new cache".into(),
            });
        }
        if let Some(rows) = ctx.rows()
            && rows.batch() != batch
        {
            return Err(ModelError::InputOutOfRange {
                input: "adapter_names".into(),
                found: format!("{} names", rows.batch()),
                limit: format!("the batch has {batch} rows"),
                fix: "name one adapter (or `__base__`) per row".into(),
            });
        }
        crate::input_checks::check_shape(
            attention_mask.as_ref(),
            "attention_mask",
            [batch, past + seq],
            "[batch, cached tokens + new tokens]",
        )?;
        let cache = Self::seeded(prefix, batch, cache, local, ctx);
        let mask = match cache.as_deref() {
            Some(c) => c.extend_mask(attention_mask, batch, past + seq),
            None => attention_mask,
        };
        Ok((cache, mask))
    }

    fn seeded<'a>(
        prefix: &KvPrefix,
        batch: usize,
        cache: Option<&'a mut KvCache>,
        local: &'a mut KvCache,
        ctx: &ForwardContext,
    ) -> Option<&'a mut KvCache> {
        let already = cache.as_deref().is_some_and(|c| !c.is_empty());
        if already {
            return cache;
        }
        let (kv, row_prefix) = match ctx.rows() {
            Some(rows) => match prefix.row_prefixes(rows) {
                Some(p) => (p.kv, Some(p.lengths)),
                None => return cache,
            },
            None => match prefix.past_key_values(batch) {
                Some(kv) => (kv, None),
                None => return cache,
            },
        };
        let cache = match cache {
            Some(c) => c,
            None => local,
        };
        if cache.layers.len() < kv.len() {
            cache.layers.resize(kv.len(), None);
        }
        cache.prefix_len = kv.first().map_or(0, |(k, _)| k.dims()[2]);
        for (slot, (k, v)) in cache.layers.iter_mut().zip(kv) {
            *slot = Some(LayerKv::exact(k, v));
        }
        if let Some(lengths) = &row_prefix {
            // A row with a shorter prefix than the longest: its tokens come right after its own
            // prefix, as in a forward of that row alone.
            let shift: Vec<i64> = lengths
                .iter()
                .map(|&l| l as i64 - cache.prefix_len as i64)
                .collect();
            cache.shift_rows(&shift);
        }
        cache.row_prefix = row_prefix;
        Some(cache)
    }

    /// The mask over the prefix positions: all ones, or per row ones for its real prefix.
    fn prefix_mask(&self, batch: usize, device: &Device) -> Tensor<2, Int> {
        match &self.row_prefix {
            None => Tensor::ones([batch, self.prefix_len], device),
            Some(lengths) => {
                let values: Vec<i64> = lengths
                    .iter()
                    .flat_map(|&l| (0..self.prefix_len).map(move |j| i64::from(j < l)))
                    .collect();
                Tensor::from_data(TensorData::new(values, [batch, self.prefix_len]), device)
            }
        }
    }

    /// `attention_mask` (over `tokens` real tokens) with the prefix positions prepended; a mask
    /// is made when padded prefixes need one.
    fn extend_mask(
        &self,
        attention_mask: Option<Tensor<2, Int>>,
        batch: usize,
        tokens: usize,
    ) -> Option<Tensor<2, Int>> {
        if self.prefix_len == 0 {
            return attention_mask;
        }
        let padded = self
            .row_prefix
            .as_ref()
            .is_some_and(|l| l.iter().any(|&l| l < self.prefix_len));
        let mask = match attention_mask {
            Some(m) => m,
            None if padded => {
                let device = self.device()?;
                Tensor::ones([batch, tokens], &device)
            }
            None => return None,
        };
        let prefix = self.prefix_mask(batch, &mask.device());
        Some(Tensor::cat(vec![prefix, mask], 1))
    }

    fn device(&self) -> Option<Device> {
        self.layers.iter().flatten().next().map(|l| l.k.device())
    }

    /// Split a batch into one cache per row that holds only the slots the row attends to: its
    /// own prefix (its real part, in a mixed batch of prefixes of different lengths) and the
    /// tokens where `attention_mask[row]` is 1 (the mask over the real tokens, as a forward
    /// takes it: `[batch, len() - prefix_len()]`). Each part is a one-row cache without shift
    /// or separate prefix, so its next token sits at position `len()`: where the row alone
    /// would continue when its masked slots are exactly its padding, as after a left-padded
    /// forward. [`stack`](Self::stack) joins parts again, e.g. with other sequences.
    ///
    /// ```
    /// use burn::tensor::{Device, Tensor};
    /// use peft_models::KvCache;
    ///
    /// let device = Device::flex();
    /// let mut cache = KvCache::new(1);
    /// // Two rows of 3 slots; row 0 is left-padded by one.
    /// let kv = Tensor::<4>::ones([2, 1, 3, 4], &device);
    /// cache.append(0, kv.clone(), kv);
    /// let parts = cache.split_rows(&[vec![0, 1, 1], vec![1, 1, 1]]).unwrap();
    /// assert_eq!(parts.iter().map(KvCache::len).collect::<Vec<_>>(), [2, 3]);
    /// assert_eq!(parts[0].positions(1, 1), [[2]]);
    /// ```
    pub fn split_rows(&self, attention_mask: &[Vec<i64>]) -> Result<Vec<KvCache>> {
        let batch = self.batch().ok_or_else(|| {
            ModelError::InvalidInput("split_rows: the cache holds nothing yet".into())
        })?;
        let tokens = self.len() - self.prefix_len;
        if attention_mask.len() != batch || attention_mask.iter().any(|m| m.len() != tokens) {
            return Err(ModelError::InvalidInput(format!(
                "split_rows: the mask must be [{batch}, {tokens}] (rows, cached tokens after the \
                 prefix)"
            )));
        }
        let device = self.device().ok_or_else(|| {
            ModelError::InvalidInput("split_rows: the cache holds nothing yet".into())
        })?;
        let mut parts = Vec::with_capacity(batch);
        for (row, mask) in attention_mask.iter().enumerate() {
            let prefix = self
                .row_prefix
                .as_ref()
                .map_or(self.prefix_len, |lengths| lengths[row]);
            let slots: Vec<i64> = (0..prefix as i64)
                .chain(
                    mask.iter()
                        .enumerate()
                        .filter(|(_, m)| **m != 0)
                        .map(|(j, _)| (self.prefix_len + j) as i64),
                )
                .collect();
            if slots.is_empty() {
                return Err(ModelError::InvalidInput(format!(
                    "split_rows: row {row} attends to no slot"
                )));
            }
            let every = slots.len() == self.len();
            let count = slots.len();
            let index = Tensor::<1, Int>::from_data(TensorData::new(slots, [count]), &device);
            let take = |t: &Tensor<4>| {
                let t = t.clone().narrow(0, row, 1);
                if every { t } else { t.select(2, index.clone()) }
            };
            parts.push(KvCache {
                layers: self
                    .layers
                    .iter()
                    .map(|l| {
                        l.as_ref().map(|l| {
                            let (k, v) = l.filled();
                            LayerKv::exact(take(&k), take(&v))
                        })
                    })
                    .collect(),
                ..Default::default()
            });
        }
        Ok(parts)
    }

    /// Join one-row caches (as [`split_rows`](Self::split_rows) makes them) into one batch:
    /// each row is left-padded with zeros to the longest and shifted back by its padding, so it
    /// continues at its own position. Returns the batch and its attention mask (`[rows, len()]`,
    /// 0 on padding), to extend with a 1 per new token.
    ///
    /// ```
    /// use burn::tensor::{Device, Tensor};
    /// use peft_models::KvCache;
    ///
    /// let device = Device::flex();
    /// let part = |len: usize| {
    ///     let mut cache = KvCache::new(1);
    ///     let kv = Tensor::<4>::ones([1, 1, len, 4], &device);
    ///     cache.append(0, kv.clone(), kv);
    ///     cache
    /// };
    /// let (batch, mask) = KvCache::stack(&[part(2), part(3)]).unwrap();
    /// assert_eq!(batch.len(), 3);
    /// assert_eq!(mask, [vec![0, 1, 1], vec![1, 1, 1]]);
    /// // Each row's next token continues at its own length.
    /// assert_eq!(batch.positions(2, 1), [[2], [3]]);
    /// ```
    pub fn stack(parts: &[KvCache]) -> Result<(KvCache, Vec<Vec<i64>>)> {
        let bad = |why: String| ModelError::InvalidInput(format!("stack: {why}"));
        let first = parts
            .first()
            .ok_or_else(|| bad("no cache to join".into()))?;
        let layers = first.layers.len();
        for (i, part) in parts.iter().enumerate() {
            if part.batch() != Some(1)
                || part.layers.len() != layers
                || part.layers.iter().any(Option::is_none)
                || part.prefix_len != 0
                || part.has_row_shift()
            {
                return Err(bad(format!(
                    "part {i} is not a filled one-row cache of {layers} layers without prefix \
                     or shift (split a batch with split_rows first)"
                )));
            }
        }
        let width = parts.iter().map(KvCache::len).max().unwrap_or(0);
        let pads: Vec<usize> = parts.iter().map(|p| width - p.len()).collect();
        let pad_left = |t: &Tensor<4>, pad: usize| {
            if pad == 0 {
                return t.clone();
            }
            let [b, h, _, d] = t.dims();
            let zeros = Tensor::<4>::zeros([b, h, pad, d], &t.device());
            Tensor::cat(vec![zeros, t.clone()], 2)
        };
        let joined = (0..layers)
            .map(|layer| {
                let (ks, vs): (Vec<_>, Vec<_>) = parts
                    .iter()
                    .zip(&pads)
                    .map(|(part, &pad)| {
                        let (k, v) = part.layers[layer].as_ref().expect("checked above").filled();
                        (pad_left(&k, pad), pad_left(&v, pad))
                    })
                    .unzip();
                Some(LayerKv::exact(Tensor::cat(ks, 0), Tensor::cat(vs, 0)))
            })
            .collect();
        let mut cache = KvCache {
            layers: joined,
            ..Default::default()
        };
        let shift: Vec<i64> = pads.iter().map(|&p| -(p as i64)).collect();
        cache.shift_rows(&shift);
        let mask = pads
            .iter()
            .map(|&pad| (0..width).map(|j| i64::from(j >= pad)).collect())
            .collect();
        Ok((cache, mask))
    }

    /// Keep `rows` of the batch, in this order (e.g. the sequences still running), with their
    /// shifts and prefixes.
    ///
    /// ```
    /// use burn::tensor::{Device, Tensor};
    /// use peft_models::KvCache;
    ///
    /// let device = Device::flex();
    /// let mut cache = KvCache::new(1);
    /// let kv = Tensor::<4>::ones([3, 1, 2, 4], &device);
    /// cache.append(0, kv.clone(), kv);
    /// cache.shift_rows(&[0, -1, 0]);
    /// let kept = cache.select_rows(&[1]).unwrap();
    /// assert_eq!(kept.batch(), Some(1));
    /// assert_eq!(kept.positions(1, 1), [[1]]);
    /// ```
    pub fn select_rows(&self, rows: &[usize]) -> Result<KvCache> {
        let batch = self.batch().unwrap_or(0);
        if rows.is_empty() || rows.iter().any(|&r| r >= batch) {
            return Err(ModelError::InvalidInput(format!(
                "select_rows: rows {rows:?} of a batch of {batch}"
            )));
        }
        let device = self.device().expect("a filled cache has a device");
        let ids: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let index = Tensor::<1, Int>::from_data(TensorData::new(ids, [rows.len()]), &device);
        let pick = |t: &Tensor<4>| t.clone().select(0, index.clone());
        Ok(KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    l.as_ref().map(|l| LayerKv {
                        k: pick(&l.k),
                        v: pick(&l.v),
                        len: l.len,
                    })
                })
                .collect(),
            prefix_len: self.prefix_len,
            row_prefix: self
                .row_prefix
                .as_ref()
                .map(|l| rows.iter().map(|&r| l[r]).collect()),
            shift: self.shift.as_ref().map(|s| {
                rows.iter()
                    .map(|&r| s.get(r).copied().unwrap_or(0))
                    .collect()
            }),
        })
    }

    /// Append `k`, `v` for `layer` and return the full keys and values (views of the cache's
    /// buffers, which grow geometrically: see the type's documentation).
    pub fn append(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let entry = match self.layers[layer].take() {
            Some(entry) => entry.append(k, v),
            None => LayerKv::exact(k, v),
        };
        let filled = entry.filled();
        self.layers[layer] = Some(entry);
        filled
    }
}

/// Position ids `[batch, seq]` for a forward with `cache` (or none: `0..seq`).
pub fn position_ids(
    cache: Option<&KvCache>,
    batch: usize,
    seq: usize,
    device: &Device,
) -> Tensor<2, Int> {
    match cache {
        Some(c) => c.position_ids(batch, seq, device),
        None => KvCache::default().position_ids(batch, seq, device),
    }
}

#[cfg(test)]
mod tests;
