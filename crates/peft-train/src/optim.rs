//! AdamW with PyTorch's defaults and semantics, over the trainable parameters only.
//!
//! Our own instead of Burn's `AdamW` because (1) its defaults differ from PyTorch's (eps 1e-5,
//! weight decay 1e-4), (2) its state is keyed by `ParamId`, which a rebuilt model does not
//! keep, while ours is keyed by the module path and so survives a resume bit for bit, and
//! (3) global-norm clipping across all parameters needs every gradient before any update.

use std::collections::{BTreeMap, HashMap, HashSet};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters (PyTorch's `torch.optim.AdamW` defaults).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWSettings {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to biases, norms or other
    /// vectors, as Hugging Face's Trainer does).
    pub weight_decay: f64,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Moments of one parameter, flattened.
#[derive(Debug, Clone)]
struct Moments {
    m: Tensor<1>,
    v: Tensor<1>,
}

/// AdamW state: step count and moments by parameter path.
#[derive(Debug, Clone, Default)]
pub struct AdamW {
    settings: AdamWSettings,
    step: u64,
    moments: HashMap<String, Moments>,
}

/// Enter a module on `path`: enum variants (a model's family and head) add no segment, so
/// parameter paths are the module paths of the Hugging Face names.
fn enter(path: &mut Vec<String>, name: &str, container: &str) {
    if !container.starts_with("Enum:") {
        path.push(name.to_string());
    }
}

/// Leave a module entered with [`enter`].
fn exit(path: &mut Vec<String>, container: &str) {
    if !container.starts_with("Enum:") {
        path.pop();
    }
}

struct Paths<'a> {
    path: Vec<String>,
    ids: &'a HashSet<ParamId>,
    out: Vec<(ParamId, String, usize)>,
}

impl ModuleVisitor for Paths<'_> {
    fn enter_module(&mut self, name: &str, container: &str) {
        enter(&mut self.path, name, container);
    }
    fn exit_module(&mut self, _: &str, container: &str) {
        exit(&mut self.path, container);
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.ids.contains(&param.id) {
            self.out.push((param.id, self.path.join("."), D));
        }
    }
}

/// `(id, module path, rank)` of every parameter of `model` in `ids`, in module order.
pub fn trainable_paths<M: Module>(
    model: &M,
    ids: &HashSet<ParamId>,
) -> Vec<(ParamId, String, usize)> {
    let mut v = Paths {
        path: Vec::new(),
        ids,
        out: Vec::new(),
    };
    model.visit(&mut v);
    v.out
}

/// Shape of every parameter of `model` in `ids`, by module path.
pub fn trainable_shapes<M: Module>(
    model: &M,
    ids: &HashSet<ParamId>,
) -> BTreeMap<String, Vec<usize>> {
    struct Shapes<'a> {
        path: Vec<String>,
        ids: &'a HashSet<ParamId>,
        out: BTreeMap<String, Vec<usize>>,
    }
    impl ModuleVisitor for Shapes<'_> {
        fn enter_module(&mut self, name: &str, container: &str) {
            enter(&mut self.path, name, container);
        }
        fn exit_module(&mut self, _: &str, container: &str) {
            exit(&mut self.path, container);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.ids.contains(&param.id) {
                self.out
                    .insert(self.path.join("."), param.lazy_shape().to_vec());
            }
        }
    }
    let mut v = Shapes {
        path: Vec::new(),
        ids,
        out: BTreeMap::new(),
    };
    model.visit(&mut v);
    v.out
}

fn grad_sq_sum<const D: usize>(grads: &GradientsParams, id: ParamId) -> Option<f64> {
    grads.get::<D>(id).map(peft_ops::sum_squares)
}

/// Global L2 norm of the gradients of `params`.
pub fn global_grad_norm(grads: &GradientsParams, params: &[(ParamId, String, usize)]) -> f64 {
    global_grad_sq(grads, params).sqrt()
}

/// Sum of the squared gradients of `params` (peft-ops' one-pass kernel per tensor on flex; one
/// device read per tensor elsewhere, where `readout::grad_sq_sum` keeps the sum on the device).
pub fn global_grad_sq(grads: &GradientsParams, params: &[(ParamId, String, usize)]) -> f64 {
    params
        .iter()
        .filter_map(|(id, _, rank)| match rank {
            1 => grad_sq_sum::<1>(grads, *id),
            2 => grad_sq_sum::<2>(grads, *id),
            3 => grad_sq_sum::<3>(grads, *id),
            4 => grad_sq_sum::<4>(grads, *id),
            _ => None,
        })
        .sum::<f64>()
}

struct Step<'a> {
    opt: &'a mut AdamW,
    grads: &'a mut GradientsParams,
    path: Vec<String>,
    lr: f64,
    grad_scale: f64,
}

