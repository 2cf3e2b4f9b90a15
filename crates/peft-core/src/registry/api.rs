//! The public adapter API of [`PeftModel`](crate::PeftModel) and
//! [`PeftModule`](crate::burn_modules::PeftModule), generated for both from this one definition
//! so that the two keep the same names, signatures and documentation. Each method hands over to
//! the shared rules ([`rules`](super::rules)) or the registry.

/// Implement the shared adapter API on `$ty<M>` (a struct with fields `model: M` and
/// `registry: AdapterRegistry`, implementing `AdapterHost` and an inherent `new` and `unload`).
/// `$setup` is the hidden start of each doc example: it binds `base` (an unwrapped model) and
/// `model` (`$ty::new(base.clone())`).
macro_rules! adapter_api {
    ($ty:ident, [$($bound:tt)+], $setup:literal) => {
        impl<M: $($bound)+> $ty<M> {
            #[doc = concat!(
                "PEFT's `PeftModel.from_pretrained(model, dir, is_trainable)`: wrap `base` and ",
                "load the PEFT bundle in `dir` as adapter `default`, active. `trainable: false` ",
                "loads it frozen for inference (whatever its config's `inference_mode`), `true` ",
                "to train it further. The base model's name is taken from the bundle's ",
                "`base_model_name_or_path`, so a later save writes it again.\n\n",
                "See [`get_peft_model`](crate::get_peft_model) for a round trip; a folder ",
                "without a bundle is an error:\n\n```\n", $setup, "\nlet missing = ",
                stringify!($ty), "::from_pretrained(base, \"no/such/bundle\", false);\n",
                "assert!(missing.is_err());\n```"
            )]
            pub fn from_pretrained(
                base: M,
                dir: impl AsRef<std::path::Path>,
                trainable: bool,
            ) -> $crate::Result<Self> {
                let mut model = Self::new(base);
                $crate::registry::rules::from_pretrained(&mut model, dir.as_ref(), trainable)?;
                Ok(model)
            }

            /// Record the base model's hub id or folder; written as `base_model_name_or_path`.
            pub fn with_base_model_name(mut self, name: impl Into<String>) -> Self {
                self.registry.base_model_name_or_path = Some(name.into());
                self
            }

            /// The base model's hub id or folder, as saved configs record it.
            pub fn base_model_name(&self) -> Option<&str> {
                self.registry.base_model_name_or_path.as_deref()
            }

            /// The wrapped model; its forward runs the active adapters.
            pub fn model(&self) -> &M {
                &self.model
            }

            /// Replace the wrapped model by `f(model)`, e.g. an optimizer step:
            /// `peft.update(|m| optim.step(lr, m, grads))`. Parameter ids must be kept, which
            /// Burn's optimizers and mappers do.
            pub fn update(&mut self, f: impl FnOnce(M) -> M) {
                let model = self.model.clone();
                self.model = f(model);
            }

            /// The names of every adapter, in the order they were added.
            pub fn adapter_names(&self) -> Vec<String> {
                self.registry.names()
            }

            /// The active adapters.
            pub fn active_adapters(&self) -> &[String] {
                &self.registry.active
            }

            /// Whether adapters are disabled (the base model runs alone).
            pub fn adapters_disabled(&self) -> bool {
                self.registry.disabled
            }

            /// The config of adapter `name`, as saved.
            pub fn adapter_config(&self, name: &str) -> Option<&dyn $crate::PeftMethod> {
                self.registry.get(name)
            }

            /// Ids of the parameters that train (the active adapters' tensors, their
            /// `modules_to_save` copies and biases per `bias`, or every parameter with
            /// [`set_train_base`](Self::set_train_base)); the optimizer sees gradients for
            /// these only.
            pub fn trainable_param_ids(&self) -> &std::collections::HashSet<burn::module::ParamId> {
                &self.registry.trainable
            }

            /// PEFT's `print_trainable_parameters` numbers: every parameter of the model, base
            /// and adapters, and those that train.
            pub fn trainable_report(&self) -> $crate::TrainableReport {
                $crate::registry::AdapterHost::param_report(self)
            }

            /// Inject adapter `name` built from `method` into every module it targets (PEFT's
            /// matching rules), freeze every base parameter and make the adapter trainable.
            /// The first adapter added becomes the active one (as in PEFT). On any error the
            /// model is left as it was.
            ///
            /// A config that names no `target_modules` takes PEFT's default for the model type
            /// ([`Adaptable::default_targets`](crate::Adaptable::default_targets)) and is saved
            /// with it. A config whose `task_type` is `SEQ_CLS` gets PEFT's heads `classifier`
            /// and `score` appended to its `modules_to_save`, as PEFT's
            /// `PeftModelForSequenceClassification` does: the head trains and is saved with
            /// the adapter, unless another adapter of the model already saves one.
            pub fn add_adapter(
                &mut self,
                name: &str,
                method: &dyn $crate::PeftMethod,
            ) -> $crate::Result<$crate::InjectionReport> {
                $crate::registry::rules::add_adapter(self, name, method)
            }

            /// Remove adapter `name` everywhere (merged adapters are unmerged first). If it was
            /// active, the remaining active adapters stay active, or else the first remaining
            /// adapter becomes active.
            pub fn delete_adapter(&mut self, name: &str) -> $crate::Result<()> {
                $crate::registry::rules::delete_adapter(self, name)
            }

            /// Activate exactly `names` (one or several), in this order. Merged adapters are
            /// unmerged first, as in PEFT. Only active adapters train.
            pub fn set_adapters(&mut self, names: &[&str]) -> $crate::Result<()> {
                $crate::registry::rules::set_adapters(self, names)
            }

            /// Activate the single adapter `name`.
            pub fn set_adapter(&mut self, name: &str) -> $crate::Result<()> {
                self.set_adapters(&[name])
            }

            /// Run the base model alone (adapters and `modules_to_save` copies are bypassed).
            /// Merged adapters are unmerged first.
            pub fn disable_adapters(&mut self) -> $crate::Result<()> {
                $crate::registry::rules::set_disabled(self, true)
            }

            /// Undo [`disable_adapters`](Self::disable_adapters).
            pub fn enable_adapters(&mut self) -> $crate::Result<()> {
                $crate::registry::rules::set_disabled(self, false)
            }

            #[doc = concat!(
                "Let adapter `name` train when active (`true`), or keep it frozen (`false`): ",
                "PEFT's `is_trainable`. Added adapters train; loaded ones whose config says ",
                "`inference_mode: true` start frozen ([`load_adapter`](Self::load_adapter)).",
                "\n\n```\n", $setup, "\n",
                "assert!(model.set_adapter_trainable(\"missing\", true).is_err());\n",
                "assert!(!model.is_adapter_trainable(\"missing\"));\n```"
            )]
            pub fn set_adapter_trainable(&mut self, name: &str, trainable: bool) -> $crate::Result<()> {
                $crate::registry::rules::set_adapter_trainable(self, name, trainable)
            }

            /// Whether adapter `name` trains when active (see
            /// [`set_adapter_trainable`](Self::set_adapter_trainable)).
            pub fn is_adapter_trainable(&self, name: &str) -> bool {
                self.registry.get(name).is_some() && !self.registry.frozen.iter().any(|n| n == name)
            }

            #[doc = concat!(
                "Train every parameter of the model (full fine-tuning: the baseline PEFT ",
                "methods are compared against), with or without adapters; `false` returns to ",
                "training adapters only.\n\n```\n", $setup, "\n",
                "model.set_train_base(true).unwrap();\n",
                "// The 4x4 weight and the bias.\n",
                "assert_eq!(model.trainable_report().trainable, 4 * 4 + 4);\n```"
            )]
            pub fn set_train_base(&mut self, train: bool) -> $crate::Result<()> {
                $crate::registry::rules::set_train_base(self, train)
            }

            /// Whether base parameters train: all of them
            /// ([`set_train_base`](Self::set_train_base)) or some modules' (`set_train_modules`
            /// on [`PeftModel`](crate::PeftModel)); the trainer then saves the whole model.
            pub fn trains_base(&self) -> bool {
                self.registry.train_base || !self.registry.train_modules.is_empty()
            }

            /// Whether some adapter is folded into the base weights.
            pub fn is_merged(&self) -> bool {
                $crate::registry::AdapterHost::is_merged(self)
            }

            /// Fold every active adapter into the base weights (PEFT's `merge_adapter`);
            /// forward then costs what the base model costs. Fails, changing nothing, if
            /// adapters are disabled or an active adapter's method cannot merge.
            pub fn merge(&mut self) -> $crate::Result<()> {
                $crate::registry::rules::merge(self)
            }

            /// Take every merged adapter back out of the base weights.
            pub fn unmerge(&mut self) -> $crate::Result<()> {
                $crate::registry::AdapterHost::fold(self, $crate::MergeDirection::Unmerge)
            }

            /// Merge the active adapters (enabling them first), drop every adapter and return
            /// the plain model, its type unchanged: no added latency (see
            /// [`unload`](Self::unload)).
            pub fn merge_and_unload(mut self) -> $crate::Result<M> {
                $crate::registry::rules::merge_for_unload(&mut self)?;
                Ok(self.unload())
            }

            /// The tensors of adapter `name` as they go into `adapter_model.safetensors`
            /// (`base_model.model.<module path>.<tensor>`, in the file's layout), with the
            /// values the model holds now.
            pub fn adapter_tensors(
                &self,
                name: &str,
            ) -> $crate::Result<std::collections::BTreeMap<String, burn::tensor::TensorData>> {
                $crate::registry::AdapterHost::export(self, name)
            }

            /// Save adapter `name` as a PEFT bundle (`adapter_config.json` +
            /// `adapter_model.safetensors`) under `dir` (`dir` itself for `default`, else
            /// `dir/<name>`), atomically: on any failure the previous bundle is left as it was.
            pub fn save_adapter(
                &self,
                dir: impl AsRef<std::path::Path>,
                name: &str,
            ) -> $crate::Result<()> {
                $crate::registry::rules::save_adapter(self, dir.as_ref(), name)
            }

            /// Load the PEFT bundle in `dir` (`adapter_config.json` +
            /// `adapter_model.safetensors`, or PEFT's `adapter_model.bin` pickle) as adapter
            /// `name`. Every tensor must be consumed and have the right shape
            /// ([`PeftError::MissingTensor`](crate::PeftError::MissingTensor),
            /// [`UnexpectedTensor`](crate::PeftError::UnexpectedTensor),
            /// [`ShapeMismatch`](crate::PeftError::ShapeMismatch) name the file and key); on any
            /// error the model is left as it was.
            ///
            /// As `PeftModel.from_pretrained(..., is_trainable=False)`, an adapter whose config
            /// says `inference_mode: true` (PEFT writes that on every save) is loaded frozen:
            /// it runs but does not train.
            /// [`load_adapter_trainable`](Self::load_adapter_trainable) loads one to train
            /// further.
            pub fn load_adapter(
                &mut self,
                dir: impl AsRef<std::path::Path>,
                name: &str,
            ) -> $crate::Result<$crate::LoadReport> {
                $crate::registry::rules::load_adapter(self, dir.as_ref(), name, None)
            }

            /// [`load_adapter`](Self::load_adapter) for training: the adapter trains when
            /// active, whatever its config's `inference_mode` (PEFT's `is_trainable=True`).
            pub fn load_adapter_trainable(
                &mut self,
                dir: impl AsRef<std::path::Path>,
                name: &str,
            ) -> $crate::Result<$crate::LoadReport> {
                $crate::registry::rules::load_adapter(self, dir.as_ref(), name, Some(true))
            }
        }
    };
}

pub(crate) use adapter_api;
