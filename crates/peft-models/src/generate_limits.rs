//! How many tokens a generation may ask for: one rule for `burn-peft generate` and
//! `burn-peft serve`. A prompt, a prefix-tuning prefix and the new tokens must fit the
//! model's positions (a learned position table, or `max_position_embeddings`); a model that
//! states no limit still holds a cache that grows with every token, so it gets at most
//! [`MAX_NEW_TOKENS_WITHOUT_LIMIT`] per request.

use serde_json::Value;

use crate::HfModel;

/// New tokens per request for a model that states no context limit.
pub const MAX_NEW_TOKENS_WITHOUT_LIMIT: usize = 1 << 16;

/// The positions `model` allows and the `config.json` key that says so: its learned position
/// table (BERT's `max_position_embeddings`, GPT-2's `n_positions`), else the config's
/// `max_position_embeddings` (RoPE models); `None` when neither is stated.
pub fn context_limit(model: &HfModel, config: &Value) -> Option<(usize, &'static str)> {
    model.position_limit().or_else(|| {
        config
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .map(|n| (n, "max_position_embeddings"))
    })
}

/// Whether `new` tokens after a prompt of `prompt` tokens (and `prefix` virtual tokens) fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// They fit.
    Fits,
    /// The prompt (after the prefix) leaves no position for a new token.
    PromptTooLong,
    /// At most `room` new tokens fit.
    TooManyNew {
        /// The new tokens that fit.
        room: usize,
    },
    /// The model states no limit and `new` is over [`MAX_NEW_TOKENS_WITHOUT_LIMIT`].
    OverDefaultCap,
}

/// The rule, with `limit` from [`context_limit`]. No sum is formed that could overflow
/// (`new` may come from a request).
///
/// ```
/// use peft_models::generate_limits::{Room, room_for};
///
/// assert_eq!(room_for(Some(64), 0, 2, 62), Room::Fits);
/// assert_eq!(room_for(Some(64), 0, 2, 300), Room::TooManyNew { room: 62 });
/// assert_eq!(room_for(Some(64), 10, 54, 1), Room::PromptTooLong);
/// assert_eq!(room_for(None, 0, 2, usize::MAX), Room::OverDefaultCap);
/// ```
pub fn room_for(limit: Option<usize>, prefix: usize, prompt: usize, new: usize) -> Room {
    let Some(limit) = limit else {
        return if new > MAX_NEW_TOKENS_WITHOUT_LIMIT {
            Room::OverDefaultCap
        } else {
            Room::Fits
        };
    };
    match limit
        .checked_sub(prefix)
        .and_then(|left| left.checked_sub(prompt))
    {
        None => Room::PromptTooLong,
        Some(0) if new > 0 => Room::PromptTooLong,
        Some(room) if new > room => Room::TooManyNew { room },
        Some(_) => Room::Fits,
    }
}
