//! Text generation for causal LMs: KV cache, greedy or temperature / top-k / top-p sampling
//! with a seed, stop on EOS or after `max_new_tokens`.

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use peft_core::nn::{ForwardContext, IdBounds};

use crate::auto::HfModel;
use crate::cache::KvCache;
use crate::error::{ModelError, Result};

/// How to pick tokens.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Tokens to add at most.
    pub max_new_tokens: usize,
    /// `0` = greedy; otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p`.
    pub top_p: Option<f32>,
    /// Sampling seed.
    pub seed: u64,
    /// Stop when one of these is produced.
    pub eos_token_ids: Vec<i64>,
    /// Reuse keys/values of earlier positions (the fast path); `false` recomputes everything,
    /// which exists to check the cache.
    pub use_cache: bool,
    /// The id that left-pads shorter prompts of a batch (and follows a finished row).
    pub pad_token_id: i64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            eos_token_ids: Vec::new(),
            use_cache: true,
            pad_token_id: 0,
        }
    }
}

/// The end-of-sequence ids of a `config.json` (`eos_token_id`: a number or a list).
pub fn eos_token_ids(config: &serde_json::Value) -> Vec<i64> {
    match config.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_i64()).collect(),
        _ => Vec::new(),
    }
}

/// Continue `prompt`; returns prompt + new tokens.
///
/// A prompt with ids outside the vocabulary, or a prompt plus `max_new_tokens` beyond a
/// learned position table (GPT-2's `n_positions`, a prefix included), is an error before any
/// token is generated.
pub fn generate(
    model: &HfModel,
    prompt: &[i64],
    config: &GenerationConfig,
    device: &Device,
) -> Result<Vec<i64>> {
    let mut rows = generate_batch(
        model,
        &[prompt.to_vec()],
        &ForwardContext::default(),
        config,
        device,
    )?;
    Ok(rows.remove(0))
}

/// Continue several prompts in one batch, each row with the adapter `ctx` names for it (a
/// mixed batch, [`PeftModel::adapter_rows`](peft_core::PeftModel::adapter_rows); or the
/// model's active adapters with the default context). Prompts are left-padded to the longest
/// with `config.pad_token_id`, and each row's positions start at 0 at its first real token, as
/// transformers' `generate` does with an attention mask, so every row continues exactly as it
/// would alone. A row stops at an end-of-sequence token (kept); returns each prompt + its new
/// tokens, without padding.
pub fn generate_batch(
    model: &HfModel,
    prompts: &[Vec<i64>],
    ctx: &ForwardContext,
    config: &GenerationConfig,
    device: &Device,
) -> Result<Vec<Vec<i64>>> {
    // Every decode step is a few hundred small parallel ops: run the loop on the pool.
    peft_ops::on_pool(|| generate_on_pool(model, prompts, ctx, config, device))
}

fn generate_on_pool(
    model: &HfModel,
    prompts: &[Vec<i64>],
    ctx: &ForwardContext,
    config: &GenerationConfig,
    device: &Device,
) -> Result<Vec<Vec<i64>>> {
    if !model.is_causal_lm() {
        return Err(ModelError::InvalidInput(
            "generation needs a causal LM".into(),
        ));
    }
    if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
        return Err(ModelError::InvalidInput("a prompt is empty".into()));
    }
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    check_room(model, width, config.max_new_tokens)?;
    let batch = prompts.len();
    let pads: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
    let mut tokens: Vec<Vec<i64>> = prompts
        .iter()
        .zip(&pads)
        .map(|(p, &pad)| {
            let mut row = vec![config.pad_token_id; pad];
            row.extend(p);
            row
        })
        .collect();
    let mut mask: Vec<Vec<i64>> = pads
        .iter()
        .map(|&pad| (0..width).map(|j| i64::from(j >= pad)).collect())
        .collect();
    let shift: Vec<i64> = pads.iter().map(|&p| -(p as i64)).collect();
    let any_pad = pads.iter().any(|&p| p > 0);
    let fresh_cache = || {
        let mut cache = KvCache::new(model.num_layers());
        cache.shift_rows(&shift);
        cache
    };
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut cache = fresh_cache();
    let mut next_input = tokens.clone();
    let mut done = vec![false; batch];
    for _ in 0..config.max_new_tokens {
        let mask_tensor = any_pad.then(|| int_rows(&mask, device));
        let total = tokens[0].len();
        if config.use_cache && !cache.is_empty() && model.arch().cache_is_stale(total - 1, total) {
            // The family's cached keys no longer fit this forward: start over with the whole
            // sequence, as transformers' generation drops the cache there.
            cache = fresh_cache();
            next_input = tokens.clone();
        }
        let rows = if config.use_cache {
            &next_input
        } else {
            &tokens
        };
        let (ids, step_ctx) = host_ids(rows, ctx, device);
        let mut scratch;
        let step_cache = if config.use_cache {
            &mut cache
        } else {
            scratch = fresh_cache();
            &mut scratch
        };
        let logits = model.forward_lm_last_with(ids, mask_tensor, Some(step_cache), &step_ctx)?;
        let v = logits.dims()[2];
        let last: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .map_err(|e| ModelError::InvalidInput(format!("{e:?}")))?;
        next_input = Vec::with_capacity(batch);
        for (row, logits) in last.chunks(v).enumerate() {
            let next = if done[row] {
                config.pad_token_id
            } else {
                pick(logits, config, &mut rng)
            };
            done[row] |= config.eos_token_ids.contains(&next);
            tokens[row].push(next);
            mask[row].push(1);
            next_input.push(vec![next]);
        }
        if done.iter().all(|d| *d) {
            break;
        }
    }
    Ok(tokens
        .into_iter()
        .zip(prompts)
        .zip(&pads)
        .map(|((row, prompt), &pad)| {
            let mut row = row[pad..].to_vec();
            // Keep the end-of-sequence token, drop the padding generated after it.
            if let Some(end) = row[prompt.len()..]
                .iter()
                .position(|t| config.eos_token_ids.contains(t))
            {
                row.truncate(prompt.len() + end + 1);
            }
            row
        })
        .collect())
}

