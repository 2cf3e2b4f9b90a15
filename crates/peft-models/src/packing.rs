//! Packed rows in a decoder forward ([`PackedRows`]): each sequence of a row attends only to
//! earlier tokens of itself (and to a prefix-tuning prefix, which every sequence sees as it
//! would alone), and positions restart at every sequence. transformers does the same for
//! packed `position_ids` (`masking_utils.find_packed_sequence_indices` builds the
//! block-diagonal causal mask; flash-attention's varlen path uses `cu_seqlens`), so a packed
//! row gives each sequence the hidden states of a forward of that sequence alone.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use peft_core::nn::{ForwardContext, PackedRows};

use crate::cache::KvCache;
use crate::error::{ModelError, Result};
use crate::ops::padding_mask;

/// Where a packed forward's tokens sit: the position of each token (`[batch][seq]`) and of
/// each key slot (prefix slots first), and the mask that keeps the sequences apart.
pub struct PackedPositions {
    /// Each row's query positions.
    pub query: Vec<Vec<i64>>,
    /// Each row's key positions (prefix slots keep their index).
    pub keys: Vec<Vec<i64>>,
    /// `[batch, 1, seq, keys]`, true where a query must not see a key: a key of another
    /// sequence of the same row, or a padding column.
    pub hidden: Tensor<4, Bool>,
}

/// The packed positions of a forward of `[batch, seq]` new tokens, when `fc` packs its rows.
/// The rows must start fresh (a cache may hold a prefix, no earlier tokens) and hold at most
/// `seq` tokens each, else [`ModelError::InputOutOfRange`].
pub fn packed_positions(
    fc: &ForwardContext,
    [batch, seq]: [usize; 2],
    cache: Option<&KvCache>,
    device: &Device,
) -> Result<Option<PackedPositions>> {
    let Some(packed) = fc.packed() else {
        return Ok(None);
    };
    check(packed, [batch, seq], cache)?;
    let empty = KvCache::default();
    let cache = cache.unwrap_or(&empty);
    let prefix = cache.len();
    // Row `r`'s first token sits where a forward of its first sequence alone would put it
    // (after its prefix, shifted when rows have prefixes of different lengths).
    let starts: Vec<i64> = cache.positions(batch, 1).iter().map(|p| p[0]).collect();
    let slots = cache.key_positions(batch, prefix);
    let query: Vec<Vec<i64>> = (0..batch)
        .map(|r| {
            packed
                .positions(r, seq)
                .iter()
                .map(|p| starts[r] + p)
                .collect()
        })
        .collect();
    let keys: Vec<Vec<i64>> = slots
        .into_iter()
        .zip(&query)
        .map(|(mut slots, q)| {
            slots.extend(q);
            slots
        })
        .collect();
    let mut hidden = Vec::with_capacity(batch * seq * (prefix + seq));
    for r in 0..batch {
        let ids = packed.sequence_ids(r, seq);
        for query_id in &ids {
            hidden.extend(std::iter::repeat_n(false, prefix));
            hidden.extend(ids.iter().map(|key_id| match (query_id, key_id) {
                (_, None) => true,
                (Some(q), Some(k)) => q != k,
                // A padding query sees what its row's padding would: every real key before it.
                (None, Some(_)) => false,
            }));
        }
    }
    let hidden = Tensor::from_data(
        TensorData::new(hidden, [batch, 1, seq, prefix + seq]),
        device,
    );
    Ok(Some(PackedPositions {
        query,
        keys,
        hidden,
    }))
}

/// `[batch, 1, seq, keys]`, true where a query must not see a key: the zeros of
/// `attention_mask` (over every key) and, for a packed batch, keys of another sequence.
pub fn key_mask(
    attention_mask: Option<&Tensor<2, Int>>,
    packed: Option<&PackedPositions>,
    seq: usize,
) -> Option<Tensor<4, Bool>> {
    let padding = attention_mask.map(|m| padding_mask(m, 1, seq));
    match (padding, packed) {
        (Some(p), Some(packed)) => Some(p.bool_or(packed.hidden.clone())),
        (None, Some(packed)) => Some(packed.hidden.clone()),
        (padding, None) => padding,
    }
}

fn check(packed: &PackedRows, [batch, seq]: [usize; 2], cache: Option<&KvCache>) -> Result<()> {
    let out_of_range = |found: String, limit: String, fix: &str| ModelError::InputOutOfRange {
        input: "packed rows".into(),
        found,
        limit,
        fix: fix.into(),
    };
    if packed.batch() != batch {
        return Err(out_of_range(
            format!("{} packed rows", packed.batch()),
            format!("the batch has {batch} rows"),
            "give the sequence lengths of every row",
        ));
    }
    if packed.longest_row() > seq {
        return Err(out_of_range(
            format!("a row of {} packed tokens", packed.longest_row()),
            format!("the input has {seq} columns"),
            "give sequence lengths that add up to at most the row length",
        ));
    }
    if let Some(c) = cache
        && c.len() > c.prefix_len()
    {
        return Err(out_of_range(
            format!("a KV cache of {} earlier tokens", c.len() - c.prefix_len()),
            "packed rows start new sequences".into(),
            "run a packed batch without a cache of earlier tokens",
        ));
    }
    Ok(())
}
