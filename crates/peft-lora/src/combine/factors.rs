//! The combination at one module, on LoRA factors in PEFT's file layout (`A` is `[r, in]`,
//! `B` is `[out, r]`, the delta is `scaling * B @ A`): PEFT's `add_weighted_adapter` loop body
//! (`peft/tuners/lora/model.py`) for `cat`, the factor-wise types and the SVD types.

use peft_core::{CombinationType, CombineOptions, PeftError, Result};

use super::matrix::Matrix;
use super::merge_rules::{Rule, RuleParams, merge};
use super::rng::SplitMix64;
use super::svd::{Svd, low_rank_svd, thin_svd, truncate};

/// One input adapter at one module.
#[derive(Debug, Clone)]
pub struct LoraFactors {
    /// The adapter's name (for errors).
    pub name: String,
    /// Its weight in the combination.
    pub weight: f64,
    /// Its scaling at this module (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA).
    pub scaling: f64,
    /// `lora_A`, `[r, in]` (embedding: `lora_embedding_A`, `[r, vocab]`).
    pub a: Matrix,
    /// `lora_B`, `[out, r]` (embedding: `lora_embedding_B`, `[dim, r]`).
    pub b: Matrix,
}

impl LoraFactors {
    /// The rank.
    pub fn rank(&self) -> usize {
        self.a.rows()
    }

    /// `scaling * B @ A`, `[out, in]`: PEFT's `get_delta_weight` in the file's orientation.
    pub fn delta(&self) -> Matrix {
        self.b.matmul(&self.a).scaled(self.scaling)
    }
}

/// Where DARE's masks come from: the seed and the module they are drawn for.
#[derive(Debug, Clone, Copy)]
pub struct MaskKey<'a> {
    /// [`CombineOptions::seed`].
    pub seed: u64,
    /// The module path (each module gets its own masks).
    pub module: &'a str,
}

/// Tensor tags of the DARE streams.
const TAG_A: u64 = 0;
const TAG_B: u64 = 1;
const TAG_DELTA: u64 = 2;

fn rule_of(kind: CombinationType) -> Rule {
    use CombinationType as T;
    match kind {
        T::Linear | T::Svd | T::Cat => Rule::TaskArithmetic,
        T::Ties | T::TiesSvd => Rule::Ties,
        T::DareLinear | T::DareLinearSvd => Rule::DareLinear,
        T::DareTies | T::DareTiesSvd => Rule::DareTies,
        T::MagnitudePrune | T::MagnitudePruneSvd => Rule::MagnitudePrune,
    }
}

fn params(options: &CombineOptions) -> RuleParams {
    RuleParams {
        // `validate` makes every pruning type carry a density; the others do not read it.
        density: options.density.unwrap_or(1.0),
        sign_method: options.majority_sign_method,
    }
}

/// Combine `inputs` (the adapters attached to this module, in input order) into factors
/// `(A [rank, in], B [out, rank])` of the new adapter, whose own scaling then applies on top.
///
/// `rank` is the new adapter's rank (see [`combined_rank`](super::combined_rank)); results of
/// a lower rank at this module are zero-padded to it.
///
/// ```
/// use peft_core::{CombinationType, CombineOptions};
/// use peft_lora::combine::{LoraFactors, Matrix, MaskKey, combine_factors};
/// let f = |name: &str, w: f64, a: &[f64], b: &[f64]| LoraFactors {
///     name: name.into(), weight: w, scaling: 2.0,
///     a: Matrix::new(1, 2, a.to_vec()), b: Matrix::new(2, 1, b.to_vec()),
/// };
/// let inputs = [f("x", 0.5, &[1.0, 0.0], &[1.0, 1.0]), f("y", 1.0, &[0.0, 1.0], &[1.0, -1.0])];
/// let key = MaskKey { seed: 0, module: "proj" };
/// let (a, b) = combine_factors(&inputs, 2, &CombineOptions::new(CombinationType::Cat), key).unwrap();
/// // cat is exact: B A = 0.5 * 2 * x + 1.0 * 2 * y
/// let want = inputs[0].delta().scaled(0.5);
/// let want = Matrix::new(2, 2, want.values().iter().zip(inputs[1].delta().values()).map(|(p, q)| p + q).collect());
/// assert!(b.matmul(&a).max_abs_diff(&want) < 1e-12);
/// ```
pub fn combine_factors(
    inputs: &[LoraFactors],
    rank: usize,
    options: &CombineOptions,
    key: MaskKey<'_>,
) -> Result<(Matrix, Matrix)> {
    let kind = options.combination_type;
    let (a, b) = if kind == CombinationType::Cat {
        cat(inputs)
    } else if kind.uses_svd() {
        svd_combination(inputs, rank, options, key)?
    } else {
        factor_wise(inputs, options, key)?
    };
    if a.rows() > rank {
        return Err(PeftError::InvalidState(format!(
            "`{}`: the combination has rank {} at this module, above the new adapter's rank {rank}",
            key.module,
            a.rows()
        )));
    }
    let b = b.pad_cols(rank);
    Ok((a.pad_rows(rank), b))
}

