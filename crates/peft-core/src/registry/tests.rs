//! The shared rules hold on both wrappers: PEFT's SEQ_CLS heads, loading as saved, and the same
//! switch / merge / freeze behaviour on `PeftModel` and `PeftModule`.

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::burn_modules::PeftModule;
use crate::nn::{Linear, LinearConfig};
use crate::{
    Adaptable, AdapterKernel, AdapterState, BaseWeights, MergeDirection, MergeInput, PeftError,
    PeftMethod, PeftModel, Result, SiteInfo, SiteKind, TargetModules, TargetSpec, TensorSource,
    WeightSpace, get_peft_model,
};

/// `W' = W · diag(l)` per output feature: exact in weight space, so both wrappers take it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Scale {
    target_modules: Option<TargetModules>,
    modules_to_save: Option<Vec<String>>,
    task_type: Option<String>,
}

#[typetag::serde(name = "SCALE_REGISTRY_TEST")]
impl PeftMethod for Scale {
    fn targets(&self) -> TargetSpec {
        TargetSpec {
            target_modules: self.target_modules.clone(),
            ..Default::default()
        }
    }
    fn modules_to_save(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }
    fn task_type(&self) -> Option<&str> {
        self.task_type.as_deref()
    }
    fn supports(&self, kind: &SiteKind) -> bool {
        matches!(kind, SiteKind::Linear { .. })
    }
    fn create_adapter(&self, name: &str, site: &SiteInfo) -> Result<AdapterState> {
        let SiteKind::Linear { d_output, .. } = site.kind else {
            unreachable!("supports() takes linear sites only")
        };
        let l = Tensor::<1>::full([d_output], 2.0, &site.device);
        Ok(AdapterState::new(
            name,
            vec![],
            vec![l],
            Arc::new(ScaleKernel),
        ))
    }
    fn clone_method(&self) -> Box<dyn PeftMethod> {
        Box::new(self.clone())
    }
}

#[derive(Debug)]
struct ScaleKernel;

impl AdapterKernel for ScaleKernel {
    fn forward_linear(
        &self,
        state: &AdapterState,
        _base: &BaseWeights,
        _x: Tensor<2>,
        y: Tensor<2>,
    ) -> Tensor<2> {
        y * state.vectors[0].val().unsqueeze::<2>()
    }
    fn weight_space(&self) -> WeightSpace {
        WeightSpace::Exact
    }
    fn effective_weight(&self, state: &AdapterState, _: &Tensor<2>, w: Tensor<2>) -> Tensor<2> {
        w * state.vectors[0].val().unsqueeze::<2>()
    }
    fn merge(
        &self,
        state: &mut AdapterState,
        site: MergeInput<'_>,
        direction: MergeDirection,
    ) -> Result<BaseWeights> {
        let l = state.vectors[0].val();
        let (w, b) = (site.current.weight, site.current.bias);
        Ok(match direction {
            MergeDirection::Merge => BaseWeights {
                weight: w * l.clone().unsqueeze::<2>(),
                bias: b.map(|b| b * l),
            },
            MergeDirection::Unmerge => BaseWeights {
                weight: w / l.clone().unsqueeze::<2>(),
                bias: b.map(|b| b / l),
            },
        })
    }
    fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)> {
        vec![("scale".into(), state.vectors[0].val().into_data())]
    }
    fn import(
        &self,
        mut state: AdapterState,
        source: &mut dyn TensorSource,
    ) -> Result<AdapterState> {
        let data = source.take("scale", &state.vectors[0].dims())?;
        state.set_vector(0, data);
        Ok(state)
    }
}

fn seq_cls(targets: &[&str]) -> Scale {
    Scale {
        target_modules: Some(TargetModules::list(targets.iter().copied())),
        task_type: Some("SEQ_CLS".into()),
        ..Default::default()
    }
}

#[derive(Module, Debug, Adaptable)]
#[peft(classifier_head = "classifier")]
struct Classifier {
    dense: Linear,
    classifier: Linear,
}

fn classifier(device: &Device) -> Classifier {
    Classifier {
        dense: LinearConfig::new(4, 4).init(device),
        classifier: LinearConfig::new(4, 2).init(device),
    }
}

/// A plain Burn model with no head PEFT would save.
#[derive(Module, Debug)]
struct Plain {
    dense: burn::nn::Linear,
}

