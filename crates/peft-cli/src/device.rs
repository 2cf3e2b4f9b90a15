//! `--device` and `--dtype`: where a model runs and in which precision its frozen base is kept,
//! and `burn-peft devices`, which lists the devices this build can use.

use anyhow::{Context, Result};
use burn::tensor::{Device, FloatDType};
use clap::Args;
use peft_core::PeftModel;
use peft_core::precision::BaseDType;
use peft_models::HfModel;
use peft_train::device::{self as devices, DEVICE_NAMES};

/// `--device` and `--dtype`, shared by the subcommands that run a model.
#[derive(Args, Debug, Clone)]
pub struct RunOn {
    /// Backend: `flex` (CPU), `cuda[:N]` or `vulkan[:N]` (`burn-peft devices` lists them).
    #[arg(long, default_value = "flex")]
    pub device: String,
    /// Precision of the frozen base weights: `f32`, `f16`, `bf16`, or quantized (QLoRA):
    /// `nf4`, `q8` (adapters stay f32).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub dtype: BaseDType,
}

/// clap's parser for `--dtype`.
pub fn parse_dtype(s: &str) -> Result<BaseDType, String> {
    s.parse::<BaseDType>().map_err(|e| e.to_string())
}

/// The device named on the command line or in a config.
pub fn parse(name: &str) -> Result<Device> {
    Ok(devices::open(name)?)
}

/// Keep the frozen base weights of `model` in `dtype` (after its adapters are loaded), saying
/// so on stderr; an error when `device` cannot compute in it
/// ([`apply_base_dtype`](peft_models::base_dtype::apply_base_dtype), the rule `serve` uses too).
pub fn cast_base(model: &mut PeftModel<HfModel>, dtype: BaseDType, device: &Device) -> Result<()> {
    let context = || format!("--dtype {dtype} on {}", devices::describe(device));
    let report =
        peft_models::base_dtype::apply_base_dtype(model, dtype, device).with_context(context)?;
    if report.cast.tensors > 0 {
        eprintln!("{report}");
    }
    Ok(())
}

/// Arguments of `burn-peft devices`.
#[derive(Args, Debug)]
pub struct DevicesArgs {}

/// `burn-peft devices`: every device of this build, with the half precisions it computes in.
pub fn run(_args: DevicesArgs) -> Result<()> {
    let support = |device: &Device| {
        let yes = |d: FloatDType| {
            if device.supports_dtype(d) {
                "yes"
            } else {
                "no"
            }
        };
        format!(
            "f16: {}, bf16: {}",
            yes(FloatDType::F16),
            yes(FloatDType::BF16)
        )
    };
    println!("flex (CPU)  {}", support(&Device::flex()));
    if cfg!(feature = "cuda") {
        println!("cuda:N (CUDA devices; not enumerated here)");
    } else {
        println!("cuda: not in this build (rebuild with --features cuda)");
    }
    if !cfg!(any(feature = "vulkan", feature = "wgpu")) {
        println!("vulkan: not in this build (rebuild with --features vulkan, or wgpu)");
        return Ok(());
    }
    let compiler = if cfg!(feature = "vulkan") {
        "SPIR-V"
    } else {
        "WGSL"
    };
    println!("vulkan: kernels compiled to {compiler}");
    let adapters = devices::vulkan_adapters();
    if adapters.is_empty() {
        println!("vulkan: {}", devices::DeviceError::NoVulkanAdapter);
    }
    for (i, line) in adapters.iter().enumerate() {
        let name = format!("vulkan:{i}");
        match devices::open(&name) {
            Ok(device) => println!("{line}  {}", support(&device)),
            Err(_) => println!("{line}"),
        }
    }
    println!("names: {DEVICE_NAMES}; `vulkan` is vulkan:0");
    Ok(())
}