/// A prompt of `width` tokens plus `new` tokens must fit a learned position table (a prefix
/// included): checked before anything is generated.
fn check_room(model: &HfModel, width: usize, new: usize) -> Result<()> {
    let Some((limit, key)) = model.position_limit() else {
        return Ok(());
    };
    let prefix = model.prefix_len();
    // `new` comes from the user (`--max-new-tokens`): near `usize::MAX` the sum wrapped in
    // release builds (and passed the check) and panicked in dev builds, so it is checked.
    let wanted = width.checked_add(new).and_then(|n| n.checked_add(prefix));
    if wanted.is_some_and(|wanted| wanted <= limit) {
        return Ok(());
    }
    let wanted = wanted.map_or_else(|| "more than usize::MAX".to_string(), |n| n.to_string());
    let room = limit.saturating_sub(prefix.saturating_add(width));
    Err(ModelError::InputOutOfRange {
        input: "max_new_tokens".into(),
        found: format!(
            "a prompt of {width} tokens{} plus {new} new tokens ({wanted} positions)",
            if prefix > 0 {
                format!(" after a prefix of {prefix} virtual tokens")
            } else {
                String::new()
            },
        ),
        limit: format!("the model has {limit} positions (`{key}` in config.json)"),
        fix: if room > 0 {
            format!("ask for at most {room} new tokens, or shorten the prompt")
        } else {
            "shorten the prompt".into()
        },
    })
}

/// Equal-length rows of ids (token ids, masks) as an int tensor `[rows, len]`.
pub fn int_rows(rows: &[Vec<i64>], device: &Device) -> Tensor<2, Int> {
    let b = rows.len();
    let s = rows.first().map_or(0, Vec::len);
    Tensor::from_data(TensorData::new(rows.concat(), [b, s]), device)
}

/// Choose the next token from `logits` per `config`.
pub fn pick(logits: &[f32], config: &GenerationConfig, rng: &mut StdRng) -> i64 {
    if config.temperature <= 0.0 {
        return argmax(logits) as i64;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = config.top_k {
        order.truncate(k.max(1));
    }
    let max = logits[order[0]];
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| (((logits[i] - max) / config.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = config.top_p {
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        order.truncate(keep);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut draw: f64 = rng.random();
    for (i, p) in probs.iter().enumerate() {
        if draw < *p {
            return order[i] as i64;
        }
        draw -= p;
    }
    order[order.len() - 1] as i64
}

/// The first index of the largest value (NaN never wins; 0 when nothing beats `-inf`).
///
/// Two passes, the maximum then its first position: the maximum over 16 independent lanes
/// vectorizes, where a fold that carries the index does not (a batch-32 SmolLM2 decode spent a
/// percent of its time here, serially between parallel ops).
fn argmax(v: &[f32]) -> usize {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = v.chunks_exact(16);
    for chunk in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if max == f32::NEG_INFINITY {
        return 0;
    }
    v.iter().position(|&x| x == max).unwrap_or(0)
}

/// Token-id rows known on the host as a tensor, and `ctx` with their bounds, so that the
/// forward need not read the ids back from a GPU to check them ([`IdBounds`]).
pub fn host_ids(
    rows: &[Vec<i64>],
    ctx: &ForwardContext,
    device: &Device,
) -> (Tensor<2, Int>, ForwardContext) {
    let ctx = match IdBounds::of(rows.iter().flatten().copied()) {
        Some(bounds) => ctx.clone().with_id_bounds(bounds, None),
        None => ctx.clone(),
    };
    (int_rows(rows, device), ctx)
}

#[cfg(test)]
mod tests {
    use super::argmax;

    #[test]
    fn argmax_is_the_first_largest_value() {
        let mut v: Vec<f32> = (0..100).map(|i| ((i * 37) % 23) as f32).collect();
        // 22 first occurs at 31 (within the 16-wide chunks) and again later.
        let want = v.iter().position(|&x| x == 22.0).unwrap();
        assert_eq!(argmax(&v), want);
        v[99] = 50.0; // in the remainder past the last full chunk
        assert_eq!(argmax(&v), 99);
        v[3] = f32::NAN;
        assert_eq!(argmax(&v), 99, "NaN never wins");
        assert_eq!(argmax(&[f32::NEG_INFINITY; 20]), 0);
        assert_eq!(argmax(&[f32::NAN, 1.0, 1.0]), 1);
        assert_eq!(argmax(&[]), 0);
    }
}
