//! Switching, deleting, merging and unloading the adapters of a [`PeftModule`].

use burn::module::Module;
use burn::tensor::Tensor;

use super::reparam::{self, Attach};
use super::scan::ValuesAt;
use super::{AdaptedLayer, PeftModule};
use crate::adapter::{BaseWeights, MergeDirection, MergeInput};
use crate::error::{PeftError, Result};
use crate::method::peft_type_of;

impl<M: Module> PeftModule<M> {
    /// Activate exactly `names` (one or several), in this order. Merged adapters are unmerged
    /// first, as in PEFT. Only active adapters train.
    pub fn set_adapters(&mut self, names: &[&str]) -> Result<()> {
        for name in names {
            self.config(name)?;
        }
        self.unmerge_if_merged()?;
        self.active = names.iter().map(|s| s.to_string()).collect();
        self.refresh()
    }

    /// Activate the single adapter `name`.
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        self.set_adapters(&[name])
    }

    /// Run the base model alone. Merged adapters are unmerged first.
    pub fn disable_adapters(&mut self) -> Result<()> {
        self.unmerge_if_merged()?;
        self.disabled = true;
        self.refresh()
    }

    /// Undo [`disable_adapters`](Self::disable_adapters).
    pub fn enable_adapters(&mut self) -> Result<()> {
        self.disabled = false;
        self.refresh()
    }

    /// Remove adapter `name` everywhere. If it was active, the remaining active adapters stay
    /// active, or else the first remaining adapter becomes active.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.config(name)?;
        self.unmerge_if_merged()?;
        let mut layers = self.read_layers()?;
        for layer in &mut layers {
            layer.adapters.retain(|a| a.name != name);
        }
        layers.retain(|l| !l.adapters.is_empty());
        self.layers = layers;
        self.configs.retain(|(n, _)| n != name);
        self.active.retain(|n| n != name);
        if self.active.is_empty()
            && let Some((first, _)) = self.configs.first()
        {
            self.active.push(first.clone());
        }
        self.rebuild(Attach::default());
        Ok(())
    }

    /// Whether some adapter is folded into the weights.
    pub fn is_merged(&self) -> bool {
        self.layers
            .iter()
            .any(|l| l.adapters.iter().any(|a| a.merged))
    }

    /// Fold every active adapter into the base weights (PEFT's `merge_adapter`) with the
    /// method's own merge; the model then computes as a plain one. Fails, changing nothing, if
    /// an active adapter's method cannot merge.
    pub fn merge(&mut self) -> Result<()> {
        if self.disabled {
            return Err(PeftError::InvalidState(
                "adapters are disabled; enable them before merging".into(),
            ));
        }
        for name in &self.active {
            let method = self.config(name)?;
            if !method.mergeable() {
                return Err(PeftError::NotSupportedByMethod {
                    adapter: name.clone(),
                    method: peft_type_of(method).into(),
                    reason: "this method has no weight delta to merge".into(),
                });
            }
        }
        self.fold(MergeDirection::Merge)
    }

    /// Take every merged adapter back out of the base weights.
    pub fn unmerge(&mut self) -> Result<()> {
        self.fold(MergeDirection::Unmerge)
    }

    /// Merge the active adapters, drop every adapter and return the plain model: no added
    /// latency, the model's type unchanged.
    pub fn merge_and_unload(mut self) -> Result<M> {
        if self.disabled {
            self.enable_adapters()?;
        }
        self.merge()?;
        Ok(self.unload())
    }

    /// Drop every adapter without merging and return the model as it is (weights merged before
    /// stay merged).
    pub fn unload(self) -> M {
        reparam::strip(self.model)
    }

    fn unmerge_if_merged(&mut self) -> Result<()> {
        if self.is_merged() {
            log::warn!("adapters are merged; unmerging first");
            self.unmerge()?;
        }
        Ok(())
    }

    /// Re-attach the adapters after a change of the active set.
    fn refresh(&mut self) -> Result<()> {
        self.layers = self.read_layers()?;
        self.rebuild(Attach::default());
        Ok(())
    }

    /// Merge the active unmerged adapters (in order), or unmerge the merged ones (in reverse),
    /// with each kernel's `merge`; all or nothing.
    fn fold(&mut self, direction: MergeDirection) -> Result<()> {
        let mut layers = self.read_layers()?;
        let forward: Vec<String> = if self.disabled {
            Vec::new()
        } else {
            self.active.clone()
        };
        let mut attach = Attach::default();
        let params: Vec<String> = layers
            .iter()
            .flat_map(|l| [l.weight_path(), l.bias_path()])
            .collect();
        let mut values = ValuesAt::of(&self.model, &params);
        for layer in &mut layers {
            let weight = values
                .remove(&layer.weight_path())
                .and_then(|w| reparam::ranked::<2>(w.as_ref()))
                .ok_or_else(|| missing_weight(layer))?;
            let bias = values
                .remove(&layer.bias_path())
                .and_then(|b| reparam::ranked::<1>(b.as_ref()));
            let had_bias = bias.is_some();
            let mut current = BaseWeights { weight, bias };
            let mut changed = false;
            let order: Vec<usize> = match direction {
                MergeDirection::Merge => (0..layer.adapters.len()).collect(),
                MergeDirection::Unmerge => (0..layer.adapters.len()).rev().collect(),
            };
            for index in order {
                let (earlier, rest) = layer.adapters.split_at_mut(index);
                let adapter = &mut rest[0];
                let wanted = match direction {
                    MergeDirection::Merge => forward.contains(&adapter.name) && !adapter.merged,
                    MergeDirection::Unmerge => adapter.merged,
                };
                if !wanted {
                    continue;
                }
                let kernel = adapter.kernel.clone();
                let input = MergeInput::new(detached(current), earlier);
                current = kernel.merge(adapter, input, direction).map_err(|e| {
                    PeftError::InvalidState(format!(
                        "{} `{}` at `{}` failed: {e}",
                        match direction {
                            MergeDirection::Merge => "merging",
                            MergeDirection::Unmerge => "unmerging",
                        },
                        adapter.name,
                        layer.path
                    ))
                })?;
                adapter.merged = direction == MergeDirection::Merge;
                changed = true;
            }
            if changed {
                attach
                    .values
                    .insert(layer.weight_path(), Box::new(current.weight));
                if let (true, Some(bias)) = (had_bias, current.bias) {
                    attach.values.insert(layer.bias_path(), Box::new(bias));
                }
            }
        }
        self.layers = layers;
        self.rebuild(attach);
        Ok(())
    }
}

fn detached(weights: BaseWeights) -> BaseWeights {
    BaseWeights {
        weight: weights.weight.detach(),
        bias: weights.bias.map(Tensor::detach),
    }
}

fn missing_weight(layer: &AdaptedLayer) -> PeftError {
    PeftError::InvalidState(format!(
        "the model has no weight `{}` any more; change the model only through PeftModule::update",
        layer.weight_path()
    ))
}
