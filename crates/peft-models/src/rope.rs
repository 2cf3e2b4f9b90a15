//! Rotary position embeddings as transformers computes them (`modeling_rope_utils.py`): the
//! RoPE types of `rope_parameters` / `rope_scaling` (`default`, `linear`, `llama3`, `longrope`),
//! partial rotary (`partial_rotary_factor`: only the first dimensions of each head rotate), the
//! `attention_factor` that scales `cos`/`sin`, and rotate-half application. Shared by the rotary
//! decoder families.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use burn::tensor::{Device, Tensor, TensorData};
use serde_json::Value;

use crate::cache::KvCache;
use crate::config_checks::{invalid, positive_float, unsupported};
use crate::error::{ModelError, Result};
use crate::packing::PackedPositions;

/// How the inverse frequencies are built (`rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`default`).
    None,
    /// Positions divided by `factor` (`linear`).
    Linear {
        /// Factor.
        factor: f64,
    },
    /// Llama 3 frequency-dependent scaling (`llama3`).
    Llama3 {
        /// Factor.
        factor: f64,
        /// Low frequency factor.
        low_freq_factor: f64,
        /// High frequency factor.
        high_freq_factor: f64,
        /// Context length of the original model.
        original_max_position_embeddings: f64,
    },
    /// Phi-3's LongRoPE (`longrope`): per-frequency factors, the long ones for a forward whose
    /// last position is beyond `original_max_position_embeddings`, and `cos`/`sin` scaled by
    /// `attention_factor`.
    LongRope {
        /// Factors of the short context (one per rotary frequency).
        short_factor: Vec<f64>,
        /// Factors of the long context.
        long_factor: Vec<f64>,
        /// Context length of the pretrained model.
        original_max_position_embeddings: usize,
        /// Scale of `cos`/`sin`.
        attention_factor: f64,
    },
}

/// The rotary embedding of a model (or of one layer type): base, scaling and how many
/// dimensions of each head rotate.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// The base (`rope_theta`).
    pub theta: f64,
    /// The scaling.
    pub scaling: RopeScaling,
    /// Dimensions of each head that rotate (`head_dim * partial_rotary_factor`, even).
    pub rotary_dim: usize,
}

/// What [`RopeConfig::parse`] reads a RoPE block with, besides the block itself.
pub struct RopeContext<'a> {
    /// The config file, for errors.
    pub file: &'a Path,
    /// The key the block sits under (`rope_parameters`, `rope_scaling`), for errors.
    pub key: &'a str,
    /// The base when the block names none (`rope_theta` at the top level, or the family's).
    pub theta: f64,
    /// Head size.
    pub head_dim: usize,
    /// `partial_rotary_factor` when the block names none.
    pub partial_rotary_factor: f64,
    /// `max_position_embeddings` (LongRoPE's default factor is its ratio to the original).
    pub max_position_embeddings: Option<usize>,
}

