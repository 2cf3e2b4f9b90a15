//! The reports the adapter jobs of [`PeftModel`] and
//! [`PeftModule`](crate::burn_modules::PeftModule) return: trainable counts (PEFT's
//! `print_trainable_parameters`), injection and load summaries.

use std::collections::HashSet;
use std::fmt;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;

use super::PeftModel;
use crate::adaptable::{Adaptable, Site, SitePath};

/// PEFT's `print_trainable_parameters` numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainableReport {
    /// Parameters that receive gradients.
    pub trainable: usize,
    /// All parameters, base and adapters.
    pub all: usize,
}

impl TrainableReport {
    /// `100 * trainable / all`.
    pub fn percent(&self) -> f64 {
        if self.all == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.all as f64
        }
    }
}

/// `n` with a comma every three digits (`22,793,104`), as PEFT prints counts.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for TrainableReport {
    /// The exact line PEFT prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(self.trainable),
            thousands(self.all),
            self.percent()
        )
    }
}

/// Summary of an injection.
#[derive(Debug, Clone, Default)]
pub struct InjectionReport {
    /// Paths that received the adapter.
    pub adapted: Vec<String>,
    /// Paths that received a `modules_to_save` copy.
    pub saved_copies: Vec<String>,
}

/// What `load_adapter` ([`PeftModel::load_adapter`],
/// [`PeftModule::load_adapter`](crate::burn_modules::PeftModule::load_adapter)) noticed without
/// failing.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Config keys this version does not know (PEFT's forward-compatibility rule: a warning).
    pub unknown_config_keys: Vec<String>,
}

struct CountParams<'a> {
    trainable_ids: &'a HashSet<ParamId>,
    report: TrainableReport,
    field: Vec<String>,
}

/// Whether the field entered last is a BatchNorm's running statistic: Burn visits its
/// `RunningState` buffers as float parameters, but they are buffers (PyTorch's
/// `named_parameters` leaves them out, and no optimizer trains them).
pub(crate) fn in_running_stat(field: &[String]) -> bool {
    matches!(
        field.last().map(String::as_str),
        Some("running_mean" | "running_var")
    )
}

impl ModuleVisitor for CountParams<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.field.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.field.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if in_running_stat(&self.field) {
            return;
        }
        let n = param.lazy_shape().num_elements();
        self.report.all += n;
        if self.trainable_ids.contains(&param.id) {
            self.report.trainable += n;
        }
    }
}

/// Every float parameter of `model` (without initializing lazy ones), and those of them in
/// `trainable_ids`.
pub(crate) fn count_params<M: Module>(
    model: &M,
    trainable_ids: &HashSet<ParamId>,
) -> TrainableReport {
    let mut counter = CountParams {
        trainable_ids,
        report: TrainableReport {
            trainable: 0,
            all: 0,
        },
        field: Vec::new(),
    };
    model.visit(&mut counter);
    counter.report
}

impl<M: Adaptable + Module> PeftModel<M> {
    /// PEFT's `print_trainable_parameters` numbers.
    pub(super) fn count_params(&self) -> TrainableReport {
        let mut report = count_params(&self.model, &self.registry.trainable);
        // A quantized base holds its elements outside the parameters (an empty stand-in):
        // count them, as PEFT counts a 4-bit base's elements.
        self.model
            .visit_sites(&mut SitePath::root(), &mut |_, site| {
                let quantized = match site {
                    Site::Linear(l) => l.quantized.as_ref(),
                    Site::Embedding(e) => e.quantized.as_ref(),
                    _ => None,
                };
                if let Some(q) = quantized {
                    let [i, o] = q.dims();
                    report.all += i * o;
                }
            });
        report
    }
}
