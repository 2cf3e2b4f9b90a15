//! A language model written by hand, trained twice through the shared [`Trainer`]: first fully
//! (the base learns English from the descriptions of Debian packages of every section, and is
//! written out by a closure), then with LoRA on its projections to specialize in one section
//! (`games`), as one would adapt a pretrained LLM. Byte-level tokens, so no tokenizer is needed.
//!
//! `cargo run --release --example byte_lm [-- OUT_DIR]` (default `out/byte_lm`).

use std::path::Path;

use burn::tensor::activation::gelu;
use burn::tensor::{Device, Int, Tensor};
use burn_peft::core::get_peft_model;
use burn_peft::prelude::*;
use burn_peft::train::data::{Collated, Example};
use burn_peft::train::objective::causal_lm;
use burn_peft::train::run::TrainOptions;
use burn_peft::train::{Datasets, EvalReport, Trainer};

const DIM: usize = 64;
const CONTEXT: usize = 48;

/// Byte-level LM: each position sees its byte and the previous one, then an MLP block.
#[derive(burn::module::Module, Debug, Adaptable)]
struct ByteLm {
    embed: Embedding,
    prev_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    lm_head: Linear,
}

impl ByteLm {
    fn new(device: &Device) -> Self {
        Self {
            embed: EmbeddingConfig::new(256, DIM).init(device),
            prev_proj: LinearConfig::new(DIM, DIM).init(device),
            up_proj: LinearConfig::new(DIM, 4 * DIM).init(device),
            down_proj: LinearConfig::new(4 * DIM, DIM).init(device),
            lm_head: LinearConfig::new(DIM, 256).init(device),
        }
    }

    /// Next-byte logits `[batch, seq, 256]`.
    fn logits(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let x = self.embed.forward(ids);
        let [b, s, d] = x.dims();
        // The previous byte's embedding (zeros before the first): causal by construction.
        let mut prev = Tensor::zeros([b, 1, d], &x.device());
        if s > 1 {
            prev = Tensor::cat(vec![prev, x.clone().slice([0..b, 0..s - 1, 0..d])], 1);
        }
        let h = x + self.prev_proj.forward(prev);
        let h = h.clone() + self.down_proj.forward(gelu(self.up_proj.forward(h)));
        self.lm_head.forward(h)
    }
}

/// The descriptions of `examples/data/<file>` (only section `only`, if given) as byte examples.
fn read(
    file: &str,
    only: Option<&str>,
    limit: usize,
) -> Result<Vec<Example>, Box<dyn std::error::Error>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/data")
        .join(file);
    let mut out = Vec::new();
    for line in std::fs::read_to_string(&path)?.lines() {
        let row: serde_json::Value = serde_json::from_str(line)?;
        if only.is_some_and(|s| row["label"] != s) {
            continue;
        }
        let text = row["text"].as_str().unwrap_or_default();
        let ids: Vec<i64> = text.bytes().take(CONTEXT).map(i64::from).collect();
        if ids.len() > 1 {
            out.push(Example::causal_lm(ids));
        }
        if out.len() == limit {
            break;
        }
    }
    Ok(out)
}

fn describe(report: &EvalReport) -> String {
    format!("perplexity {:.2}", report.perplexity.unwrap_or(f64::NAN))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "out/byte_lm".into()),
    );
    let device = Device::flex().autodiff();
    device.seed(7);
    let objective = || causal_lm(|m: &ByteLm, batch: &Collated| m.logits(batch.input_ids.clone()));
    let fresh = TrainOptions {
        overwrite: true,
        ..Default::default()
    };

    // 1. Pretraining: every parameter trains; a closure writes the whole model.
    let mut base = PeftModel::new(ByteLm::new(&device));
    base.set_train_base(true)?;
    let general = Datasets {
        train: read("train.jsonl", None, 1200)?,
        eval: Some(read("eval.jsonl", None, 200)?),
        ..Default::default()
    };
    let mut pretrain = Trainer::builder(base, objective())
        .epochs(2)
        .batch_size(32)
        .learning_rate(3e-3)
        .progress(false)
        .output_dir(out.join("pretrain"))
        // Burn's own format (a burnpack file); a zoo model would use `FullExport` instead.
        .full_export(|m: &ByteLm, dir: &Path| {
            let export = |reason: String| burn_peft::train::TrainError::Export {
                dir: dir.to_path_buf(),
                reason,
            };
            std::fs::create_dir_all(dir).map_err(|e| export(e.to_string()))?;
            burn::module::Module::save_file(m.clone(), dir.join("model.bpk"))
                .map_err(|e| export(e.to_string()))
        })
        .build()?;
    let summary = pretrain.fit(&general, None, fresh)?;
    println!(
        "pretraining: {} steps, eval {}",
        summary.steps,
        summary.eval.as_ref().map(describe).unwrap_or_default()
    );
    let mut pretrained = pretrain.into_model();
    pretrained.set_train_base(false)?;
    let pretrained = pretrained.unload();

    // 2. LoRA on the projections for one section; the base stays frozen.
    let games = Datasets {
        train: read("train.jsonl", Some("games"), 400)?,
        eval: Some(read("eval.jsonl", Some("games"), 80)?),
        test: Some(read("test.jsonl", Some("games"), 80)?),
        labels: None,
    };
    let lora = LoraConfig::new(8)
        .alpha(16.0)
        .targets(["prev_proj", "up_proj", "down_proj"]);
    let model = get_peft_model(pretrained, &lora)?;
    println!("{}", model.trainable_report());
    let mut tune = Trainer::builder(model, objective())
        .epochs(4)
        .batch_size(16)
        .learning_rate(5e-3)
        .progress(false)
        .output_dir(out.join("games"))
        .build()?;
    let test = games.test.as_deref().unwrap_or_default();
    let before = tune.evaluate(test)?;
    let summary = tune.fit(&games, None, fresh)?;
    let after = summary.test.as_ref().ok_or("no test report")?;
    println!(
        "LoRA on `games`: {} steps; held-out games descriptions: {} -> {}",
        summary.steps,
        describe(&before),
        describe(after)
    );
    if after.loss >= before.loss {
        return Err("LoRA did not lower the held-out loss".into());
    }
    Ok(())
}
