//! PEFT's entry point `get_peft_model` (its other one, `PeftModel.from_pretrained`, is part of
//! the API both wrappers share: `crate::registry::adapter_api`).

use burn::module::Module;

use super::PeftModel;
use crate::adaptable::Adaptable;
use crate::error::Result;
use crate::method::PeftMethod;

/// PEFT's `get_peft_model(model, peft_config)`: wrap `model` with one adapter, `default`, built
/// from `method`, active and trainable; every base parameter is frozen. As in PEFT, a config
/// whose `task_type` is `SEQ_CLS` also trains and saves the classification head (see
/// [`PeftModel::add_adapter`]).
///
/// ```
/// # use std::sync::Arc;
/// # use burn::tensor::{Tensor, TensorData};
/// # use peft_core::{AdapterKernel, AdapterState, BaseWeights, MergeDirection, MergeInput, Result,
/// #     SiteInfo, SiteKind, TargetModules, TargetSpec, TensorSource};
/// # /// A learned offset per output feature (a doc stand-in for LoRA, which lives in peft-lora).
/// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
/// # struct Offset {
/// #     target_modules: Option<TargetModules>,
/// #     modules_to_save: Option<Vec<String>>,
/// #     task_type: Option<String>,
/// # }
/// # #[typetag::serde(name = "OFFSET_GET_PEFT_MODEL_DOC")]
/// # impl PeftMethod for Offset {
/// #     fn targets(&self) -> TargetSpec { TargetSpec { target_modules: self.target_modules.clone(), ..Default::default() } }
/// #     fn modules_to_save(&self) -> Vec<String> { self.modules_to_save.clone().unwrap_or_default() }
/// #     fn task_type(&self) -> Option<&str> { self.task_type.as_deref() }
/// #     fn supports(&self, kind: &SiteKind) -> bool { matches!(kind, SiteKind::Linear { .. }) }
/// #     fn create_adapter(&self, name: &str, site: &SiteInfo) -> Result<AdapterState> {
/// #         let SiteKind::Linear { d_output, .. } = site.kind else { unreachable!() };
/// #         let offset = Tensor::<1>::zeros([d_output], &site.device);
/// #         Ok(AdapterState::new(name, vec![], vec![offset], Arc::new(OffsetKernel)))
/// #     }
/// #     fn clone_method(&self) -> Box<dyn PeftMethod> { Box::new(self.clone()) }
/// # }
/// # #[derive(Debug)]
/// # struct OffsetKernel;
/// # impl AdapterKernel for OffsetKernel {
/// #     fn merge(&self, _: &mut AdapterState, site: MergeInput<'_>, _: MergeDirection) -> Result<BaseWeights> { Ok(site.current) }
/// #     fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)> { vec![("offset".into(), state.vectors[0].val().into_data())] }
/// #     fn import(&self, mut state: AdapterState, source: &mut dyn TensorSource) -> Result<AdapterState> {
/// #         let data = source.take("offset", &state.vectors[0].dims())?;
/// #         state.set_vector(0, data);
/// #         Ok(state)
/// #     }
/// # }
/// use burn::tensor::Device;
/// use peft_core::{Adaptable, PeftMethod, PeftModel, get_peft_model, nn::{Linear, LinearConfig}};
///
/// #[derive(burn::module::Module, Debug, Adaptable)]
/// #[peft(classifier_head = "classifier")]
/// struct Classifier {
///     dense: Linear,
///     classifier: Linear,
/// }
///
/// let device = Device::flex();
/// let base = || Classifier {
///     dense: LinearConfig::new(4, 4).init(&device),
///     classifier: LinearConfig::new(4, 2).init(&device),
/// };
/// // With peft-lora linked: `&LoraConfig { task_type: Some("SEQ_CLS".into()), .. }`.
/// let method = Offset {
///     target_modules: Some(["dense"].into()),
///     modules_to_save: None,
///     task_type: Some("SEQ_CLS".into()),
/// };
/// let model = get_peft_model(base(), &method).unwrap().with_base_model_name("org/tiny");
/// // PEFT's sequence-classification rule: the new head trains and is saved with the adapter.
/// let config = model.adapter_config("default").unwrap();
/// assert_eq!(config.modules_to_save(), ["classifier", "score"]);
/// // The offset on `dense` [4], and the head's copy [4, 2] + [2].
/// assert_eq!(model.trainable_report().trainable, 4 + 4 * 2 + 2);
///
/// let dir = tempfile::tempdir().unwrap();
/// model.save_adapter(dir.path(), "default").unwrap();
/// // PEFT's `PeftModel.from_pretrained(model, dir)`: frozen for inference...
/// let loaded = PeftModel::from_pretrained(base(), dir.path(), false).unwrap();
/// assert_eq!(loaded.adapter_names(), ["default"]);
/// assert_eq!(loaded.base_model_name(), Some("org/tiny"));
/// assert_eq!(loaded.trainable_report().trainable, 0);
/// // ...or, with `is_trainable=True`, to train further.
/// let resumed = PeftModel::from_pretrained(base(), dir.path(), true).unwrap();
/// assert_eq!(resumed.trainable_report().trainable, 4 + 4 * 2 + 2);
/// ```
pub fn get_peft_model<M: Adaptable + Module>(
    model: M,
    method: &dyn PeftMethod,
) -> Result<PeftModel<M>> {
    let mut peft = PeftModel::new(model);
    peft.add_adapter("default", method)?;
    Ok(peft)
}
