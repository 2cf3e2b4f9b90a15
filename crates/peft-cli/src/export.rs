//! `burn-peft export --format gguf`: hand what was fine-tuned here to llama.cpp. With a GGUF
//! base, a LoRA bundle becomes llama.cpp's own LoRA adapter file (`llama-cli -m base.gguf
//! --lora adapter.gguf`), or with `--merged` the base with the adapter folded in becomes a GGUF
//! model (F16, Q8_0, ...).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use peft_core::bundle::{self, TensorFile, read_config};
use peft_core::{PeftError, PeftModel, peft_type_of};
use peft_lora::LoraConfig;
use peft_models::gguf::{GgufFile, LoraPair, is_gguf, write_lora_adapter, write_merged};
use peft_models::quantized::QuantFormat;
use peft_models::{Task, from_pretrained, hf_tensors};

use crate::UsageError;
use crate::tensors::InputError;

/// What to write.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportFormat {
    /// llama.cpp's GGUF.
    Gguf,
}

/// Arguments of `burn-peft export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "gguf")]
    format: ExportFormat,
    /// The base model as a GGUF file (the adapter's tensors are named after its tensors).
    #[arg(long)]
    model: String,
    /// PEFT LoRA bundle (adapter_config.json + adapter_model.safetensors or .bin).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Write the base with the adapter merged in as a GGUF model, instead of the adapter alone.
    #[arg(long)]
    merged: bool,
    /// Weight format of a merged model: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0.
    #[arg(long, default_value = "f16")]
    outtype: String,
    /// The file to write (replaced atomically).
    #[arg(long)]
    output: PathBuf,
}

fn input_error(file: &Path, message: impl Into<String>) -> InputError {
    InputError {
        file: file.to_path_buf(),
        message: message.into(),
    }
}

