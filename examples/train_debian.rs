//! LoRA (r 8 on query/value) on the real all-MiniLM-L6-v2 with the shipped Debian-sections
//! data, through the library trainer. Prints steps/s and held-out accuracy.
//!
//! `cargo run --release --example train_debian -- [MAX_STEPS] [EPOCHS]` (MiniLM must be in the HF
//! cache: `scripts/fetch-minilm.sh`).

use std::path::Path;

use burn::tensor::Device;
use burn_peft::models::{Task, from_pretrained};
use burn_peft::prelude::*;
use burn_peft::train::data::{DataConfig, TaskKind, load_examples};
use burn_peft::train::{TrainConfig, TrainOptions, Trainer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let max_steps: Option<u64> = args.next().and_then(|s| s.parse().ok());
    let epochs: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2);
    let device = Device::flex().autodiff();
    device.seed(42);
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data");
    let cfg = DataConfig {
        max_length: 64,
        ..Default::default()
    };
    let base = from_pretrained(
        "sentence-transformers/all-MiniLM-L6-v2",
        Task::Encoder,
        &device,
    )?;
    let tokenizer = base.tokenizer.clone().ok_or("no tokenizer.json")?;
    let (train, labels) = load_examples(
        &data.join("train.jsonl"),
        TaskKind::Classification,
        &cfg,
        &tokenizer,
        None,
        None,
    )?;
    let labels = labels.ok_or("no labels")?;
    let (eval, _) = load_examples(
        &data.join("eval.jsonl"),
        TaskKind::Classification,
        &cfg,
        &tokenizer,
        None,
        Some(&labels),
    )?;
    let model = from_pretrained(
        "sentence-transformers/all-MiniLM-L6-v2",
        Task::SequenceClassification {
            num_labels: labels.len(),
        },
        &device,
    )?;
    let mut peft = PeftModel::new(model.model);
    let lora = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.1,
        target_modules: Some(["query", "value"].into()),
        modules_to_save: Some(vec!["classifier".into()]),
        ..Default::default()
    };
    peft.add_adapter("default", &lora)?;
    println!("{}", peft.trainable_report());
    let mut trainer = Trainer::builder(
        peft,
        Task::SequenceClassification {
            num_labels: labels.len(),
        },
    )
    .adapters(["default"])
    .config(TrainConfig {
        epochs,
        max_steps,
        batch_size: 16,
        learning_rate: 1e-3,
        warmup_ratio: 0.06,
        ..Default::default()
    })
    .output_dir("out/train_debian")
    .device(device)
    .pad_id(tokenizer.pad_id() as i64)
    .build()?;
    // A second run of the example starts over in its folder (`burn-peft train --overwrite`).
    let options = TrainOptions {
        overwrite: true,
        ..TrainOptions::default()
    };
    let report = trainer.train_with(&train, Some(&eval), None, options)?;
    let eval = report.last_eval.as_ref().ok_or("no evaluation")?;
    println!(
        "{} steps, {:.2} steps/s, {:.0} tokens/s; eval accuracy {:.4}, macro-F1 {:.4}",
        report.steps,
        report.steps_per_sec,
        report.tokens_per_sec,
        eval.accuracy.unwrap_or(f64::NAN),
        eval.macro_f1.unwrap_or(f64::NAN)
    );
    Ok(())
}