impl RopeConfig {
    /// Parse a RoPE block (transformers 5's `rope_parameters`, or 4.x's `rope_scaling`;
    /// `None` or `null` for plain RoPE); an unknown `rope_type` or a missing field names the key.
    pub fn parse(block: Option<&Value>, ctx: &RopeContext<'_>) -> Result<Self> {
        let block = block.filter(|b| !b.is_null());
        let theta = block
            .and_then(|b| b.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(ctx.theta);
        positive_float(ctx.file, &format!("{}.rope_theta", ctx.key), theta)?;
        let partial = block
            .and_then(|b| b.get("partial_rotary_factor"))
            .and_then(Value::as_f64)
            .unwrap_or(ctx.partial_rotary_factor);
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(invalid(
                ctx.file,
                "partial_rotary_factor",
                partial,
                "must be in (0, 1]",
            ));
        }
        // transformers: `int(head_dim * partial_rotary_factor)`.
        let rotary_dim = (ctx.head_dim as f64 * partial) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(invalid(
                ctx.file,
                "partial_rotary_factor",
                partial,
                &format!(
                    "rotates {rotary_dim} of the {} dimensions of a head; rotary embeddings need \
                     an even, non-zero number",
                    ctx.head_dim
                ),
            ));
        }
        let kind = block
            .and_then(|b| b.get("rope_type").or_else(|| b.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let key = |field: &str| format!("{}.{field}", ctx.key);
        let num = |field: &str| -> Result<f64> {
            block
                .and_then(|b| b.get(field))
                .and_then(Value::as_f64)
                .ok_or_else(|| ModelError::InvalidConfig {
                    file: ctx.file.to_path_buf(),
                    reason: format!("rope type `{kind}` needs a numeric `{}`", key(field)),
                })
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => {
                let factor = num("factor")?;
                positive_float(ctx.file, &key("factor"), factor)?;
                RopeScaling::Linear { factor }
            }
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            },
            "longrope" => long_rope(block, ctx, rotary_dim, &num)?,
            other => {
                return Err(unsupported(
                    ctx.file,
                    &format!("{}.rope_type", ctx.key),
                    format!("\"{other}\""),
                    "implemented: default, linear, llama3, longrope",
                ));
            }
        };
        Ok(Self {
            theta,
            scaling,
            rotary_dim,
        })
    }
}

/// `_compute_longrope_parameters` of transformers' `modeling_rope_utils.py`.
fn long_rope(
    block: Option<&Value>,
    ctx: &RopeContext<'_>,
    rotary_dim: usize,
    num: &dyn Fn(&str) -> Result<f64>,
) -> Result<RopeScaling> {
    let factors = |field: &str| -> Result<Vec<f64>> {
        let list = block
            .and_then(|b| b.get(field))
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>());
        match list {
            Some(v) if v.len() == rotary_dim / 2 && v.iter().all(|f| f.is_finite() && *f > 0.0) => {
                Ok(v)
            }
            _ => Err(invalid(
                ctx.file,
                &format!("{}.{field}", ctx.key),
                block
                    .and_then(|b| b.get(field))
                    .map_or("nothing".into(), Value::to_string),
                &format!(
                    "longrope needs {} positive factors (one per rotary frequency)",
                    rotary_dim / 2
                ),
            )),
        }
    };
    let original = num("original_max_position_embeddings")?;
    if !(original >= 1.0 && original.fract() == 0.0) {
        return Err(invalid(
            ctx.file,
            &format!("{}.original_max_position_embeddings", ctx.key),
            original,
            "must be a positive integer",
        ));
    }
    // "Phi3 ... use the ratio between these two values to compute the default attention
    // scaling factor, instead of using `factor`."
    let factor = match block.and_then(|b| b.get("factor")).and_then(Value::as_f64) {
        Some(f) => f,
        None => ctx.max_position_embeddings.unwrap_or(original as usize) as f64 / original,
    };
    let attention_factor = match block
        .and_then(|b| b.get("attention_factor"))
        .and_then(Value::as_f64)
    {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / original.ln()).sqrt(),
    };
    positive_float(
        ctx.file,
        &format!("{}.attention_factor", ctx.key),
        attention_factor,
    )?;
    Ok(RopeScaling::LongRope {
        short_factor: factors("short_factor")?,
        long_factor: factors("long_factor")?,
        original_max_position_embeddings: original as usize,
        attention_factor,
    })
}

