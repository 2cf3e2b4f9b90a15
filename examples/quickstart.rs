//! LoRA end to end through the library API, on a model written by hand: inject adapters in one
//! call, train them with the shared [`Trainer`] (evaluation, the best adapter, a held-out test,
//! `results.json`), reload the saved PEFT bundle with `PeftModel::from_pretrained`, merge it
//! away.
//!
//! `cargo run --release --example quickstart [-- OUT_DIR]` (default `out/quickstart`).

use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use burn_peft::core::get_peft_model;
use burn_peft::prelude::*;
use burn_peft::train::data::{Collated, Example};
use burn_peft::train::objective::classifier;
use burn_peft::train::run::TrainOptions;
use burn_peft::train::{Datasets, Trainer};

/// A bag-of-embeddings text classifier with Hugging Face-style names.
#[derive(burn::module::Module, Debug, Adaptable)]
struct TextClassifier {
    embed: Embedding,
    hidden: Linear,
    classifier: Linear,
}

impl TextClassifier {
    fn new(device: &Device) -> Self {
        Self {
            embed: EmbeddingConfig::new(VOCAB, 32).init(device),
            hidden: LinearConfig::new(32, 64).init(device),
            classifier: LinearConfig::new(64, 2).init(device),
        }
    }

    /// Class logits `[batch, 2]` of a padded batch (mean over the real tokens).
    fn logits(&self, batch: &Collated) -> Tensor<2> {
        let mask = batch.attention_mask.clone().float().unsqueeze_dim::<3>(2);
        let tokens = self.embed.forward(batch.input_ids.clone()) * mask.clone();
        let pooled = tokens.sum_dim(1).squeeze_dim::<2>(1) / mask.sum_dim(1).squeeze_dim::<2>(1);
        self.classifier.forward(relu(self.hidden.forward(pooled)))
    }
}

const VOCAB: usize = 64;

/// The task: does a sequence mention token 7? Deterministic, so every run sees the same data.
fn examples(count: usize, offset: usize) -> Vec<Example> {
    (0..count)
        .map(|i| {
            let n = i + offset;
            let ids: Vec<i64> = (0..8)
                .map(|k| ((n * 37 + k * 11 + n * k * 5) % VOCAB) as i64)
                .collect();
            let label = usize::from(ids.contains(&7));
            Example::classification(ids, label)
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "out/quickstart".into()),
    );
    let device = Device::flex().autodiff();
    device.seed(0);
    let base = TextClassifier::new(&device);
    let base_copy = base.clone();

    // PEFT's `get_peft_model(model, LoraConfig(r=8, lora_alpha=16, ...))`.
    let lora = LoraConfig::new(8)
        .alpha(16.0)
        .targets(["hidden"])
        .modules_to_save(["classifier"]);
    let model = get_peft_model(base, &lora)?;
    println!("{}", model.trainable_report());

    let data = Datasets {
        train: examples(512, 0),
        eval: Some(examples(128, 10_000)),
        test: Some(examples(128, 20_000)),
        labels: None,
    };
    let objective = classifier(|m: &TextClassifier, batch: &Collated| m.logits(batch));
    let mut trainer = Trainer::builder(model, objective)
        .epochs(8)
        .batch_size(32)
        .learning_rate(1e-2)
        .progress(false)
        .output_dir(&out)
        .build()?;
    let before = trainer.evaluate(data.test.as_deref().unwrap_or_default())?;
    // The example owns its output folder: start over on every run.
    let options = TrainOptions {
        overwrite: true,
        ..Default::default()
    };
    let summary = trainer.fit(&data, None, options)?;
    let test = summary
        .test
        .as_ref()
        .and_then(|t| t.accuracy)
        .unwrap_or(0.0);
    println!(
        "{} steps in {:.2} s: held-out accuracy {:.3} -> {test:.3} (best adapter: {})",
        summary.steps,
        summary.step_seconds,
        before.accuracy.unwrap_or(0.0),
        summary
            .best_dir
            .as_ref()
            .unwrap_or(&summary.result_dir)
            .display()
    );

    // The best adapter, as PEFT's `PeftModel.from_pretrained(base, dir)` loads it.
    let best = summary
        .best_dir
        .clone()
        .unwrap_or(summary.result_dir.clone());
    let reloaded = PeftModel::from_pretrained(base_copy, &best, false)?;
    let batch = burn_peft::train::data::collate(
        &data.test.iter().flatten().take(16).collect::<Vec<_>>(),
        0,
        &device,
    );
    let trained = trainer.model().model().logits(&batch);
    let again = reloaded.model().logits(&batch);
    let reload_diff = (trained.clone() - again).abs().max().into_scalar::<f32>();
    println!("the reloaded bundle reproduces the trained model (max |diff| {reload_diff:.2e})");

    let merged = reloaded.merge_and_unload()?;
    let merge_diff = (merged.logits(&batch) - trained)
        .abs()
        .max()
        .into_scalar::<f32>();
    println!("the merged plain model matches the adapted one (max |diff| {merge_diff:.2e})");
    if test < 0.9 || reload_diff > 1e-4 || merge_diff > 1e-4 {
        return Err("the quickstart did not reach its expected results".into());
    }
    Ok(())
}