/// Run the subcommand.
pub fn run(args: ExportArgs) -> Result<()> {
    let ExportFormat::Gguf = args.format;
    if !is_gguf(&args.model) {
        return Err(UsageError(format!(
            "--model `{}` is not a .gguf file; llama.cpp adapters and models are written \
             beside a GGUF base (convert a Hugging Face folder with llama.cpp's \
             convert_hf_to_gguf.py, or `burn-peft merge` it and convert the merged folder)",
            args.model
        ))
        .into());
    }
    let start = Instant::now();
    if args.merged {
        export_merged(&args)?;
    } else {
        let adapter = args.adapter.as_deref().ok_or_else(|| {
            UsageError(
                "pass --adapter DIR (the LoRA bundle to export), or --merged to write the \
                 model"
                    .into(),
            )
        })?;
        let count = export_adapter(Path::new(&args.model), adapter, &args.output)?;
        println!(
            "wrote llama.cpp LoRA adapter {} ({count} adapted matrices) for {}",
            args.output.display(),
            args.model
        );
    }
    println!("done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// The LoRA bundle `adapter` as llama.cpp's LoRA GGUF for `base`; the number of pairs.
fn export_adapter(base: &Path, adapter: &Path, output: &Path) -> Result<usize> {
    let loaded = read_config(adapter)?;
    let method = peft_type_of(loaded.method.as_ref());
    let config_file = adapter.join(bundle::CONFIG_FILE);
    if method != "LORA" {
        return Err(PeftError::NotSupportedByMethod {
            adapter: adapter.display().to_string(),
            method: method.into(),
            reason: "llama.cpp adapters are LoRA only; merge this adapter (`burn-peft export \
                     --merged`) to run it in llama.cpp"
                .into(),
        }
        .into());
    }
    let text = std::fs::read_to_string(&config_file)
        .with_context(|| format!("reading {}", config_file.display()))?;
    let config: LoraConfig = serde_json::from_str(&text)
        .map_err(|e| input_error(&config_file, format!("not a LoRA config: {e}")))?;
    let refuse = |what: &str| -> anyhow::Error {
        input_error(
            &config_file,
            format!(
                "{what}, which llama.cpp's LoRA adapters cannot carry; write the merged model \
                 instead (`--merged`)"
            ),
        )
        .into()
    };
    if config.use_dora {
        return Err(refuse("the adapter is DoRA (use_dora: true)"));
    }
    if config
        .modules_to_save
        .as_ref()
        .is_some_and(|m| !m.is_empty())
    {
        return Err(refuse("the adapter saves whole modules (modules_to_save)"));
    }
    let (weights_file, mut weights) = TensorFile::read_bundle_weights(adapter)?;
    let shapes = weights.shapes();
    let mut pairs = Vec::new();
    for (key, shape) in &shapes {
        if key.contains("lora_embedding_") {
            return Err(refuse(&format!("it adapts an embedding (`{key}`)")));
        }
        let Some(stem) = key.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let module = stem.strip_prefix("base_model.model.").unwrap_or(stem);
        let b_key = format!("{stem}.lora_B.weight");
        let (&[r, d_in], Some(b_shape)) = (shape.as_slice(), shapes.get(&b_key)) else {
            return Err(input_error(
                &weights_file,
                format!("`{key}` is {shape:?} without a matching 2-D `{b_key}`"),
            )
            .into());
        };
        let &[d_out, rb] = b_shape.as_slice() else {
            return Err(input_error(&weights_file, format!("`{b_key}` is {b_shape:?}")).into());
        };
        if rb != r {
            return Err(input_error(
                &weights_file,
                format!("`{key}` has rank {r} but `{b_key}` has {rb}"),
            )
            .into());
        }
        let a = weights.take(key, &[r, d_in])?;
        let b = weights.take(&b_key, &[d_out, r])?;
        let (_, alpha) = config.rank_and_alpha(module)?;
        let to_vec = |d: burn::tensor::TensorData, k: &str| -> Result<Vec<f32>> {
            d.try_into_vec::<f32>()
                .map_err(|e| input_error(&weights_file, format!("`{k}`: {e:?}")).into())
        };
        pairs.push(LoraPair {
            module: module.to_string(),
            a: to_vec(a, key)?,
            b: to_vec(b, &b_key)?,
            rank: r,
            scaling: config.scaling_for(r, alpha),
        });
    }
    if pairs.is_empty() {
        return Err(input_error(&weights_file, "no lora_A / lora_B pairs in this bundle").into());
    }
    let base_file = GgufFile::open(base)?;
    let alpha = if config.lora_alpha > 0.0 {
        config.lora_alpha
    } else {
        config.r as f64
    };
    let name = adapter.file_name().and_then(|n| n.to_str());
    write_lora_adapter(&base_file, &pairs, alpha, name, output)
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(pairs.len())
}

/// The base (with `--adapter` merged in when given) as a GGUF model.
fn export_merged(args: &ExportArgs) -> Result<()> {
    let format: QuantFormat = args.outtype.to_ascii_uppercase().parse().map_err(|_| {
        UsageError(format!(
            "--outtype `{}` is not a format; use f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0",
            args.outtype
        ))
    })?;
    use QuantFormat::*;
    if !matches!(format, F32 | F16 | BF16 | Q8_0 | Q5_1 | Q5_0 | Q4_1 | Q4_0) {
        return Err(UsageError(format!(
            "--outtype {format} is not written here; use f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 \
             or q4_0 (and llama.cpp's llama-quantize for K-quants)"
        ))
        .into());
    }
    if let Some(adapter) = &args.adapter {
        let loaded = read_config(adapter)?;
        if !loaded.method.mergeable() {
            return Err(PeftError::NotSupportedByMethod {
                adapter: adapter.display().to_string(),
                method: peft_type_of(loaded.method.as_ref()).into(),
                reason: "this method has no weight delta to merge".into(),
            }
            .into());
        }
    }
    let device = burn::tensor::Device::flex();
    let pretrained = from_pretrained(&args.model, Task::CausalLm, &device)
        .with_context(|| format!("loading model `{}`", args.model))?;
    let mut model = PeftModel::new(pretrained.model);
    if let Some(adapter) = &args.adapter {
        model
            .load_adapter(adapter, "default")
            .with_context(|| format!("loading adapter {}", adapter.display()))?;
    }
    let merged = model.merge_and_unload().context("merging the adapter")?;
    let tensors = hf_tensors(&merged, &pretrained.dir)?;
    let base_file = GgufFile::open(Path::new(&args.model))?;
    write_merged(&base_file, tensors, format, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let size = std::fs::metadata(&args.output)
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "wrote {} ({format} weights, {:.1} MiB){}",
        args.output.display(),
        size as f64 / (1024.0 * 1024.0),
        match &args.adapter {
            Some(a) => format!(", {} merged in", a.display()),
            None => String::new(),
        }
    );
    Ok(())
}