/// Inverse frequencies `[rotary_dim / 2]` of `theta` with a plain, linear or Llama 3 scaling,
/// as transformers computes them (LongRoPE's two sets come from [`Rotary::new`]).
pub fn inv_freq(rotary_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f64> {
    let base: Vec<f64> = (0..rotary_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / rotary_dim as f64))
        .collect();
    match scaling {
        RopeScaling::None | RopeScaling::LongRope { .. } => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// A model's rotary embedding, ready to make the tables of a forward.
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Vec<f64>,
    /// LongRoPE's long-context frequencies and the last position the short ones serve.
    long: Option<(Vec<f64>, usize)>,
    /// `attention_factor` (1 but for LongRoPE).
    scale: f64,
    rotary_dim: usize,
    short_tables: RopeCache,
    long_tables: RopeCache,
}

impl Rotary {
    /// The embedding of `config`.
    pub fn new(config: &RopeConfig) -> Self {
        let frequencies = |factors: &[f64]| -> Vec<f64> {
            inv_freq(config.rotary_dim, config.theta, &RopeScaling::None)
                .iter()
                .zip(factors)
                .map(|(f, factor)| f / factor)
                .collect()
        };
        let (inv_freq, long, scale) = match &config.scaling {
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => (
                frequencies(short_factor),
                Some((frequencies(long_factor), *original_max_position_embeddings)),
                *attention_factor,
            ),
            other => (inv_freq(config.rotary_dim, config.theta, other), None, 1.0),
        };
        Self {
            inv_freq,
            long,
            scale,
            rotary_dim: config.rotary_dim,
            short_tables: RopeCache::default(),
            long_tables: RopeCache::default(),
        }
    }

    /// The tables for the next `seq` tokens of `batch` rows after what `cache` holds: one
    /// table shared by every row, or one per row when the cache shifts rows in position or
    /// the rows are packed (`packed`: each sequence's positions start anew).
    pub fn tables(
        &self,
        cache: Option<&KvCache>,
        packed: Option<&PackedPositions>,
        batch: usize,
        seq: usize,
        device: &Device,
    ) -> Rope {
        let empty = KvCache::default();
        let cache = cache.unwrap_or(&empty);
        let positions = match packed {
            Some(p) => p.query.clone(),
            None => cache.positions(batch, seq),
        };
        // LongRoPE: transformers' `longrope_frequency_update` picks the long factors when the
        // forward's last position (`max(position_ids) + 1`) passes the original context.
        let last = positions.iter().flatten().copied().max().unwrap_or(0) as usize + 1;
        let (freqs, tables) = match &self.long {
            Some((long, original)) if last > *original => (long, &self.long_tables),
            _ => (&self.inv_freq, &self.short_tables),
        };
        let d = self.rotary_dim;
        if packed.is_none() && !cache.has_row_shift() {
            // Every row at positions `len..len + seq`: a slice of the tables kept on the device.
            let (cos, sin) = tables.tables(freqs, self.scale, cache.len(), seq, device);
            return Rope {
                cos: cos.reshape([1, 1, seq, d]),
                sin: sin.reshape([1, 1, seq, d]),
                query_positions: positions,
                key_positions: None,
            };
        }
        let flat: Vec<i64> = positions.concat();
        let (cos, sin) = rope_tables(freqs, self.scale, &flat, device);
        let key_positions = match packed {
            Some(p) => p.keys.clone(),
            None => cache.key_positions(batch, cache.len() + seq),
        };
        Rope {
            cos: cos.reshape([batch, 1, seq, d]),
            sin: sin.reshape([batch, 1, seq, d]),
            query_positions: positions,
            key_positions: Some(key_positions),
        }
    }
}

/// The rotary tables of one forward, `[1 or batch, 1, seq, rotary_dim]`, and, when rows are
/// shifted in position, each row's query and key positions (for sliding windows).
pub struct Rope {
    cos: Tensor<4>,
    sin: Tensor<4>,
    /// Each row's query positions.
    pub query_positions: Vec<Vec<i64>>,
    /// Each row's key positions, when rows are shifted.
    pub key_positions: Option<Vec<Vec<i64>>>,
}

impl Rope {
    /// Rotate `x` `[b, heads, seq, head_dim]`: the first `rotary_dim` dimensions of each head,
    /// rotate-half (transformers' `apply_rotary_pos_emb`), the rest unchanged.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let d = x.dims()[3];
        let rd = self.cos.dims()[3];
        if rd == d {
            return apply_rope(x, &self.cos, &self.sin);
        }
        let rotated = apply_rope(x.clone().narrow(3, 0, rd), &self.cos, &self.sin);
        Tensor::cat(vec![rotated, x.narrow(3, rd, d - rd)], 3)
    }
}

