//! The registry of architectures. A family is registered by one line of the `architectures!`
//! invocation in `lib.rs`: `module: Variant(model type) => ARCHITECTURE`, naming the family's
//! module (its file, declared by the macro), the [`HfModel`] variant, the family's model (an
//! enum of its heads implementing [`ArchModel`](crate::ArchModel)) and its
//! [`Architecture`](crate::Architecture) (the `model_type` values it reads).
//!
//! The macro generates the family modules, [`HfModel`], its delegation to
//! [`ArchModel`](crate::ArchModel), `From` conversions, and [`ARCHITECTURES`], the table
//! `config.json`'s `model_type` is looked up in. It is the only code that matches on the
//! families, and it matches all of them.

use crate::arch::Architecture;
pub use crate::{ARCHITECTURES, HfModel};

/// Declare the families (see the module documentation); invoked once, in `lib.rs`.
macro_rules! architectures {
    ($( $(#[$doc:meta])* $module:ident: $variant:ident($model:ty) => $arch:expr ),+ $(,)?) => {
        $( $(#[$doc])* pub mod $module; )+

        /// A model of any registered family, with its head. Module paths are Hugging Face
        /// names, so PEFT `target_modules` lists and bundles apply unchanged. What it can do
        /// goes through [`ArchModel`] ([`HfModel::arch`]); its inherent methods are the same
        /// calls.
        // Burn modules cannot be boxed, and a model is built once: the size difference between
        // variants is harmless.
        #[allow(clippy::large_enum_variant)]
        #[derive(burn::module::Module, Debug, peft_core::Adaptable)]
        pub enum HfModel {
            $( $(#[$doc])* $variant($model), )+
        }

        impl HfModel {
            /// This model through the architecture seam.
            pub fn arch(&self) -> &dyn $crate::arch::ArchModel {
                match self {
                    $( HfModel::$variant(m) => m, )+
                }
            }
        }

        $(
            impl From<$model> for HfModel {
                fn from(model: $model) -> Self {
                    HfModel::$variant(model)
                }
            }
        )+

        /// Every registered architecture, in registration order.
        pub static ARCHITECTURES: &[&$crate::arch::Architecture] = &[ $( &$arch, )+ ];
    };
}

/// The architecture that reads `model_type`, if one is registered.
pub fn architecture_for(model_type: &str) -> Option<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .copied()
        .find(|a| a.model_types.contains(&model_type))
}

/// Every `model_type` a registered architecture reads, in registration order.
pub fn model_types() -> Vec<&'static str> {
    ARCHITECTURES
        .iter()
        .flat_map(|a| a.model_types.iter().copied())
        .collect()
}
