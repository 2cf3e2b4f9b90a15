//! Text generation for causal LMs: KV cache, greedy or temperature / top-k / top-p sampling
//! with a seed, stop on EOS or after `max_new_tokens`.

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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
        }
    }
}

fn ids_tensor(ids: &[i64], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
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
    if !model.is_causal_lm() {
        return Err(ModelError::InvalidInput(
            "generation needs a causal LM".into(),
        ));
    }
    if prompt.is_empty() {
        return Err(ModelError::InvalidInput("the prompt is empty".into()));
    }
    if let Some((limit, key)) = model.position_limit() {
        let prefix = model.prefix_len();
        let wanted = prompt.len() + config.max_new_tokens + prefix;
        if wanted > limit {
            let room = limit.saturating_sub(prefix + prompt.len());
            return Err(ModelError::InputOutOfRange {
                input: "max_new_tokens".into(),
                found: format!(
                    "a prompt of {} tokens{} plus {} new tokens ({wanted} positions)",
                    prompt.len(),
                    if prefix > 0 {
                        format!(" after a prefix of {prefix} virtual tokens")
                    } else {
                        String::new()
                    },
                    config.max_new_tokens
                ),
                limit: format!("the model has {limit} positions (`{key}` in config.json)"),
                fix: if room > 0 {
                    format!("ask for at most {room} new tokens, or shorten the prompt")
                } else {
                    "shorten the prompt".into()
                },
            });
        }
    }
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut tokens = prompt.to_vec();
    let mut cache = KvCache::new(model.num_layers());
    let mut next_input = tokens.clone();
    for _ in 0..config.max_new_tokens {
        let logits = if config.use_cache {
            model.forward_lm(ids_tensor(&next_input, device), None, Some(&mut cache))
        } else {
            model.forward_lm(ids_tensor(&tokens, device), None, None)
        }?;
        let [_, s, v] = logits.dims();
        let last: Vec<f32> = logits
            .slice([0..1, s - 1..s, 0..v])
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .map_err(|e| ModelError::InvalidInput(format!("{e:?}")))?;
        let next = pick(&last, config, &mut rng);
        tokens.push(next);
        next_input = vec![next];
        if config.eos_token_ids.contains(&next) {
            break;
        }
    }
    Ok(tokens)
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

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv { (i, x) } else { (bi, bv) }
        })
        .0
}
