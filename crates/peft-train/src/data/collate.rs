//! Dynamic-padding collation of examples into batch tensors.

use burn::tensor::{Device, Int, Tensor, TensorData};

use peft_core::nn::{IdBounds, PackedRows};

use super::{Example, IGNORE_INDEX};

/// A padded batch of examples.
#[derive(Debug, Clone)]
pub struct Collated {
    /// `[b, s]` token ids, right-padded with the pad id.
    pub input_ids: Tensor<2, Int>,
    /// `[b, s]`: 1 for tokens, 0 for padding.
    pub attention_mask: Tensor<2, Int>,
    /// `[b, s]` segment ids, 0 on padding.
    pub token_type_ids: Tensor<2, Int>,
    /// `[b]` class ids, when every example has one.
    pub labels: Option<Tensor<1, Int>>,
    /// `[b, s]` per-token targets padded with [`IGNORE_INDEX`], when every example has them.
    pub lm_labels: Option<Tensor<2, Int>>,
    /// The number of real (non-padding) tokens.
    pub tokens: usize,
    /// The smallest and largest of `input_ids` and of `token_type_ids`, seen on the host while
    /// collating: the forward checks these instead of reading the tensors back from a GPU
    /// ([`IdBounds`]). `None` for an empty batch.
    pub id_bounds: Option<(IdBounds, IdBounds)>,
    /// The examples in each row, when a row of the batch is [`pack`](super::pack)ed: the
    /// forward keeps them apart.
    pub packed: Option<PackedRows>,
    /// `[b, c, h, w]` images, when every example of the batch has one (image
    /// classification; the token tensors are then `[b, 0]`).
    pub pixel_values: Option<Tensor<4>>,
}

/// Right-pad a batch to its longest example (at least one column).
///
/// An empty batch gives `[0, 1]` tensors and no labels.
pub fn collate(batch: &[&Example], pad_id: i64, device: &Device) -> Collated {
    let b = batch.len();
    let pixel_values = stack_images(batch, device);
    // Images carry no tokens: `[b, 0]` token tensors (at least one column for text).
    let min_columns = usize::from(pixel_values.is_none());
    let s = batch
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0)
        .max(min_columns);
    let mut ids = vec![pad_id; b * s];
    let mut mask = vec![0i64; b * s];
    let mut types = vec![0i64; b * s];
    let all_lm = b > 0 && batch.iter().all(|e| e.labels.is_some());
    let mut lm = vec![IGNORE_INDEX; if all_lm { b * s } else { 0 }];
    let mut tokens = 0;
    for (row, e) in batch.iter().enumerate() {
        let base = row * s;
        let n = e.input_ids.len();
        tokens += n;
        ids[base..base + n].copy_from_slice(&e.input_ids);
        mask[base..base + n].fill(1);
        let t = e.token_type_ids.len().min(n);
        types[base..base + t].copy_from_slice(&e.token_type_ids[..t]);
        if let (true, Some(l)) = (all_lm, &e.labels) {
            let t = l.len().min(n);
            lm[base..base + t].copy_from_slice(&l[..t]);
        }
    }
    let id_bounds = IdBounds::of(ids.iter().copied()).zip(IdBounds::of(types.iter().copied()));
    let t2 = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [b, s]), device);
    let packed = batch
        .iter()
        .any(|e| !e.segments.is_empty())
        .then(|| {
            PackedRows::new(
                batch
                    .iter()
                    .map(|e| match e.segments.as_slice() {
                        [] => vec![e.input_ids.len()],
                        lengths => lengths.to_vec(),
                    })
                    .filter(|lengths| lengths.iter().all(|&n| n > 0))
                    .collect(),
            )
        })
        .flatten()
        .filter(|p| p.batch() == b);
    let labels = (b > 0)
        .then(|| batch.iter().map(|e| e.label.map(|l| l as i64)).collect())
        .flatten()
        .map(|v: Vec<i64>| Tensor::<1, Int>::from_data(TensorData::new(v, [b]), device));
    Collated {
        input_ids: t2(ids),
        attention_mask: t2(mask),
        token_type_ids: t2(types),
        labels,
        lm_labels: all_lm.then(|| t2(lm)),
        tokens,
        id_bounds,
        packed,
        pixel_values,
    }
}

/// The images of a batch as one `[b, c, h, w]` tensor, when every example has one of the same
/// shape (the preprocessing resizes them all alike).
fn stack_images(batch: &[&Example], device: &Device) -> Option<Tensor<4>> {
    let first = batch.first()?.image.as_ref()?;
    let dims = [first.channels, first.height, first.width];
    let same = |e: &&Example| {
        e.image
            .as_ref()
            .is_some_and(|i| [i.channels, i.height, i.width] == dims)
    };
    if !batch.iter().all(same) {
        return None;
    }
    let mut values = Vec::with_capacity(batch.len() * dims.iter().product::<usize>());
    for e in batch {
        values.extend_from_slice(&e.image.as_ref().expect("checked").values);
    }
    let [c, h, w] = dims;
    Some(Tensor::from_data(
        TensorData::new(values, [batch.len(), c, h, w]),
        device,
    ))
}
