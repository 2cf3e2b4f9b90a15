//! Folding the adapters of a [`PeftModule`] into its weights and taking them back out (the
//! merge rules themselves are shared: `crate::registry::rules`).

use burn::module::Module;

use super::reparam::{self, Attach};
use super::scan::ValuesAt;
use super::{AdaptedLayer, PeftModule};
use crate::adapter::{BaseWeights, MergeDirection};
use crate::error::{PeftError, Result};
use crate::registry::rules;

impl<M: Module> PeftModule<M> {
    /// Merge the forward adapters not merged yet (in order), or unmerge the merged ones (in
    /// reverse), with each kernel's `merge`; all or nothing (nothing is written before every
    /// layer has folded).
    pub(super) fn fold_layers(&mut self, direction: MergeDirection) -> Result<()> {
        let mut layers = self.read_layers()?;
        let mut attach = Attach::default();
        let params: Vec<String> = layers
            .iter()
            .flat_map(|l| [l.weight_path(), l.bias_path()])
            .collect();
        let mut values = ValuesAt::of(&self.model, &params);
        for layer in &mut layers {
            let (weight, kernel) = values
                .remove(&layer.weight_path())
                .and_then(|w| reparam::as_matrix(w.as_ref()))
                .ok_or_else(|| missing_weight(layer))?;
            let bias = values
                .remove(&layer.bias_path())
                .and_then(|b| reparam::ranked::<1>(b.as_ref()));
            let had_bias = bias.is_some();
            let folded = rules::fold_site(&layer.path, &mut layer.adapters, direction, || {
                BaseWeights { weight, bias }
            })?;
            if let Some(new) = folded {
                attach.values.insert(
                    layer.weight_path(),
                    reparam::from_matrix(new.weight, kernel),
                );
                if let (true, Some(bias)) = (had_bias, new.bias) {
                    attach.values.insert(layer.bias_path(), Box::new(bias));
                }
            }
        }
        self.layers = layers;
        self.rebuild(attach);
        Ok(())
    }
}

fn missing_weight(layer: &AdaptedLayer) -> PeftError {
    PeftError::InvalidState(format!(
        "the model has no weight `{}` any more; change the model only through PeftModule::update",
        layer.weight_path()
    ))
}
