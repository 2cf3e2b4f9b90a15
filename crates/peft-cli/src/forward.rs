//! `burn-peft forward`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use peft_models::{Task, from_pretrained};

use crate::adapters::{AdapterArg, RowNames};
use crate::tensors::{read_inputs, write_outputs};

/// Arguments of `burn-peft forward`.
#[derive(Args, Debug)]
pub struct ForwardArgs {
    /// Model folder (config.json + safetensors) or Hugging Face hub id.
    #[arg(long)]
    model: String,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors), as `DIR` or
    /// `NAME=DIR`; repeat it for several adapters, which then run together on every row unless
    /// `--adapter-per-row` gives each row its own.
    #[arg(long, value_parser = crate::adapters::parse_adapter)]
    adapter: Vec<AdapterArg>,
    /// One adapter name (or `__base__`) per input row, comma-separated: a mixed-adapter batch
    /// (PEFT's `adapter_names`), one pass over the base for all rows.
    #[arg(long, value_parser = crate::adapters::parse_rows)]
    adapter_per_row: Option<RowNames>,
    /// Merge the adapters into the base weights before running.
    #[arg(long, requires = "adapter")]
    merge: bool,
    /// Inputs (safetensors): int64 `input_ids` [batch, seq], optional `attention_mask`,
    /// `token_type_ids`; or, for an image model, float32 `pixel_values` [batch, channels,
    /// height, width].
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write float32 outputs (`logits`, or `last_hidden_state` + `sentence_embedding`,
    /// `pooler_output` where the model has it).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    run_on: crate::device::RunOn,
}

/// Run the subcommand.
pub fn run(args: ForwardArgs) -> Result<()> {
    let device = crate::device::parse(&args.run_on.device)?;
    let inputs = read_inputs(&args.inputs, &device)?;
    let pretrained = from_pretrained(&args.model, Task::Auto, &device)
        .with_context(|| format!("loading model `{}`", args.model))?;
    let (mut model, ctx) = crate::adapters::load(
        pretrained.model,
        &args.adapter,
        args.merge,
        args.adapter_per_row.as_ref().map(|r| r.0.as_slice()),
        &device,
    )?;
    crate::device::cast_base(&mut model, args.run_on.dtype, &device)?;
    let outputs = model.model().forward_with(&inputs, &ctx)?;
    let mut tensors = BTreeMap::new();
    if let Some(t) = outputs.logits {
        tensors.insert("logits".to_string(), t.into_data());
    }
    if let Some(t) = outputs.class_logits {
        tensors.insert("logits".to_string(), t.into_data());
    }
    if let Some(t) = outputs.last_hidden_state {
        tensors.insert("last_hidden_state".to_string(), t.into_data());
    }
    if let Some(t) = outputs.sentence_embedding {
        tensors.insert("sentence_embedding".to_string(), t.into_data());
    }
    if let Some(t) = outputs.pooler_output {
        tensors.insert("pooler_output".to_string(), t.into_data());
    }
    let summary: Vec<String> = tensors
        .iter()
        .map(|(name, data)| format!("{name} {:?}", data.shape().as_slice()))
        .collect();
    write_outputs(&args.output, tensors)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!(
        "wrote {}: {}",
        crate::config::normalized(&args.output).display(),
        summary.join(", ")
    );
    Ok(())
}
