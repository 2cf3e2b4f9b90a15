//! The rows of the comparison: which model, which method, their data, and the model under
//! training (a `PeftModel`, or a plain model with Burn's LoRA reparameterization).

use std::collections::HashSet;

use burn::module::{Lora, Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::tensor::{Device, Tensor};
use burn_peft::models::{HfModel, HfTokenizer, Task, from_pretrained, model_dir};
use burn_peft::prelude::*;
use burn_peft::train::data::{DataConfig, Example, TaskKind, load_examples};

use crate::{LLAMA_DIR, MINILM, Res, SEQ, repo_root};

// ------------------------------------------------------------------------------------------------
// Rows

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModelKind {
    MiniLm,
    Llama,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Lora,
    LoraNoDropout,
    LoraAllLinear,
    Prefix,
    Full,
    BurnLora,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Row {
    pub(crate) model: ModelKind,
    pub(crate) method: Method,
}

impl Row {
    pub(crate) fn id(&self) -> String {
        format!("{}/{}", self.model_name(), self.method_name())
    }
    pub(crate) fn model_name(&self) -> &'static str {
        match self.model {
            ModelKind::MiniLm => "minilm",
            ModelKind::Llama => "llama",
        }
    }
    pub(crate) fn method_name(&self) -> &'static str {
        match self.method {
            Method::Lora => "lora",
            Method::LoraNoDropout => "lora-nodrop",
            Method::LoraAllLinear => "lora-all-linear",
            Method::Prefix => "prefix",
            Method::Full => "full",
            Method::BurnLora => "burn-apply-lora",
        }
    }
    pub(crate) fn label(&self) -> &'static str {
        match self.method {
            Method::Lora => "LoRA r8 (q,v)",
            Method::LoraNoDropout => "LoRA r8 (q,v), no dropout",
            Method::LoraAllLinear => "LoRA r8 all-linear",
            Method::Prefix => "prefix 16 tokens",
            Method::Full => "full fine-tuning",
            Method::BurnLora => "Burn apply_lora r8 (q,v)",
        }
    }
    /// Peak learning rate of the accuracy budget (usual values per method).
    pub(crate) fn lr(&self) -> f64 {
        match self.method {
            Method::Lora | Method::LoraNoDropout | Method::LoraAllLinear | Method::BurnLora => 1e-3,
            Method::Prefix => 1e-2,
            Method::Full => 1e-4,
        }
    }
    /// `--method` of the PyTorch peer, if it has this row.
    pub(crate) fn peer_method(&self) -> Option<&'static str> {
        match self.method {
            Method::BurnLora | Method::LoraNoDropout => None,
            _ => Some(self.method_name()),
        }
    }
}

pub(crate) fn all_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for model in [ModelKind::MiniLm, ModelKind::Llama] {
        for method in [
            Method::Lora,
            Method::LoraAllLinear,
            Method::Prefix,
            Method::Full,
            Method::BurnLora,
            Method::LoraNoDropout,
        ] {
            rows.push(Row { model, method });
        }
    }
    rows
}

pub(crate) fn selected_rows() -> Vec<Row> {
    let filter: Option<Vec<String>> = std::env::var("BENCH_ROWS").ok().map(|v| {
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    });
    all_rows()
        .into_iter()
        .filter(|r| {
            filter.as_ref().is_none_or(|f| {
                f.iter()
                    .any(|x| *x == r.id() || x == r.model_name() || x == r.method_name())
            })
        })
        .collect()
}

/// Ids and element counts of the parameters that require gradients.
pub(crate) struct RequireGrad {
    pub(crate) ids: HashSet<ParamId>,
    pub(crate) trainable: usize,
    pub(crate) all: usize,
}

