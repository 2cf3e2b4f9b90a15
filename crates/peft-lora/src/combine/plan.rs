//! The config of the combined adapter and the checks before any math: PEFT's
//! `_check_add_weighted_adapter` and the `replace(...)` in `add_weighted_adapter`
//! (`peft/tuners/lora/model.py`).

use peft_core::{
    CombinationType, CombineInput, PeftError, Result, TargetModules, bundle, peft_type_of,
};

use crate::LoraConfig;

/// An input adapter with its LoRA config.
#[derive(Debug, Clone)]
pub(crate) struct Input {
    pub name: String,
    pub weight: f64,
    pub config: LoraConfig,
}

/// The LoRA configs of `inputs`, or an error naming the first one that is not LoRA.
pub(crate) fn lora_inputs(inputs: &[CombineInput<'_>]) -> Result<Vec<Input>> {
    inputs
        .iter()
        .map(|input| {
            let peft_type = peft_type_of(input.method);
            if peft_type != "LORA" {
                return Err(PeftError::IncompatibleAdapters {
                    adapters: vec![input.name.to_string()],
                    field: "peft_type".into(),
                    reason: format!(
                        "`{}` is a {peft_type} adapter; only LoRA adapters can be combined \
                         (add_weighted_adapter is a LoRA operation in PEFT too)",
                        input.name
                    ),
                });
            }
            // The config is LoRA's own type behind the trait object; its JSON is the exact
            // round trip (that is how bundles store it), which spares a downcast hook in core.
            let config: LoraConfig = serde_json::from_value(bundle::method_to_json(input.method))
                .map_err(|e| {
                PeftError::InvalidState(format!(
                    "the LoRA config of `{}` does not read back: {e}",
                    input.name
                ))
            })?;
            Ok(Input {
                name: input.name.to_string(),
                weight: input.weight,
                config,
            })
        })
        .collect()
}

/// The rank PEFT reserves for an adapter: `r`, or the largest of `r` and the `rank_pattern`
/// values.
pub(crate) fn max_rank(config: &LoraConfig) -> usize {
    config
        .rank_pattern
        .values()
        .copied()
        .chain([config.r])
        .max()
        .unwrap_or(config.r)
}

/// The new adapter's rank for `kind`, from the inputs' ranks (`names` for errors): the common
/// rank for the factor-wise types (which need one), their sum for `cat`, `svd_rank` or the
/// largest for the SVD types.
///
/// ```
/// use peft_core::CombinationType;
/// use peft_lora::combine::combined_rank;
/// assert_eq!(combined_rank(CombinationType::Cat, &[("a", 4), ("b", 8)], None).unwrap(), 12);
/// assert_eq!(combined_rank(CombinationType::Svd, &[("a", 4), ("b", 8)], None).unwrap(), 8);
/// assert_eq!(combined_rank(CombinationType::TiesSvd, &[("a", 4), ("b", 8)], Some(2)).unwrap(), 2);
/// assert!(combined_rank(CombinationType::Linear, &[("a", 4), ("b", 8)], None).is_err());
/// ```
pub fn combined_rank(
    kind: CombinationType,
    ranks: &[(&str, usize)],
    svd_rank: Option<usize>,
) -> Result<usize> {
    let largest = ranks.iter().map(|(_, r)| *r).max().unwrap_or(0);
    if kind == CombinationType::Cat {
        return Ok(ranks.iter().map(|(_, r)| r).sum());
    }
    if kind.uses_svd() {
        return Ok(svd_rank.unwrap_or(largest));
    }
    let first = ranks[0];
    if let Some(other) = ranks.iter().find(|(_, r)| *r != first.1) {
        return Err(PeftError::IncompatibleAdapters {
            adapters: vec![first.0.to_string(), other.0.to_string()],
            field: "r".into(),
            reason: format!(
                "`{kind}` combines the factors element-wise and needs equal ranks, found \
                 `{}`: {} and `{}`: {} (the largest of r and rank_pattern); use `cat`, `svd` or \
                 an `*_svd` type, which accept different ranks",
                first.0, first.1, other.0, other.1
            ),
        });
    }
    Ok(first.1)
}

/// The union of the inputs' `target_modules`: for lists, every name once (in order of
/// appearance; PEFT takes a set union); for regular expressions, `(p1)|(p2)|...` (PEFT's join).
/// `all-linear` stands for the leaf names of the modules the adapter is attached to, the set
/// PEFT's config holds once the adapter is injected. Lists and expressions do not mix.
pub(crate) fn union_targets(inputs: &[Input], sites: &[&[String]]) -> Result<TargetModules> {
    let mut names: Vec<String> = Vec::new();
    let mut patterns: Vec<(String, String)> = Vec::new();
    let mut list_owner: Option<&str> = None;
    for (input, sites) in inputs.iter().zip(sites) {
        match &input.config.target_modules {
            Some(TargetModules::List(entries)) => {
                list_owner.get_or_insert(&input.name);
                for e in entries {
                    if !names.contains(e) {
                        names.push(e.clone());
                    }
                }
            }
            Some(TargetModules::Regex(p)) if p == "all-linear" => {
                list_owner.get_or_insert(&input.name);
                for path in sites.iter() {
                    let leaf = path.rsplit('.').next().unwrap_or(path).to_string();
                    if !names.contains(&leaf) {
                        names.push(leaf);
                    }
                }
            }
            Some(TargetModules::Regex(p)) => patterns.push((input.name.clone(), p.clone())),
            None => {
                return Err(PeftError::IncompatibleAdapters {
                    adapters: vec![input.name.clone()],
                    field: "target_modules".into(),
                    reason: "the adapter has no target_modules to combine".into(),
                });
            }
        }
    }
    match (list_owner, patterns.first()) {
        (Some(list), Some((regex, _))) => Err(PeftError::IncompatibleAdapters {
            adapters: vec![list.to_string(), regex.clone()],
            field: "target_modules".into(),
            reason: format!(
                "`{list}` lists module names and `{regex}` gives a regular expression, which \
                 cannot be joined (PEFT refuses this too); give every adapter a list, or every \
                 adapter a regular expression"
            ),
        }),
        (None, Some(_)) => Ok(TargetModules::Regex(
            patterns
                .iter()
                .map(|(_, p)| format!("({p})"))
                .collect::<Vec<_>>()
                .join("|"),
        )),
        _ => Ok(TargetModules::List(names)),
    }
}

/// The new adapter's config: the first input's config with `r = lora_alpha = rank`, the union
/// of the target modules, no rank or alpha patterns (PEFT's `replace(...)`).
///
/// Everything else is inherited from the first adapter, as in PEFT, including `use_rslora`:
/// the combined factors already hold the inputs' scalings, so PEFT's combined adapter then
/// scales by `rank / sqrt(rank) = sqrt(rank)` instead of 1. We reproduce that (the bundle must
/// mean the same in PEFT) and warn.
pub(crate) fn new_config(first: &Input, rank: usize, targets: TargetModules) -> LoraConfig {
    if first.config.use_rslora {
        log::warn!(
            "`{}` uses rsLoRA, so the combined adapter does too (PEFT's rule): its scaling is \
             sqrt({rank}) = {:.4} instead of 1, and its delta is the combination times that \
             factor, exactly as in PEFT; put an adapter without use_rslora first to avoid it",
            first.name,
            (rank as f64).sqrt()
        );
    }
    let mut config = first.config.clone();
    config.r = rank;
    config.lora_alpha = rank as f64;
    config.target_modules = Some(targets);
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    config
}
