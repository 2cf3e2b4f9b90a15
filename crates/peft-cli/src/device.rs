//! `--device` and `--dtype`: where a model runs and in which precision its frozen base is kept,
//! and `burn-peft devices`, which lists the devices this build can use.

use anyhow::{Context, Result};
use burn::tensor::{Device, FloatDType};
use clap::Args;
use peft_core::PeftModel;
use peft_core::precision::{BaseDType, cast_frozen_base, quantize_frozen_base};
use peft_models::HfModel;
use peft_models::quantized::QuantFormat;
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
/// so on stderr; an error when `device` cannot compute in it.
pub fn cast_base(model: &mut PeftModel<HfModel>, dtype: BaseDType, device: &Device) -> Result<()> {
    let context = || format!("--dtype {dtype} on {}", devices::describe(device));
    if dtype.is_quantized() {
        let format = match dtype {
            BaseDType::Nf4 => QuantFormat::Nf4,
            _ => QuantFormat::Q8_0,
        };
        let report = quantize_frozen_base(model, dtype, &|weight| {
            // A layer whose rows are not whole blocks stays dense: Burn-layout `[in, out]`, so
            // a row (one output) holds `in` values.
            let [d_in, _] = weight.dims();
            if format.row_bytes(d_in).is_none() {
                return Ok(None);
            }
            peft_models::quantized::quantize_linear(weight, format)
                .map(Some)
                .map_err(|e| e.to_string())
        })
        .with_context(context)?;
        eprintln!(
            "base weights in {dtype} ({}): {} linear layers, {:.1} M weights (embeddings, the \
             output and classification heads, adapters and optimizer state stay f32)",
            format.name(),
            report.tensors,
            report.elements as f64 / 1e6
        );
        if report.skipped > 0 {
            eprintln!(
                "  {} linear layers stay f32: their inputs are not a multiple of {}'s {}-value \
                 blocks",
                report.skipped,
                format.name(),
                format.block_size()
            );
        }
        return Ok(());
    }
    let report = cast_frozen_base(model, dtype, device).with_context(context)?;
    if report.tensors > 0 {
        eprintln!(
            "base weights in {dtype}: {} tensors, {:.1} MiB (adapters and optimizer state stay f32)",
            report.tensors,
            (report.elements * dtype.size()) as f64 / (1024.0 * 1024.0)
        );
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