impl ModuleVisitor for RequireGrad {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n = param.lazy_shape().num_elements();
        self.all += n;
        if param.val().is_require_grad() {
            self.ids.insert(param.id);
            self.trainable += n;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Data

pub(crate) struct Data {
    pub(crate) train: Vec<Example>,
    pub(crate) eval: Vec<Example>,
    pub(crate) num_labels: usize,
    pub(crate) pad_id: i64,
    pub(crate) objective: Task,
}

pub(crate) fn minilm_data() -> Res<Data> {
    let dir = model_dir(MINILM)?;
    let tokenizer = HfTokenizer::from_dir(&dir)?;
    let cfg = DataConfig {
        max_length: SEQ,
        ..Default::default()
    };
    let data = repo_root().join("examples/data");
    let (train, labels) = load_examples(
        &data.join("train.jsonl"),
        TaskKind::Classification,
        &cfg,
        &tokenizer,
        None,
        None,
    )?;
    let labels = labels.ok_or("no label map")?;
    let (eval, _) = load_examples(
        &data.join("eval.jsonl"),
        TaskKind::Classification,
        &cfg,
        &tokenizer,
        None,
        Some(&labels),
    )?;
    Ok(Data {
        train,
        eval,
        num_labels: labels.len(),
        pad_id: tokenizer.pad_id() as i64,
        objective: Task::SequenceClassification {
            num_labels: labels.len(),
        },
    })
}

/// Synthetic causal-LM sequences for the tiny Llama: arithmetic progressions modulo the
/// vocabulary (`(a + b·t) mod V`, random `a`, `b`), a pattern the model can learn in context.
pub(crate) fn llama_data(vocab: usize) -> Data {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut make = |n: usize| -> Vec<Example> {
        (0..n)
            .map(|_| {
                let a = next() % vocab as u64;
                let b = 1 + next() % 7;
                let ids: Vec<i64> = (0..SEQ as u64)
                    .map(|t| ((a + b * t) % vocab as u64) as i64)
                    .collect();
                Example {
                    token_type_ids: vec![0; SEQ],
                    label: None,
                    labels: Some(ids.clone()),
                    input_ids: ids,
                    line: 0,
                    segments: Vec::new(),
                    image: None,
                }
            })
            .collect()
    };
    let train = make(2048);
    let eval = make(128);
    Data {
        train,
        eval,
        num_labels: 0,
        pad_id: 0,
        objective: Task::CausalLm,
    }
}

pub(crate) fn load_model(kind: ModelKind, num_labels: usize, device: &Device) -> Res<HfModel> {
    Ok(match kind {
        ModelKind::MiniLm => {
            from_pretrained(MINILM, Task::SequenceClassification { num_labels }, device)?.model
        }
        ModelKind::Llama => {
            from_pretrained(
                repo_root().join(LLAMA_DIR).to_str().ok_or("path")?,
                Task::CausalLm,
                device,
            )?
            .model
        }
    })
}

// ------------------------------------------------------------------------------------------------
// The model under training: a PeftModel, or a plain model with Burn's LoRA reparameterization.

pub(crate) enum Subject {
    Peft(PeftModel<HfModel>),
    Burn {
        model: HfModel,
        ids: HashSet<ParamId>,
        trainable: usize,
        all: usize,
    },
}

impl Subject {
    pub(crate) fn model(&self) -> &HfModel {
        match self {
            Subject::Peft(p) => p.model(),
            Subject::Burn { model, .. } => model,
        }
    }
    pub(crate) fn update(&mut self, f: impl FnOnce(HfModel) -> HfModel) {
        match self {
            Subject::Peft(p) => p.update(f),
            Subject::Burn { model, .. } => {
                let m = model.clone();
                *model = f(m);
            }
        }
    }
    pub(crate) fn trainable_ids(&self) -> HashSet<ParamId> {
        match self {
            Subject::Peft(p) => p.trainable_param_ids().clone(),
            Subject::Burn { ids, .. } => ids.clone(),
        }
    }
    pub(crate) fn counts(&self) -> (usize, usize) {
        match self {
            Subject::Peft(p) => {
                let r = p.trainable_report();
                (r.trainable, r.all)
            }
            Subject::Burn { trainable, all, .. } => (*trainable, *all),
        }
    }
}

pub(crate) fn build_subject(row: Row, model: HfModel) -> Res<Subject> {
    let cls = row.model == ModelKind::MiniLm;
    let save = cls.then(|| vec!["classifier".to_string()]);
    let task_type = Some(if cls { "SEQ_CLS" } else { "CAUSAL_LM" }.to_string());
    let qv: TargetModules = if cls {
        ["query", "value"].into()
    } else {
        ["q_proj", "v_proj"].into()
    };
    let lora = |targets: TargetModules, lora_dropout: f64| LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout,
        target_modules: Some(targets),
        modules_to_save: save.clone(),
        base: PeftConfigBase {
            task_type: task_type.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    Ok(match row.method {
        Method::Lora | Method::LoraNoDropout | Method::LoraAllLinear | Method::Prefix => {
            let mut peft = PeftModel::new(model);
            // Dropout 0.1 as the PyTorch peer (benches/peer/peft_cpu.py); 0 for the row that
            // compares with Burn's LoRA, which has none.
            match row.method {
                Method::Lora => peft.add_adapter("default", &lora(qv, 0.1))?,
                Method::LoraNoDropout => peft.add_adapter("default", &lora(qv, 0.0))?,
                Method::LoraAllLinear => {
                    peft.add_adapter("default", &lora("all-linear".into(), 0.1))?
                }
                _ => peft.add_adapter(
                    "default",
                    &PrefixTuningConfig {
                        num_virtual_tokens: 16,
                        modules_to_save: save.clone(),
                        base: PeftConfigBase {
                            task_type: task_type.clone(),
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                )?,
            };
            Subject::Peft(peft)
        }
        Method::Full => {
            let mut peft = PeftModel::new(model);
            peft.set_train_base(true)?;
            Subject::Peft(peft)
        }
        Method::BurnLora => {
            let group = ParamGroup::from_regex(r"(^|\.)(query|value|q_proj|v_proj)\.weight$")
                .map_err(|e| format!("{e:?}"))?;
            let mut model = model.apply_lora(Lora::new(8, 16.0).set_param_group(group));
            if cls {
                // PEFT trains the classifier of a SEQ_CLS model (modules_to_save); so does this row.
                model = model.unfreeze_group(ParamGroup::from_predicate("classifier"));
            }
            let mut v = RequireGrad {
                ids: HashSet::new(),
                trainable: 0,
                all: 0,
            };
            model.visit(&mut v);
            Subject::Burn {
                model,
                ids: v.ids,
                trainable: v.trainable,
                all: v.all,
            }
        }
    })
}
