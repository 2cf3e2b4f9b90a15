//! The sites' side of PEFT bundles: an adapter's tensors as `adapter_model.safetensors` keys,
//! and reading them back, every tensor shape-checked (saving and loading themselves are the
//! shared rules of `crate::registry::rules`).

use std::collections::BTreeMap;

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};

use super::PeftModel;
use crate::adaptable::{Adaptable, Site, SitePath};
use crate::adapter::TensorSource;
use crate::bundle::{KEY_PREFIX, TensorFile};
use crate::error::Result;
use crate::method::BiasMode;
use crate::nn::WeightLayout;

/// Convert a Burn-layout weight to the layout of a Hugging Face file.
fn to_file_layout(weight: Tensor<2>, layout: Option<WeightLayout>) -> TensorData {
    match layout {
        Some(WeightLayout::Linear) => weight.transpose().into_data(),
        _ => weight.into_data(),
    }
}

impl<M: Adaptable + Module> PeftModel<M> {
    /// The tensors of adapter `name` as they go into `adapter_model.safetensors`: its own at
    /// each site, its `modules_to_save` copies and the biases its `bias` setting trains.
    pub(super) fn export_tensors(&self, name: &str) -> Result<BTreeMap<String, TensorData>> {
        let method = self.registry.config(name)?;
        let bias_mode = method.bias();
        let copy_prefix = method.module_key_prefix();
        let mut out = BTreeMap::new();
        self.model
            .visit_sites(&mut SitePath::root(), &mut |path, site| {
                let no_copies = Vec::new();
                let (adapters, copies, bias, layout) = match site {
                    Site::Linear(l) => (&l.adapters, &l.copies, l.bias.as_ref(), Some(l.layout)),
                    Site::Embedding(e) => (&e.adapters, &e.copies, None, None),
                    Site::Conv1d(c) => (&c.adapters, &no_copies, c.bias.as_ref(), None),
                    Site::Conv2d(c) => (&c.adapters, &no_copies, c.bias.as_ref(), None),
                    Site::KvPrefix(p) => {
                        // Prompt-learning tensors are saved under bare names (`prompt_embeddings`).
                        for adapter in p.adapters.iter().filter(|a| a.name == name) {
                            out.extend(adapter.kernel.export(adapter));
                        }
                        (&p.adapters, &no_copies, None, None)
                    }
                };
                if matches!(site, Site::KvPrefix(_)) {
                    return;
                }
                // PEFT names the bias of any wrapped layer `base_layer.bias`, whichever adapter
                // wrapped it.
                let adapted = !adapters.is_empty();
                for adapter in adapters.iter().filter(|a| a.name == name) {
                    for (suffix, data) in adapter.kernel.export(adapter) {
                        out.insert(format!("{KEY_PREFIX}{path}.{suffix}"), data);
                    }
                }
                for copy in copies.iter().filter(|c| c.adapter == name) {
                    out.insert(
                        format!("{copy_prefix}{path}.weight"),
                        to_file_layout(copy.weight.val(), layout),
                    );
                    if let Some(b) = &copy.bias {
                        out.insert(format!("{copy_prefix}{path}.bias"), b.val().into_data());
                    }
                }
                let save_bias = match bias_mode {
                    BiasMode::None => false,
                    BiasMode::LoraOnly => adapted,
                    BiasMode::All => true,
                };
                if save_bias && let Some(b) = bias {
                    let key = if adapted {
                        format!("{KEY_PREFIX}{path}.base_layer.bias")
                    } else {
                        format!("{KEY_PREFIX}{path}.bias")
                    };
                    out.entry(key).or_insert_with(|| b.val().into_data());
                }
            });
        Ok(out)
    }

    /// Replace the freshly created tensors of adapter `name` (its own, its `modules_to_save`
    /// copies, trained biases, saved embedding tables) by those of `file`.
    pub(super) fn import_tensors(&mut self, name: &str, file: &mut TensorFile) -> Result<()> {
        let method = self.registry.config(name)?;
        let (bias_mode, copy_prefix) = (method.bias(), method.module_key_prefix());
        let mut error = None;
        self.for_each_site_mut(|path, mut slots| {
            if error.is_some() {
                return;
            }
            let result = || -> Result<()> {
                let key_path = if slots.bare_keys { "" } else { path };
                for adapter in slots.adapters.iter_mut().filter(|a| a.name == name) {
                    let kernel = adapter.kernel.clone();
                    let state = adapter.clone();
                    *adapter = kernel.import(state, &mut file.site(key_path))?;
                }
                if let Some(kernel) = slots.kernel {
                    // A convolution: no `modules_to_save` copy (refused when injected); its
                    // trained bias as at a linear site.
                    if bias_mode != BiasMode::None
                        && let Some(Some(bias)) = slots.bias
                    {
                        let mut site = file.site(path);
                        let key = ["base_layer.bias", "bias"]
                            .into_iter()
                            .find(|k| site.contains(k));
                        if let Some(key) = key {
                            let data = site.take(key, &bias.dims())?;
                            let t = Tensor::<1>::from_data(data, &kernel.lazy_device());
                            *bias = bias.clone().map(|_| t);
                        }
                    }
                    return Ok(());
                }
                let (Some(weight), Some(copies)) = (slots.weight, slots.copies) else {
                    return Ok(());
                };
                let device = weight.lazy_device();
                for copy in copies.iter_mut().filter(|c| c.adapter == name) {
                    let [a, b] = copy.weight.dims();
                    let file_shape = match slots.layout {
                        Some(WeightLayout::Linear) => [b, a],
                        _ => [a, b],
                    };
                    let data = file
                        .site_with(copy_prefix, path)
                        .take("weight", &file_shape)?;
                    let t = Tensor::<2>::from_data(data, &device);
                    let t = match slots.layout {
                        Some(WeightLayout::Linear) => t.transpose(),
                        _ => t,
                    };
                    copy.weight = copy.weight.clone().map(|_| t);
                    if let Some(bias) = copy.bias.as_mut() {
                        let data = file
                            .site_with(copy_prefix, path)
                            .take("bias", &bias.dims())?;
                        let t = Tensor::<1>::from_data(data, &device);
                        *bias = bias.clone().map(|_| t);
                    }
                }
                // Trained biases (PEFT's `bias` option) are stored as `base_layer.bias` for
                // wrapped layers and `bias` for others; PEFT tolerates either being absent.
                if bias_mode != BiasMode::None
                    && let Some(Some(bias)) = slots.bias.as_deref_mut()
                {
                    let mut site = file.site(path);
                    let key = ["base_layer.bias", "bias"]
                        .into_iter()
                        .find(|k| site.contains(k) && copies.iter().all(|c| c.adapter != name));
                    if let Some(key) = key {
                        let data = site.take(key, &bias.dims())?;
                        let t = Tensor::<1>::from_data(data, &device);
                        *bias = bias.clone().map(|_| t);
                    }
                }
                // transformers models make PEFT also save a targeted embedding's full table
                // (`save_embedding_layers="auto"`); it replaces the base table.
                if slots.layout.is_none() {
                    let mut site = file.site(path);
                    if site.contains("base_layer.weight") {
                        let data = site.take("base_layer.weight", &slots.dims)?;
                        let t = Tensor::<2>::from_data(data, &device);
                        *weight = weight.clone().map(|_| t);
                        // The table is dense from now on.
                        if let Some(q) = slots.quantized.as_deref_mut() {
                            *q = None;
                        }
                    }
                }
                Ok(())
            };
            if let Err(e) = result() {
                error = Some(e);
            }
        });
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
