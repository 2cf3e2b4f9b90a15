//! Weighted combination of LoRA adapters, as PEFT's `LoraModel.add_weighted_adapter`: the math
//! behind [`PeftModel::add_weighted_adapter`](peft_core::PeftModel::add_weighted_adapter) for
//! LoRA, and the same math on bare factors ([`combine_factors`]) for callers without a model.
//!
//! The rules are PEFT 0.21's (`peft/tuners/lora/model.py`, `peft/utils/merge_utils.py`),
//! quirks included where the bundle must mean the same in PEFT: the result takes the first
//! adapter's config with `r = lora_alpha = rank` (so a first adapter with `use_rslora` makes the
//! result scale by `sqrt(rank)`, with a warning), its `modules_to_save` copies are fresh copies
//! of the base modules. Where PEFT would write a bundle it cannot load (a `rank_pattern` site of
//! lower rank, `svd_rank` above a module's `min(in, out)`), the factors are zero-padded to the
//! rank instead: the same delta, a consistent bundle.
//!
//! ```
//! use burn::tensor::Device;
//! use peft_core::{Adaptable, CombinationType, CombineOptions, PeftModel, nn::LinearConfig};
//! use peft_lora::LoraConfig;
//! # #[derive(burn::module::Module, Debug, Adaptable)]
//! # struct Net { proj: peft_core::nn::Linear }
//! let mut model = PeftModel::new(Net { proj: LinearConfig::new(8, 8).init(&Device::flex()) });
//! for (name, r) in [("a", 2), ("b", 4)] {
//!     let lora = LoraConfig { r, lora_alpha: 4.0, target_modules: Some(["proj"].into()), ..Default::default() };
//!     model.add_adapter(name, &lora).unwrap();
//! }
//! let options = CombineOptions::new(CombinationType::Cat);
//! model.add_weighted_adapter(&[("a", 0.7), ("b", 0.3)], "mix", &options).unwrap();
//! assert_eq!(model.adapter_config("mix").unwrap().targets().target_modules, Some(["proj"].into()));
//! // `linear` combines factors element-wise and needs equal ranks:
//! let linear = CombineOptions::new(CombinationType::Linear);
//! assert!(model.add_weighted_adapter(&[("a", 0.7), ("b", 0.3)], "lin", &linear).is_err());
//! ```

use peft_core::{
    AdapterState, Combination, CombineInput, CombineOptions, CombinedTensors, PeftError, Result,
    SiteCombiner, SiteInfo, SiteInput,
};

mod factors;
mod matrix;
mod merge_rules;
mod plan;
mod qr;
mod rng;
mod svd;

pub use factors::{LoraFactors, MaskKey, combine_factors};
pub use matrix::Matrix;
pub use plan::combined_rank;
pub use svd::{Svd, clamp_factors, low_rank_svd, thin_svd, truncate};

use plan::Input;

/// The plan for combining LoRA adapters; the body of `LoraConfig`'s
/// [`PeftMethod::combine`](peft_core::PeftMethod::combine).
pub(crate) fn plan_combination(
    inputs: &[CombineInput<'_>],
    options: &CombineOptions,
) -> Result<Combination> {
    let lora = plan::lora_inputs(inputs)?;
    let ranks: Vec<(&str, usize)> = lora
        .iter()
        .map(|i| (i.name.as_str(), plan::max_rank(&i.config)))
        .collect();
    let rank = plan::combined_rank(options.combination_type, &ranks, options.svd_rank)?;
    let sites: Vec<&[String]> = inputs.iter().map(|i| i.sites).collect();
    let targets = plan::union_targets(&lora, &sites)?;
    let config = plan::new_config(&lora[0], rank, targets);
    Ok(Combination {
        config: Box::new(config),
        combiner: Box::new(LoraCombiner {
            inputs: lora,
            rank,
            options: options.clone(),
        }),
    })
}

/// The per-site math: reads each input's factors and scaling at the site, combines them with
/// [`combine_factors`], returns them in Burn's layout.
struct LoraCombiner {
    inputs: Vec<Input>,
    rank: usize,
    options: CombineOptions,
}

/// `A` (`[in, r]`) and `B` (`[r, out]`) of a LoRA state in Burn's layout, as PEFT's file
/// layout (`[r, in]`, `[out, r]`).
fn file_layout_factors(state: &AdapterState) -> (Matrix, Matrix) {
    let a = Matrix::from_data(&state.matrices[0].val().into_data()).transpose();
    let b = Matrix::from_data(&state.matrices[1].val().into_data()).transpose();
    (a, b)
}

impl SiteCombiner for LoraCombiner {
    fn combine_site(
        &self,
        site: &SiteInfo,
        inputs: &[SiteInput<'_>],
        _target: &AdapterState,
    ) -> Result<CombinedTensors> {
        if inputs.is_empty() {
            // PEFT: "No matching LoRAs found" (cat, svd types) or an IndexError (the others).
            return Err(PeftError::IncompatibleAdapters {
                adapters: self.inputs.iter().map(|i| i.name.clone()).collect(),
                field: "target_modules".into(),
                reason: format!(
                    "the combined adapter (the first adapter's config with the union of the \
                     target_modules) adapts `{}`, where none of them is attached; their \
                     layers_to_transform / exclude_modules differ: give them the same ones, or \
                     combine the adapters that cover this module",
                    site.path
                ),
            });
        }
        let mut factors = Vec::with_capacity(inputs.len());
        for input in inputs {
            let adapter = &self.inputs[input.index];
            let (a, b) = file_layout_factors(input.state);
            let (_, alpha) = adapter.config.rank_and_alpha(&site.path)?;
            factors.push(LoraFactors {
                name: adapter.name.clone(),
                weight: adapter.weight,
                scaling: adapter.config.scaling_for(a.rows(), alpha),
                a,
                b,
            });
        }
        let key = MaskKey {
            seed: self.options.seed,
            module: &site.path,
        };
        let (a, b) = combine_factors(&factors, self.rank, &self.options, key)?;
        Ok(CombinedTensors {
            matrices: vec![a.transpose().to_data(), b.transpose().to_data()],
            vectors: Vec::new(),
        })
    }
}