fn plain(device: &Device) -> Plain {
    Plain {
        dense: burn::nn::LinearConfig::new(4, 4).init(device),
    }
}

fn saved_heads(method: Option<&dyn PeftMethod>) -> Vec<String> {
    method.map(|m| m.modules_to_save()).unwrap_or_default()
}

#[test]
fn seq_cls_adapters_get_peft_heads_once_and_loading_takes_configs_as_saved() {
    let device = Device::flex();
    let mut model = get_peft_model(classifier(&device), &seq_cls(&["dense"])).unwrap();
    assert_eq!(
        saved_heads(model.adapter_config("default")),
        ["classifier", "score"]
    );
    // The scale [4] and the head's copy [4, 2] + [2] train.
    assert_eq!(model.trainable_report().trainable, 4 + 10);

    // A second SEQ_CLS adapter shares the head the first one saves (one head trains when they
    // run together), and an entry the caller lists is kept, not doubled.
    model.add_adapter("second", &seq_cls(&["dense"])).unwrap();
    assert!(saved_heads(model.adapter_config("second")).is_empty());
    let mut listed = PeftModel::new(classifier(&device));
    let mut method = seq_cls(&["dense"]);
    method.modules_to_save = Some(vec!["score".into()]);
    listed.add_adapter("default", &method).unwrap();
    assert_eq!(
        saved_heads(listed.adapter_config("default")),
        ["score", "classifier"]
    );

    // Bundles load as saved: the second one, without heads, still loads without them.
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path(), "second").unwrap();
    let mut fresh = PeftModel::new(classifier(&device));
    fresh
        .load_adapter(crate::bundle::adapter_dir(dir.path(), "second"), "second")
        .unwrap();
    assert!(saved_heads(fresh.adapter_config("second")).is_empty());
}

#[test]
fn plain_modules_follow_the_same_rules() {
    let device = Device::flex();
    // No module named `classifier` or `score`: the heads are saved in the config, as PEFT
    // writes them, and match nothing.
    let mut module = PeftModule::new(plain(&device));
    module.add_adapter("default", &seq_cls(&["dense"])).unwrap();
    assert_eq!(
        saved_heads(module.adapter_config("default")),
        ["classifier", "score"]
    );
    // A head this path cannot copy is refused rather than left untrained.
    let mut module_with_head = PeftModule::new(classifier(&device));
    let e = module_with_head
        .add_adapter("default", &seq_cls(&["dense"]))
        .unwrap_err();
    assert!(
        matches!(&e, PeftError::Unsupported { key, .. } if key == "modules_to_save"),
        "{e}"
    );
    assert!(e.to_string().contains("SEQ_CLS"), "{e}");

    // Switching, merging, freezing: the same answers, from the same rules.
    let mut model = PeftModel::new(classifier(&device));
    model.add_adapter("default", &seq_cls(&["dense"])).unwrap();
    for result in [model.disable_adapters(), module.disable_adapters()] {
        result.unwrap();
    }
    assert!(matches!(model.merge(), Err(PeftError::InvalidState(_))));
    assert!(matches!(module.merge(), Err(PeftError::InvalidState(_))));
    model.enable_adapters().unwrap();
    module.enable_adapters().unwrap();
    model.merge().unwrap();
    module.merge().unwrap();
    assert!(model.is_merged() && module.is_merged());
    model.set_adapter("default").unwrap();
    module.set_adapter("default").unwrap();
    assert!(!model.is_merged() && !module.is_merged());
    model.set_adapter_trainable("default", false).unwrap();
    module.set_adapter_trainable("default", false).unwrap();
    assert_eq!(model.trainable_report().trainable, 0);
    assert_eq!(module.trainable_report().trainable, 0);

    // from_pretrained on a plain module: frozen, or trainable when asked.
    let dir = tempfile::tempdir().unwrap();
    module.save_adapter(dir.path(), "default").unwrap();
    let frozen = PeftModule::from_pretrained(plain(&device), dir.path(), false).unwrap();
    assert_eq!(frozen.active_adapters(), ["default"]);
    assert!(!frozen.is_adapter_trainable("default"));
    assert_eq!(frozen.trainable_report().trainable, 0);
    let resumed = PeftModule::from_pretrained(plain(&device), dir.path(), true).unwrap();
    assert_eq!(resumed.trainable_report().trainable, 4);
}
