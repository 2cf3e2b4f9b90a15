#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub use peft_core as core;
pub use peft_ia3 as ia3;
pub use peft_lora as lora;
pub use peft_models as models;
pub use peft_ops as ops;
pub use peft_prefix as prefix;
pub use peft_train as train;

/// The types most programs need.
pub mod prelude {
    pub use peft_core::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
    pub use peft_core::{Adaptable, PeftConfigBase, PeftMethod, PeftModel, TargetModules};
    pub use peft_ia3::Ia3Config;
    pub use peft_lora::{InitLoraWeights, LoraConfig};
    pub use peft_prefix::PrefixTuningConfig;
}

/// The guides of `docs/`, one module each (the index is `docs/README.md`). Their Rust examples
/// run as doctests: `cargo test --doc -p burn-peft`, from a checkout (they read the fixtures in
/// `tests/fixtures/`).
///
/// The guide texts are read only by rustdoc (`cfg(doc)`, `cfg(doctest)`), so a build of the
/// library never depends on `docs/`.
#[cfg_attr(any(doc, doctest), doc = include_str!("../docs/README.md"))]
pub mod guides {
    /// LoRA, DoRA, (IA)³, prefix tuning; `PeftModel`; matching rules; PEFT bundles
    /// (`docs/methods.md`).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/methods.md"))]
    pub mod methods {}

    /// The demo, run configs, the trainer, a training loop of your own (`docs/training.md`).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/training.md"))]
    pub mod training {}

    /// The model zoo, loading, the hub cache, `forward` (`docs/models.md`).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/models.md"))]
    pub mod models {}

    /// Image models: LoRA / DoRA on convolutions, ViT, ResNet, MobileNetV2, image data,
    /// Stable Diffusion LoRA files (`docs/vision.md`).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/vision.md"))]
    pub mod vision {}

    /// GGUF files, QLoRA, export to llama.cpp (`docs/llms.md`).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/llms.md"))]
    pub mod llms {}

    /// Chat templates, conversational data, chat serving, the chat demo (`docs/chat.md`).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/chat.md"))]
    pub mod chat {}

    /// Several adapters: trained together, active together, one per row
    /// (`docs/multi-adapter.md`).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/multi-adapter.md"))]
    pub mod multi_adapter {}

    /// Combining adapters: `add_weighted_adapter` (`docs/combining.md`).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/combining.md"))]
    pub mod combining {}

    /// `burn-peft serve`: many adapters behind an OpenAI-compatible API (`docs/serving.md`).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/serving.md"))]
    pub mod serving {}

    /// GPU backends, devices, a half-precision base (`docs/gpu.md`).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/gpu.md"))]
    pub mod gpu {}

    /// The `burn-peft` subcommands and their common rules (`docs/command-line.md`).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/command-line.md"))]
    pub mod command_line {}

    /// Every subcommand's `--help`, as the binary prints it (`docs/cli.md`, generated).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/cli.md"))]
    pub mod cli_reference {}

    /// Writing a method as a plugin (`docs/custom-method.md`).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/custom-method.md"))]
    pub mod custom_method {}

    /// Adding a model family (`docs/architectures.md`).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/architectures.md"))]
    pub mod architectures {}

    /// Adapters on a model written with Burn's own layers (`docs/plain-burn-modules.md`).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/plain-burn-modules.md"))]
    pub mod plain_burn_modules {}

    /// Results of the shipped examples; the benchmark result files (`docs/results.md`).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/results.md"))]
    pub mod results {}

    /// The test fixtures and how to regenerate them (`docs/fixtures.md`).
    #[cfg_attr(any(doc, doctest), doc = include_str!("../docs/fixtures.md"))]
    pub mod fixtures {}
}