/// `cat`: `A = [w_1 s_1 A_1; ...]`, `B = [B_1, ...]`, so `B A = sum w_i s_i B_i A_i` exactly.
fn cat(inputs: &[LoraFactors]) -> (Matrix, Matrix) {
    let a: Vec<Matrix> = inputs
        .iter()
        .map(|f| f.a.scaled(f.weight * f.scaling))
        .collect();
    let b: Vec<Matrix> = inputs.iter().map(|f| f.b.clone()).collect();
    (Matrix::vstack(&a), Matrix::hstack(&b))
}

/// `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: the rule applied to the `A`s
/// and to the `B`s separately, with weight `sqrt(|w s|)` on each side and the sign of `w s` on
/// `A` (PEFT's `_generalized_task_arithmetic_weighted_adapter`).
fn factor_wise(
    inputs: &[LoraFactors],
    options: &CombineOptions,
    key: MaskKey<'_>,
) -> Result<(Matrix, Matrix)> {
    let first = &inputs[0];
    if let Some(other) = inputs.iter().find(|f| f.rank() != first.rank()) {
        return Err(PeftError::IncompatibleAdapters {
            adapters: vec![first.name.clone(), other.name.clone()],
            field: "r".into(),
            reason: format!(
                "at `{}` their ranks differ ({} vs {}, through rank_pattern), and `{}` combines \
                 the factors element-wise; use `cat`, `svd` or an `*_svd` type",
                key.module,
                first.rank(),
                other.rank(),
                options.combination_type
            ),
        });
    }
    let mut weights_a = Vec::with_capacity(inputs.len());
    let mut weights_b = Vec::with_capacity(inputs.len());
    for f in inputs {
        let ws = f.weight * f.scaling;
        let sign = if ws >= 0.0 { 1.0 } else { -1.0 };
        weights_a.push(ws.abs().sqrt() * sign);
        weights_b.push(ws.abs().sqrt());
    }
    let rule = rule_of(options.combination_type);
    let run = |tag: u64, tensors: Vec<&[f64]>, weights: &[f64]| {
        let mut rngs = |i: usize| SplitMix64::for_tensor(key.seed, key.module, i, tag);
        merge(rule, &tensors, weights, params(options), &mut rngs)
    };
    let a = run(
        TAG_A,
        inputs.iter().map(|f| f.a.values()).collect(),
        &weights_a,
    );
    let b = run(
        TAG_B,
        inputs.iter().map(|f| f.b.values()).collect(),
        &weights_b,
    );
    Ok((
        Matrix::new(first.a.rows(), first.a.cols(), a),
        Matrix::new(first.b.rows(), first.b.cols(), b),
    ))
}

/// `svd` and `*_svd`: the rule applied to the full deltas `s_i B_i A_i` with weights `w_i`, then
/// a truncated SVD (PEFT's `_svd_generalized_task_arithmetic_weighted_adapter`). Plain `svd`
/// never forms the dense delta: the weighted sum of low-rank products is itself a product of
/// thin factors, whose SVD is exact and cheap.
fn svd_combination(
    inputs: &[LoraFactors],
    rank: usize,
    options: &CombineOptions,
    key: MaskKey<'_>,
) -> Result<(Matrix, Matrix)> {
    let svd = if options.combination_type == CombinationType::Svd {
        let p: Vec<Matrix> = inputs
            .iter()
            .map(|f| f.b.scaled(f.weight * f.scaling))
            .collect();
        let q: Vec<Matrix> = inputs.iter().map(|f| f.a.clone()).collect();
        low_rank_svd(&Matrix::hstack(&p), &Matrix::vstack(&q))
    } else {
        let deltas: Vec<Matrix> = inputs.iter().map(LoraFactors::delta).collect();
        let weights: Vec<f64> = inputs.iter().map(|f| f.weight).collect();
        let mut rngs = |i: usize| SplitMix64::for_tensor(key.seed, key.module, i, TAG_DELTA);
        let merged = merge(
            rule_of(options.combination_type),
            &deltas.iter().map(Matrix::values).collect::<Vec<_>>(),
            &weights,
            params(options),
            &mut rngs,
        );
        let (rows, cols) = (deltas[0].rows(), deltas[0].cols());
        thin_svd(&Matrix::new(rows, cols, merged))
    };
    let svd: Svd = svd.map_err(|reason| {
        PeftError::InvalidState(format!(
            "`{}`: the SVD of the combined delta failed: {reason}",
            key.module
        ))
    })?;
    Ok(truncate(&svd, rank, options.svd_clamp))
}
