//! The task-arithmetic rules of PEFT's `peft/utils/merge_utils.py`, on flat tensors of equal
//! size: weighted sum, magnitude pruning, random (DARE) pruning, TIES sign election and
//! disjoint merge.

use peft_core::MajoritySignMethod;

use super::rng::SplitMix64;

/// How the pruned tensors are merged, and how they are pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rule {
    /// `task_arithmetic`: weighted sum.
    TaskArithmetic,
    /// `magnitude_prune`: keep the largest values, weighted sum.
    MagnitudePrune,
    /// `ties`: magnitude pruning, sign election, disjoint mean.
    Ties,
    /// `dare_linear`: random pruning rescaled by `1/density`, weighted sum.
    DareLinear,
    /// `dare_ties`: random pruning rescaled, sign election, disjoint mean.
    DareTies,
}

/// What a rule needs besides the tensors and weights.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RuleParams {
    /// Fraction kept by pruning (unused by `TaskArithmetic`).
    pub density: f64,
    /// TIES sign election.
    pub sign_method: MajoritySignMethod,
}

/// Merge `tensors` (equal lengths) with `weights` under `rule`. `rngs` gives one stream per
/// tensor for the DARE rules.
pub(crate) fn merge(
    rule: Rule,
    tensors: &[&[f64]],
    weights: &[f64],
    params: RuleParams,
    rngs: &mut dyn FnMut(usize) -> SplitMix64,
) -> Vec<f64> {
    let len = tensors.first().map_or(0, |t| t.len());
    debug_assert!(tensors.iter().all(|t| t.len() == len));
    let pruned: Vec<Vec<f64>> = match rule {
        Rule::TaskArithmetic => tensors.iter().map(|t| t.to_vec()).collect(),
        Rule::MagnitudePrune | Rule::Ties => tensors
            .iter()
            .map(|t| magnitude_prune(t, params.density))
            .collect(),
        Rule::DareLinear | Rule::DareTies => tensors
            .iter()
            .enumerate()
            .map(|(i, t)| random_prune(t, params.density, &mut rngs(i)))
            .collect(),
    };
    match rule {
        Rule::TaskArithmetic | Rule::MagnitudePrune | Rule::DareLinear => {
            weighted_sum(&pruned, weights, len)
        }
        Rule::Ties | Rule::DareTies => ties_merge(&pruned, weights, params.sign_method, len),
    }
}

fn weighted_sum(tensors: &[Vec<f64>], weights: &[f64], len: usize) -> Vec<f64> {
    let mut out = vec![0.0; len];
    for (t, w) in tensors.iter().zip(weights) {
        for (o, v) in out.iter_mut().zip(t) {
            *o += w * v;
        }
    }
    out
}

/// PEFT's `prune`: a density of 1 or more keeps everything (PEFT warns).
fn keeps_all(density: f64) -> bool {
    density >= 1.0
}

/// PEFT's `magnitude_based_pruning`: keep the `int(density * numel)` entries of largest
/// magnitude, zero the others. Among equal magnitudes the earlier entry is kept (torch.topk's
/// choice among ties is unspecified).
pub(crate) fn magnitude_prune(tensor: &[f64], density: f64) -> Vec<f64> {
    if keeps_all(density) {
        return tensor.to_vec();
    }
    // Python's int(density * numel): the same double product, truncated.
    let k = (density * tensor.len() as f64) as usize;
    let mut out = vec![0.0; tensor.len()];
    if k == 0 {
        return out;
    }
    if k >= tensor.len() {
        return tensor.to_vec();
    }
    // The k-th largest magnitude is the threshold: everything above it is kept, and as many
    // entries equal to it as are still needed, earliest first.
    let mut magnitudes: Vec<f64> = tensor.iter().map(|v| v.abs()).collect();
    let (_, threshold, _) = magnitudes.select_nth_unstable_by(tensor.len() - k, f64::total_cmp);
    let threshold = *threshold;
    let mut ties_left = k - tensor.iter().filter(|v| v.abs() > threshold).count();
    for (o, &v) in out.iter_mut().zip(tensor) {
        if v.abs() > threshold {
            *o = v;
        } else if v.abs() == threshold && ties_left > 0 {
            *o = v;
            ties_left -= 1;
        }
    }
    out
}

