//! `burn-peft`: parameter-efficient fine-tuning from the command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod device;
mod forward;
mod tensors;

/// Parameter-efficient fine-tuning (LoRA, prefix tuning) for Burn, with Hugging Face PEFT
/// adapters.
#[derive(Parser, Debug)]
#[command(name = "burn-peft", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a model (optionally with a PEFT adapter) on inputs from a safetensors file and write
    /// its outputs to another; used for numeric checks against transformers + PEFT.
    Forward(forward::ForwardArgs),
}

/// Exit codes: 0 success, 1 failure while running, 2 bad input or usage.
pub const EXIT_BAD_INPUT: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Forward(args) => forward::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            let bad_input = err.chain().any(|c| {
                c.downcast_ref::<tensors::InputError>().is_some()
                    || c.downcast_ref::<peft_core::PeftError>().is_some()
                    || c.downcast_ref::<peft_models::ModelError>().is_some()
            });
            ExitCode::from(if bad_input { EXIT_BAD_INPUT } else { 1 })
        }
    }
}