/// Rotate-half RoPE as transformers implements it: `x * cos + rotate_half(x) * sin`, with
/// `cos`/`sin` broadcastable to `x` (`[1 or b, 1, s, d]`: the frequency table concatenated
/// twice, per position). One table for the whole batch (`[1, 1, s, d]`) or one per row
/// (`[b, 1, s, d]`: a left-padded batch, whose rows start at different positions) is one fused
/// op on flex; other broadcasts are composed.
pub fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [rows, heads, s, d] = cos.dims();
    if heads == 1 && (rows == 1 || rows == x.dims()[0]) {
        let table = |t: &Tensor<4>| t.clone().reshape([rows * s, d]);
        return peft_ops::rope(x, table(cos), table(sin));
    }
    peft_ops::reference::rope_broadcast(x, cos.clone(), sin.clone())
}

/// RoPE `cos`/`sin` tables `[len, rotary_dim]` for `positions`, from `inv_freq`
/// `[rotary_dim/2]`, both multiplied by `scale` (LongRoPE's `attention_factor`, else 1).
pub fn rope_tables(
    inv_freq: &[f64],
    scale: f64,
    positions: &[i64],
    device: &Device,
) -> (Tensor<2>, Tensor<2>) {
    let half = inv_freq.len();
    let scale = scale as f32;
    let mut cos = Vec::with_capacity(positions.len() * half * 2);
    let mut sin = Vec::with_capacity(positions.len() * half * 2);
    for &p in positions {
        // float32 like transformers: position * inv_freq, then cos/sin, then the scale.
        let row: Vec<f32> = inv_freq.iter().map(|f| (p as f32) * (*f as f32)).collect();
        for _ in 0..2 {
            cos.extend(row.iter().map(|a| a.cos() * scale));
            sin.extend(row.iter().map(|a| a.sin() * scale));
        }
    }
    let shape = [positions.len(), half * 2];
    (
        Tensor::from_data(TensorData::new(cos, shape), device),
        Tensor::from_data(TensorData::new(sin, shape), device),
    )
}

/// RoPE tables kept on the device: computed once (as [`rope_tables`] does, so the values are the
/// same) for a length that doubles as longer inputs come, and sliced per forward. A forward
/// then uploads nothing and computes nothing on the host.
///
/// Clones share the tables (a model's `valid()` copy and data-parallel replicas reuse them);
/// they are kept per device and autodiff context, so a model moved to another device gets its
/// own.
#[derive(Clone, Default)]
pub struct RopeCache {
    tables: Arc<Mutex<Vec<RopeTables>>>,
}

struct RopeTables {
    device: Device,
    autodiff: bool,
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl fmt::Debug for RopeCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RopeCache")
    }
}

impl RopeCache {
    /// `cos`/`sin` `[len, rotary_dim]` for positions `offset..offset + len` on `device`.
    pub fn tables(
        &self,
        inv_freq: &[f64],
        scale: f64,
        offset: usize,
        len: usize,
        device: &Device,
    ) -> (Tensor<2>, Tensor<2>) {
        let end = offset + len;
        let autodiff = device.is_autodiff();
        let mut cached = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = cached
            .iter()
            .position(|t| t.autodiff == autodiff && &t.device == device);
        let slot = match slot {
            Some(i) if cached[i].cos.dims()[0] >= end => i,
            found => {
                let rows = end.next_power_of_two().max(64);
                let positions: Vec<i64> = (0..rows as i64).collect();
                let (cos, sin) = rope_tables(inv_freq, scale, &positions, device);
                let tables = RopeTables {
                    device: device.clone(),
                    autodiff,
                    cos,
                    sin,
                };
                match found {
                    Some(i) => {
                        cached[i] = tables;
                        i
                    }
                    None => {
                        cached.push(tables);
                        cached.len() - 1
                    }
                }
            }
        };
        let t = &cached[slot];
        let d = t.cos.dims()[1];
        (
            t.cos.clone().slice([offset..end, 0..d]),
            t.sin.clone().slice([offset..end, 0..d]),
        )
    }
}