/// PEFT's `random_pruning(rescale=True)`: keep each entry with probability `density`
/// (Bernoulli mask), divide the kept ones by `density`.
pub(crate) fn random_prune(tensor: &[f64], density: f64, rng: &mut SplitMix64) -> Vec<f64> {
    if keeps_all(density) {
        return tensor.to_vec();
    }
    tensor
        .iter()
        .map(|&v| {
            if rng.next_f64() < density {
                v / density
            } else {
                0.0
            }
        })
        .collect()
}

/// PEFT's `calculate_majority_sign_mask` + `disjoint_merge`: per entry, the elected sign is that
/// of the sum of the (unweighted, pruned) values (`total`) or of the sum of their signs
/// (`frequency`), ties going to `+`; the result is the mean of the weighted values that carry
/// that sign (zeros carry none), or 0 when none does.
fn ties_merge(
    pruned: &[Vec<f64>],
    weights: &[f64],
    method: MajoritySignMethod,
    len: usize,
) -> Vec<f64> {
    let sign = |v: f64| {
        if v > 0.0 {
            1.0
        } else if v < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    (0..len)
        .map(|j| {
            let magnitude: f64 = match method {
                MajoritySignMethod::Total => pruned.iter().map(|t| t[j]).sum(),
                MajoritySignMethod::Frequency => pruned.iter().map(|t| sign(t[j])).sum(),
            };
            let majority = if magnitude >= 0.0 { 1.0 } else { -1.0 };
            let mut sum = 0.0;
            let mut count = 0usize;
            for (t, w) in pruned.iter().zip(weights) {
                if sign(t[j]) == majority {
                    sum += w * t[j];
                    count += 1;
                }
            }
            sum / count.max(1) as f64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(density: f64) -> RuleParams {
        RuleParams {
            density,
            sign_method: MajoritySignMethod::Total,
        }
    }

    fn no_rng(_: usize) -> SplitMix64 {
        unreachable!("deterministic rule")
    }

    #[test]
    fn magnitude_prune_keeps_int_density_times_numel_largest() {
        let t = [0.1, -0.9, 0.5, -0.2, 0.8];
        // int(0.5 * 5) = 2: -0.9 and 0.8.
        assert_eq!(magnitude_prune(&t, 0.5), vec![0.0, -0.9, 0.0, 0.0, 0.8]);
        assert_eq!(magnitude_prune(&t, 0.1), vec![0.0; 5]);
        assert_eq!(magnitude_prune(&t, 1.0), t.to_vec());
        assert_eq!(magnitude_prune(&t, 0.99), vec![0.0, -0.9, 0.5, -0.2, 0.8]);
        // Equal magnitudes at the threshold: the earliest are kept, exactly k in all.
        let tied = [0.5, -0.5, 0.5, 0.1];
        assert_eq!(magnitude_prune(&tied, 0.5), vec![0.5, -0.5, 0.0, 0.0]);
    }

    #[test]
    fn ties_elects_sign_and_averages_agreeing_values() {
        let a = [1.0, -2.0, 0.5, 0.0];
        let b = [-3.0, -1.0, 0.5, 0.0];
        let out = merge(Rule::Ties, &[&a, &b], &[1.0, 2.0], params(1.0), &mut no_rng);
        // entry 0: sum -2 -> '-': only b (-3 * 2) counts -> -6; entry 1: both '-':
        // (-2*1 + -1*2)/2 = -2; entry 2: (0.5 + 1.0)/2; entry 3: nothing carries a sign -> 0.
        assert_eq!(out, vec![-6.0, -2.0, 0.75, 0.0]);
        let freq = merge(
            Rule::Ties,
            &[&a, &b, &[1.0, 1.0, 1.0, 1.0]],
            &[1.0, 1.0, 1.0],
            RuleParams {
                density: 1.0,
                sign_method: MajoritySignMethod::Frequency,
            },
            &mut no_rng,
        );
        // entry 0: signs +,-,+ -> '+' by frequency although the total is negative.
        assert_eq!(freq[0], 1.0);
    }

    #[test]
    fn dare_rescales_kept_values_exactly_and_is_seeded() {
        let t: Vec<f64> = (0..1000).map(|i| (i as f64 * 0.37).sin()).collect();
        let mut r1 = SplitMix64::for_tensor(3, "m", 0, 0);
        let mut r2 = SplitMix64::for_tensor(3, "m", 0, 0);
        let p1 = random_prune(&t, 0.3, &mut r1);
        assert_eq!(p1, random_prune(&t, 0.3, &mut r2));
        for (p, v) in p1.iter().zip(&t) {
            assert!(*p == 0.0 || *p == v / 0.3);
        }
    }
}