impl ModuleMapper for Step<'_> {
    fn enter_module(&mut self, name: &str, container: &str) {
        enter(&mut self.path, name, container);
    }
    fn exit_module(&mut self, _: &str, container: &str) {
        exit(&mut self.path, container);
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let shape = tensor.shape();
        let n = shape.num_elements();
        let p = tensor.inner().reshape([n]);
        let s = &self.opt.settings;
        let key = self.path.join(".");
        // Taken out of the map so the update owns the buffers (in place on flex).
        let moments = self.opt.moments.remove(&key).unwrap_or_else(|| Moments {
            m: p.zeros_like(),
            v: p.zeros_like(),
        });
        // torch.optim.AdamW: p *= 1 - lr*wd; p -= lr/bias1 * m / (sqrt(v)/sqrt(bias2) + eps);
        // one fused pass on flex (peft-ops).
        let step = peft_ops::AdamWStep {
            lr: self.lr,
            beta1: s.beta1,
            beta2: s.beta2,
            eps: s.eps,
            weight_decay: if D >= 2 { s.weight_decay } else { 0.0 },
            step: self.opt.step,
            grad_scale: self.grad_scale,
        };
        let (p, m, v) = peft_ops::adamw(p, grad.reshape([n]), moments.m, moments.v, &step);
        self.opt.moments.insert(key, Moments { m, v });
        let mut updated = Tensor::<D>::from_inner(p.reshape(shape));
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(settings: AdamWSettings) -> Self {
        Self {
            settings,
            step: 0,
            moments: HashMap::new(),
        }
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Update the parameters of `model` that have gradients in `grads`, scaling the gradients
    /// by `grad_scale` (clipping, accumulation averaging).
    pub fn step<M: Module>(
        &mut self,
        lr: f64,
        model: M,
        mut grads: GradientsParams,
        grad_scale: f64,
    ) -> M {
        self.step += 1;
        let mut mapper = Step {
            opt: self,
            grads: &mut grads,
            path: Vec::new(),
            lr,
            grad_scale,
        };
        model.map(&mut mapper)
    }

    /// The state as named tensors (`<path>.exp_avg`, `<path>.exp_avg_sq`) and the step count.
    pub fn state(&self) -> (u64, BTreeMap<String, TensorData>) {
        let mut out = BTreeMap::new();
        for (key, m) in &self.moments {
            out.insert(format!("{key}.exp_avg"), m.m.to_data());
            out.insert(format!("{key}.exp_avg_sq"), m.v.to_data());
        }
        (self.step, out)
    }

    /// Restore a state saved by [`state`](Self::state), onto `device` (the inner device).
    ///
    /// `params` maps the path of every trainable parameter to its number of elements. Every
    /// saved moment must belong to one of them and have its size, and come as a pair
    /// (`exp_avg` and `exp_avg_sq`); a parameter without saved moments starts from zero ones,
    /// as it would have in the run that wrote the checkpoint. On error nothing is changed and
    /// the message names the tensor that disagrees.
    pub fn restore(
        &mut self,
        step: u64,
        tensors: &BTreeMap<String, TensorData>,
        params: &BTreeMap<String, usize>,
        device: &burn::tensor::Device,
    ) -> Result<(), String> {
        let mut moments = HashMap::new();
        for (name, data) in tensors {
            let (key, partner) = if let Some(key) = name.strip_suffix(".exp_avg") {
                (key, format!("{key}.exp_avg_sq"))
            } else if let Some(key) = name.strip_suffix(".exp_avg_sq") {
                (key, format!("{key}.exp_avg"))
            } else {
                return Err(format!(
                    "optimizer tensor `{name}` is neither `<path>.exp_avg` nor `<path>.exp_avg_sq`"
                ));
            };
            let Some(&numel) = params.get(key) else {
                return Err(format!(
                    "optimizer state for `{key}`, which is not a trainable parameter of this model \
                     (was the checkpoint written with another rank, targets or model?)"
                ));
            };
            let Some(other) = tensors.get(&partner) else {
                return Err(format!(
                    "optimizer tensor `{partner}` is missing (`{name}` is there)"
                ));
            };
            for (n, d) in [(name.as_str(), data), (partner.as_str(), other)] {
                let found = d.shape().iter().product::<usize>();
                if found != numel {
                    return Err(format!(
                        "optimizer tensor `{n}` has {found} elements, the parameter `{key}` has \
                         {numel} (was the checkpoint written with another rank or model?)"
                    ));
                }
            }
            if name.ends_with(".exp_avg") {
                let flat =
                    |d: &TensorData| Tensor::<1>::from_data(d.clone(), device).reshape([numel]);
                moments.insert(
                    key.to_string(),
                    Moments {
                        m: flat(data),
                        v: flat(other),
                    },
                );
            }
        }
        self.step = step;
        self.moments = moments;
        Ok(())
    }
}
