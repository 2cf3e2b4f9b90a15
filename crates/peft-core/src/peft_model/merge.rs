//! Folding adapters into the sites' base weights and taking them back out, and unloading the
//! adapters to return the plain model (the merge rules themselves are shared:
//! `crate::registry::rules`).

use burn::module::{Module, Param};
use burn::tensor::{DType, Tensor};

use super::PeftModel;
use crate::adaptable::{Adaptable, Site, SitePath};
use crate::adapter::{BaseWeights, MergeDirection};
use crate::error::Result;
use crate::registry::rules;

impl<M: Adaptable + Module> PeftModel<M> {
    pub(super) fn merged(&self) -> bool {
        let mut merged = false;
        self.model
            .visit_sites(&mut SitePath::root(), &mut |_, site| {
                let adapters = match site {
                    Site::Linear(l) => &l.adapters,
                    Site::Embedding(e) => &e.adapters,
                    Site::Conv1d(c) => &c.adapters,
                    Site::Conv2d(c) => &c.adapters,
                    Site::KvPrefix(p) => &p.adapters,
                };
                merged |= adapters.iter().any(|a| a.merged);
            });
        merged
    }

    /// Merge (in order: active adapters not merged yet) or unmerge (in reverse: merged ones)
    /// at every site, each adapter seeing the ones before it; the first failure is returned,
    /// the sites before it folded (the host's `fold` restores them).
    pub(super) fn fold_sites(&mut self, direction: MergeDirection) -> Result<()> {
        let mut error = None;
        self.for_each_site_mut(|path, mut slots| {
            if error.is_some() {
                return;
            }
            if let Some(mut kernel) = slots.kernel {
                let bias = slots.bias.as_ref().and_then(|b| b.as_ref());
                let matrix = kernel.matrix();
                let base = || BaseWeights {
                    weight: matrix,
                    bias: bias.map(|b| b.val()),
                };
                match rules::fold_site(path, slots.adapters, direction, base) {
                    Ok(Some(new)) => {
                        kernel.set_matrix(new.weight);
                        if let (Some(Some(b)), Some(nb)) = (slots.bias, new.bias) {
                            *b = b.clone().map(|_| nb.detach());
                        }
                    }
                    Ok(None) => {}
                    Err(e) => error = Some(e),
                }
                return;
            }
            let Some(weight) = slots.weight else { return };
            let linear = slots.layout.is_some();
            let quantized = slots.quantized.as_deref().and_then(Option::as_ref);
            let bias = slots.bias.as_ref().and_then(|b| b.as_ref());
            // Kernels merge in f32: a half-precision frozen base (`precision`) is widened here
            // and rounded once when stored back (`set_base`). A quantized base is dequantized
            // and the site keeps the dense result, as PEFT writes merged weights in float.
            let base = || BaseWeights {
                weight: match quantized {
                    Some(q) if linear => q.dequantize(&weight.lazy_device()).transpose(),
                    Some(q) => q.dequantize(&weight.lazy_device()),
                    None => weight.val().cast(DType::F32),
                },
                bias: bias.map(|b| b.val()),
            };
            match rules::fold_site(path, slots.adapters, direction, base) {
                Ok(Some(new)) => {
                    set_base(weight, slots.bias.as_deref_mut(), new);
                    if let Some(q) = slots.quantized.as_deref_mut() {
                        *q = None;
                    }
                }
                Ok(None) => {}
                Err(e) => error = Some(e),
            }
        });
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
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
