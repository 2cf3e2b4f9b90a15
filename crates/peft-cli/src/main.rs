//! `burn-peft`: parameter-efficient fine-tuning from the command line.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod adapters;
mod bench;
mod combine;
mod config;
mod device;
mod eval;
mod eval_chat;
mod export;
mod forward;
mod generate;
mod inspect;
mod merge;
mod methods;
mod serve;
mod tensors;
mod train;

/// Parameter-efficient fine-tuning (LoRA, DoRA, IA3, prefix tuning) for Burn, with Hugging Face
/// PEFT adapters.
#[derive(Parser, Debug)]
#[command(name = "burn-peft", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fine-tune a model as a YAML config says; saves the adapter and prints held-out metrics.
    Train(train::TrainArgs),
    /// Evaluate a model with an adapter on a labelled data file (classification, causal LM
    /// loss, or conversations scored by their generated replies).
    Eval(eval::EvalArgs),
    /// Merge an adapter into its base model and write a full Hugging Face model folder; or fuse
    /// Stable Diffusion LoRA files (kohya / diffusers), each with a weight, into a diffusers
    /// pipeline folder.
    Merge(merge::MergeArgs),
    /// Write a LoRA adapter as llama.cpp's LoRA GGUF, or a merged model as a GGUF file, for a
    /// GGUF base (`--format gguf`).
    Export(export::ExportArgs),
    /// Describe an adapter bundle; with `--model`, check it against that base model.
    Inspect(inspect::InspectArgs),
    /// Generate text with a causal LM, optionally with an adapter.
    Generate(generate::GenerateArgs),
    /// Run a model (optionally with a PEFT adapter) on inputs from a safetensors file and write
    /// its outputs to another; used for numeric checks against transformers + PEFT.
    Forward(forward::ForwardArgs),
    /// Combine several LoRA adapters into one (PEFT's add_weighted_adapter: linear, cat, svd,
    /// ties, dare, magnitude_prune, ...) and write it as a PEFT bundle.
    Combine(combine::CombineArgs),
    /// List the devices this build can run on (`--device` names) and their half precisions.
    Devices(device::DevicesArgs),
    /// Time LoRA training steps of a causal LM on synthetic tokens (weights random when the
    /// folder has only a config.json); prints tokens/s and peak device memory as JSON.
    Bench(bench::BenchArgs),
    /// Serve a base model and many adapters over HTTP (OpenAI-compatible completions, chat
    /// completions, embeddings, classification; the request's `model` names the adapter),
    /// batching requests for different adapters into one forward.
    Serve(serve::ServeArgs),
}

/// A command line that cannot work as given (exit code 2); says what to pass instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit codes: 0 success, 1 failure while running, 2 bad input or usage.
pub const EXIT_BAD_INPUT: u8 = 2;

fn main() -> ExitCode {
    let help = format!(
        "Adapter methods (peft_type): {}",
        methods::registered().join(", ")
    );
    let matches = Cli::command().after_help(help).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    let result = match cli.command {
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Export(args) => export::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Forward(args) => forward::run(args),
        Command::Combine(args) => combine::run(args),
        Command::Devices(args) => device::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", message(&err));
            let bad_input = err.chain().any(|c| {
                c.downcast_ref::<tensors::InputError>().is_some()
                    || c.downcast_ref::<UsageError>().is_some()
                    || c.downcast_ref::<peft_serve::ServeError>()
                        .is_some_and(|e| !matches!(e, peft_serve::ServeError::Io(_)))
                    || c.downcast_ref::<config::ConfigError>().is_some()
                    || c.downcast_ref::<peft_lora::kohya::FuseError>()
                        .is_some_and(|e| e.is_bad_input())
                    || c.downcast_ref::<peft_lora::kohya::CombineError>()
                        .is_some_and(|e| e.is_bad_input())
                    || c.downcast_ref::<peft_core::PeftError>().is_some()
                    || c.downcast_ref::<peft_models::ModelError>().is_some()
                    || c.downcast_ref::<peft_train::data::DataError>().is_some()
                    || c.downcast_ref::<peft_train::device::DeviceError>()
                        .is_some()
                    || c.downcast_ref::<peft_core::precision::PrecisionError>()
                        .is_some()
                    || c.downcast_ref::<peft_train::TrainError>()
                        .is_some_and(|e| e.is_bad_input())
            });
            ExitCode::from(if bad_input { EXIT_BAD_INPUT } else { 1 })
        }
    }
}

/// The error and its causes, `: `-joined as `{:#}` prints them, without a cause whose text the
/// message already holds (an I/O error that names its file and shows its OS error would
/// otherwise print that OS error twice).
fn message(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
