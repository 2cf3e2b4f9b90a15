//! Merging: folding active adapters into the base weights and taking them back out, and
//! unloading the adapters to return the plain model.

use burn::module::{Module, Param};
use burn::tensor::{DType, Tensor};

use super::PeftModel;
use crate::adaptable::{Adaptable, Site, SitePath};
use crate::adapter::{BaseWeights, MergeDirection, MergeInput};
use crate::error::{PeftError, Result};
use crate::method::peft_type_of;

impl<M: Adaptable + Module> PeftModel<M> {
    pub(super) fn has_merged(&self) -> bool {
        let mut merged = false;
        self.model
            .visit_sites(&mut SitePath::root(), &mut |_, site| {
                let adapters = match site {
                    Site::Linear(l) => &l.adapters,
                    Site::Embedding(e) => &e.adapters,
                    Site::KvPrefix(p) => &p.adapters,
                };
                merged |= adapters.iter().any(|a| a.merged);
            });
        merged
    }

    /// Fold every active adapter into the base weights (PEFT's `merge_adapter`); forward then
    /// costs what the base model costs. Fails, changing nothing, if an active adapter's method
    /// cannot merge.
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
        let snapshot = self.model.clone();
        let folded = self.fold(MergeDirection::Merge);
        if folded.is_err() {
            // All or nothing: sites merged before the failure are restored.
            self.model = snapshot;
        }
        folded
    }

    /// Take every merged adapter back out of the base weights.
    pub fn unmerge(&mut self) -> Result<()> {
        self.fold(MergeDirection::Unmerge)
    }

    /// Merge (in order: active adapters not merged yet) or unmerge (in reverse: merged ones)
    /// at every site, each adapter seeing the ones before it; the first failure is returned.
    fn fold(&mut self, direction: MergeDirection) -> Result<()> {
        let merging = direction == MergeDirection::Merge;
        let mut error = None;
        self.for_each_site_mut(|path, mut slots| {
            let Some(weight) = slots.weight else { return };
            let count = slots.adapters.len();
            let linear = slots.layout.is_some();
            let order: Vec<usize> = if merging {
                (0..count).collect()
            } else {
                (0..count).rev().collect()
            };
            for index in order {
                let (earlier, rest) = slots.adapters.split_at_mut(index);
                let adapter = &mut rest[0];
                let due = if merging {
                    adapter.active && !adapter.merged
                } else {
                    adapter.merged
                };
                if !due {
                    continue;
                }
                let bias = slots.bias.as_ref().and_then(|b| b.as_ref());
                // Kernels merge in f32: a half-precision frozen base (`precision`) is widened
                // here and rounded once when stored back (`set_base`). A quantized base is
                // dequantized and the site keeps the dense result, as PEFT writes merged
                // weights in float.
                let quantized = slots.quantized.as_deref().and_then(Option::as_ref);
                let dense = match quantized {
                    Some(q) if linear => q.dequantize(&weight.lazy_device()).transpose(),
                    Some(q) => q.dequantize(&weight.lazy_device()),
                    None => weight.val().detach().cast(DType::F32),
                };
                let base = BaseWeights {
                    weight: dense,
                    bias: bias.map(|b| b.val().detach()),
                };
                let kernel = adapter.kernel.clone();
                let input = MergeInput::new(base, earlier);
                match kernel.merge(adapter, input, direction) {
                    Ok(new) => {
                        set_base(weight, slots.bias.as_deref_mut(), new);
                        if let Some(q) = slots.quantized.as_deref_mut() {
                            *q = None;
                        }
                        adapter.merged = merging;
                    }
                    Err(e) => {
                        let (verb, preposition) = if merging {
                            ("merging", "into")
                        } else {
                            ("unmerging", "from")
                        };
                        error.get_or_insert(PeftError::InvalidState(format!(
                            "{verb} `{}` {preposition} `{path}` failed: {e}",
                            adapter.name
                        )));
                    }
                }
            }
        });
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Merge the active adapters, swap in the active `modules_to_save` copies, drop every
    /// adapter and return the plain model: no added latency.
    pub fn merge_and_unload(mut self) -> Result<M> {
        if self.disabled {
            self.enable_adapters();
        }
        self.merge()?;
        Ok(self.unload())
    }

    /// Drop every adapter without merging and return the base model (active `modules_to_save`
    /// copies replace their originals, as in PEFT).
    pub fn unload(mut self) -> M {
        self.for_each_site_mut(|_, slots| {
            if let (Some(copies), Some(weight)) = (slots.copies, slots.weight) {
                if let Some(pos) = copies.iter().position(|c| c.active) {
                    let copy = copies.swap_remove(pos);
                    *weight = copy.weight;
                    if let Some(bias) = slots.bias {
                        *bias = copy.bias;
                    }
                }
                copies.clear();
            }
            slots.adapters.clear();
        });
        self.model
    }
}

fn set_base(
    weight: &mut Param<Tensor<2>>,
    bias: Option<&mut Option<Param<Tensor<1>>>>,
    new: BaseWeights,
) {
    // A quantized site's empty stand-in is f32: the merged weight stays f32.
    let dtype = weight.val().dtype();
    *weight = weight.clone().map(|_| new.weight.detach().cast(dtype));
    if let (Some(Some(b)), Some(nb)) = (bias, new.bias) {
        *b = b.clone().map(|_| nb.detach());
    }
}
