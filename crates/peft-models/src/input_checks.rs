//! Checks on model inputs, run by every forward before any tensor op could panic on them:
//! token ids inside the vocabulary, sequences that fit the position table, masks and segment
//! ids of the right shape. Each failure is [`ModelError::InputOutOfRange`] naming the input,
//! what was found, the limit and what to do.

use burn::tensor::{Int, Tensor};
use peft_core::nn::IdBounds;

use crate::error::{ModelError, Result};

fn out_of_range(input: &str, found: String, limit: String, fix: &str) -> ModelError {
    ModelError::InputOutOfRange {
        input: input.into(),
        found,
        limit,
        fix: fix.into(),
    }
}

/// `[batch, seq]` of `input_ids`, which must hold at least one token per row.
pub(crate) fn ids_dims(ids: &Tensor<2, Int>) -> Result<[usize; 2]> {
    let [b, s] = ids.dims();
    if b == 0 || s == 0 {
        return Err(out_of_range(
            "input_ids",
            format!("shape [{b}, {s}]"),
            "at least one row of at least one token is needed".into(),
            "pass a non-empty batch",
        ));
    }
    Ok([b, s])
}

/// Every value of `ids` is in `0..size`. One small device read (the minimum and maximum); the
/// offending position is looked up only when there is one. Off flex, bounds the caller saw on
/// the host (`known`, see [`IdBounds`]) replace the read when they are in range: a read there
/// waits for the device's queue.
pub(crate) fn check_range(
    ids: &Tensor<2, Int>,
    size: usize,
    known: Option<IdBounds>,
    input: &str,
    fix: &str,
) -> Result<()> {
    if known.is_some_and(|b| b.within(size)) && !peft_ops::is_flex(&ids.device()) {
        return Ok(());
    }
    let bounds = Tensor::cat(vec![ids.clone().min(), ids.clone().max()], 0).into_data();
    let bounds: Vec<i64> = bounds
        .convert::<i64>()
        .try_into_vec()
        .map_err(|e| ModelError::InvalidInput(format!("{input}: cannot read the ids: {e:?}")))?;
    if bounds[0] >= 0 && (bounds[1] as u64) < size as u64 {
        return Ok(());
    }
    let [_, s] = ids.dims();
    let values: Vec<i64> = ids
        .clone()
        .into_data()
        .convert::<i64>()
        .try_into_vec()
        .unwrap_or_default();
    let (index, value) = values
        .iter()
        .enumerate()
        .find(|(_, v)| **v < 0 || **v as u64 >= size as u64)
        .map(|(i, v)| (i, *v))
        .unwrap_or((0, bounds[1]));
    Err(out_of_range(
        input,
        format!("id {value} at row {}, position {}", index / s, index % s),
        format!(
            "valid ids are 0..={} ({size} entries)",
            size.saturating_sub(1)
        ),
        fix,
    ))
}

/// Token ids inside a vocabulary of `vocab` entries.
pub(crate) fn check_token_ids(
    ids: &Tensor<2, Int>,
    vocab: usize,
    known: Option<IdBounds>,
) -> Result<()> {
    check_range(
        ids,
        vocab,
        known,
        "input_ids",
        "encode the text with this model's tokenizer (a tokenizer of another model gives ids \
         the embedding table does not have)",
    )
}

/// An optional `[batch, len]` companion of the ids (`attention_mask`, `token_type_ids`) has
/// exactly `expected` as shape.
pub(crate) fn check_shape(
    tensor: Option<&Tensor<2, Int>>,
    input: &str,
    expected: [usize; 2],
    what: &str,
) -> Result<()> {
    if let Some(t) = tensor
        && t.dims() != expected
    {
        return Err(out_of_range(
            input,
            format!("shape {:?}", t.dims()),
            format!("it must be {expected:?} ({what})"),
            "give it one entry per token of input_ids",
        ));
    }
    Ok(())
}

/// `used` positions fit a learned position table of `limit` rows (`key` in config.json).
pub(crate) fn check_positions(used: usize, prefix: usize, limit: usize, key: &str) -> Result<()> {
    if used + prefix <= limit {
        return Ok(());
    }
    let found = if prefix > 0 {
        format!(
            "{used} tokens after a prefix of {prefix} virtual tokens ({} positions)",
            used + prefix
        )
    } else {
        format!("{used} positions")
    };
    Err(out_of_range(
        "input_ids",
        found,
        format!("the model has {limit} positions (`{key}` in config.json)"),
        "truncate the input (e.g. a smaller max_length / max_new_tokens) or use a model with \
         more positions",
    ))
}

/// `[batch, channels, height, width]` of the `pixel_values` an image model with `channels`
/// input channels reads: present, a non-empty batch of non-empty images, the channel count
/// the model was built for.
pub(crate) fn pixel_dims(pixels: Option<&Tensor<4>>, channels: usize) -> Result<[usize; 4]> {
    let Some(pixels) = pixels else {
        return Err(out_of_range(
            "pixel_values",
            "no pixel_values".into(),
            "an image model reads float32 pixel_values [batch, channels, height, width]".into(),
            "pass images (ModelInputs::images, or a `pixel_values` tensor in the inputs file)",
        ));
    };
    let [b, c, h, w] = pixels.dims();
    if b == 0 || h == 0 || w == 0 {
        return Err(out_of_range(
            "pixel_values",
            format!("shape [{b}, {c}, {h}, {w}]"),
            "at least one image of at least one pixel".into(),
            "pass a non-empty batch",
        ));
    }
    if c != channels {
        return Err(out_of_range(
            "pixel_values",
            format!("{c} channels (shape [{b}, {c}, {h}, {w}])"),
            format!("this model reads {channels} channels"),
            "convert the images (e.g. grayscale to RGB) before the forward",
        ));
    }
    Ok([b, c, h, w])
}

/// `[height, width]` of the images equals `expected`, the `image_size` of config.json (the
/// position table covers that many patches; transformers refuses other sizes too unless it
/// interpolates the positions, which is not implemented here).
pub(crate) fn image_size(found: [usize; 2], expected: [usize; 2]) -> Result<()> {
    if found == expected {
        return Ok(());
    }
    Err(out_of_range(
        "pixel_values",
        format!("images of {}x{} (height x width)", found[0], found[1]),
        format!(
            "this model reads {}x{} images (`image_size` in config.json)",
            expected[0], expected[1]
        ),
        "resize the images as the model's image processor does",
    ))
}
