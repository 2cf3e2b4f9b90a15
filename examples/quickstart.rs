//! LoRA end to end through the library API: inject into a small model, train with AdamW on a
//! regression task, save the adapter in PEFT's format, reload it, merge it away.
//!
//! `cargo run --release --example quickstart [-- OUT_DIR]` (default `out/quickstart-adapter`).

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Distribution, Tensor};
use burn_peft::prelude::*;

/// Two-layer MLP with Hugging Face-style names.
#[derive(Module, Debug, Adaptable)]
struct Mlp {
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self {
            up_proj: LinearConfig::new(32, 64).init(device),
            down_proj: LinearConfig::new(64, 8).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.down_proj.forward(gelu(self.up_proj.forward(x)))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "out/quickstart-adapter".into());
    let device = Device::flex().autodiff();
    device.seed(0);

    // The task: match a teacher network the base model does not know.
    let teacher = Mlp::new(&device);
    let base = Mlp::new(&device);
    let x = Tensor::<2>::random([256, 32], Distribution::Normal(0.0, 1.0), &device);
    let y = teacher.forward(x.clone()).detach();

    let base_copy = base.clone();
    let mut model = PeftModel::new(base);
    let lora = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: Some(["up_proj", "down_proj"].into()),
        ..Default::default()
    };
    model.add_adapter("default", &lora)?;
    println!("{}", model.trainable_report());

    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init();
    let mut first = None;
    let mut last = 0.0;
    for step in 0..200 {
        let loss = (model.model().forward(x.clone()) - y.clone())
            .powf_scalar(2.0)
            .mean();
        last = loss.clone().into_scalar::<f32>();
        first.get_or_insert(last);
        if step % 50 == 0 {
            println!("step {step:3}  loss {last:.5}");
        }
        let grads = GradientsParams::from_grads(loss.backward(), model.model());
        model.update(|m| optim.step(1e-2, m, grads));
    }
    println!(
        "loss {:.5} -> {last:.5} after 200 steps",
        first.unwrap_or(last)
    );

    model.save_adapter(&out, "default")?;
    println!("saved PEFT bundle to {out}");

    let mut reloaded = PeftModel::new(base_copy);
    reloaded.load_adapter(&out, "default")?;
    let trained = model.model().forward(x.clone());
    let again = reloaded.model().forward(x.clone());
    let reload_diff = (trained.clone() - again).abs().max().into_scalar::<f32>();
    println!("reloaded adapter reproduces the trained outputs (max |diff| {reload_diff:.2e})");

    let merged = model.merge_and_unload()?;
    let merge_diff = (merged.forward(x) - trained)
        .abs()
        .max()
        .into_scalar::<f32>();
    println!("merged plain model matches the adapted one (max |diff| {merge_diff:.2e})");
    Ok(())
}
