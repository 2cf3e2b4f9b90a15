//! The tiny model of `tests/fixtures/gen/lora_tiny.py`, rebuilt from our adapter-aware layers,
//! and helpers to read the fixtures.
#![allow(dead_code)]

pub mod family;
pub mod fixture_models;
pub mod gpu_tests;
pub mod hf;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::activation::{sigmoid, tanh};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_peft::core::Adaptable;
use burn_peft::core::bundle::TensorFile;
use burn_peft::core::nn::{Embedding, Linear};

/// `tests/fixtures/lora_tiny`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora_tiny")
}

#[derive(Module, Debug, Adaptable)]
#[peft(crate = "burn_peft::core")]
pub struct Attn {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
}

#[derive(Module, Debug, Adaptable)]
#[peft(crate = "burn_peft::core")]
pub struct Mlp {
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Module, Debug, Adaptable)]
#[peft(crate = "burn_peft::core")]
pub struct Block {
    pub attn: Attn,
    pub mlp: Mlp,
}

#[derive(Module, Debug, Adaptable)]
#[peft(crate = "burn_peft::core")]
pub struct Tiny {
    pub embed_tokens: Embedding,
    pub layers: Vec<Block>,
    pub classifier: Linear,
}

impl Block {
    fn forward(&self, h: Tensor<3>) -> Tensor<3> {
        let a = self.attn.q_proj.forward(h.clone()) * sigmoid(self.attn.k_proj.forward(h.clone()))
            + self.attn.v_proj.forward(h.clone());
        let h = h + a;
        let m = self
            .mlp
            .down_proj
            .forward(tanh(self.mlp.up_proj.forward(h.clone())));
        h + m
    }
}

impl Tiny {
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let mut h = self.embed_tokens.forward(ids);
        for layer in &self.layers {
            h = layer.forward(h);
        }
        self.classifier.forward(h)
    }

    /// The base weights from `base.safetensors` (PyTorch layout, transposed to Burn's).
    pub fn load(device: &Device) -> Self {
        let mut file = TensorFile::read(&fixtures().join("base.safetensors")).unwrap();
        let mut linear = |name: &str, d_in: usize, d_out: usize, bias: bool| {
            let w = file
                .take(&format!("{name}.weight"), &[d_out, d_in])
                .unwrap();
            let w = Tensor::<2>::from_data(w, device).transpose();
            let b = bias.then(|| {
                Tensor::<1>::from_data(
                    file.take(&format!("{name}.bias"), &[d_out]).unwrap(),
                    device,
                )
            });
            Linear::from_tensors(w, b)
        };
        let layers = (0..2)
            .map(|i| Block {
                attn: Attn {
                    q_proj: linear(&format!("layers.{i}.attn.q_proj"), 16, 16, true),
                    k_proj: linear(&format!("layers.{i}.attn.k_proj"), 16, 16, false),
                    v_proj: linear(&format!("layers.{i}.attn.v_proj"), 16, 16, true),
                },
                mlp: Mlp {
                    up_proj: linear(&format!("layers.{i}.mlp.up_proj"), 16, 32, true),
                    down_proj: linear(&format!("layers.{i}.mlp.down_proj"), 32, 16, true),
                },
            })
            .collect();
        let classifier = linear("classifier", 16, 4, true);
        let embed = file.take("embed_tokens.weight", &[50, 16]).unwrap();
        Tiny {
            embed_tokens: Embedding::from_tensor(Tensor::from_data(embed, device)),
            layers,
            classifier,
        }
    }
}

/// `input_ids` of `inputs.safetensors` (int64 `[2, 5]`).
pub fn input_ids(device: &Device) -> Tensor<2, Int> {
    let bytes = std::fs::read(fixtures().join("inputs.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor("input_ids").unwrap();
    let values: Vec<i64> = view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Tensor::from_data(TensorData::new(values, view.shape().to_vec()), device)
}

/// An `f32` tensor of `[2, 5, 4]` from an expected-output file.
pub fn expected(file: &str, key: &str) -> Vec<f32> {
    let mut f = TensorFile::read(&fixtures().join(file)).unwrap();
    f.take(key, &[2, 5, 4])
        .unwrap()
        .try_to_vec::<f32>()
        .unwrap()
}

/// Largest difference, relative to the reference value where it exceeds 1 (float32 outputs of
/// magnitude ~50 carry ~5e-6 of rounding noise, so a pure absolute bound would test the noise).
pub fn max_diff(a: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(a.len(), reference.len());
    a.iter()
        .zip(reference)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

/// Values of a tensor.
pub fn values(t: Tensor<3>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

/// The device the numeric tests run on: flex, or the Vulkan adapter when
/// `BURN_PEFT_TEST_DEVICE=vulkan` (the GPU-backend subset of `.ci/run`, built with
/// `--features wgpu`). `None` means skip: the Vulkan backend or adapter is missing and
/// `BURN_PEFT_REQUIRE_VULKAN` is unset (a message says so); with it set, a missing adapter fails.
pub fn test_device(what: &str) -> Option<Device> {
    match std::env::var("BURN_PEFT_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("flex") => Some(Device::flex()),
        Ok(name) => device_or_skip(name, what),
    }
}

/// Open the device `name` (`vulkan`, `vulkan:1`, ...) or, when it is missing, skip `what` with
/// a message (or fail, when `BURN_PEFT_REQUIRE_VULKAN` is set).
pub fn device_or_skip(name: &str, what: &str) -> Option<Device> {
    match burn_peft::train::device::open(name) {
        Ok(device) => Some(device),
        Err(e) if std::env::var_os("BURN_PEFT_REQUIRE_VULKAN").is_some() => {
            panic!("{what}: BURN_PEFT_REQUIRE_VULKAN is set but device `{name}` is unusable: {e}")
        }
        Err(e) => {
            // Straight to stderr: the test harness captures `eprintln!` of passing tests.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {what}: device `{name}` is unusable: {e} (set BURN_PEFT_REQUIRE_VULKAN=1 to make this a failure)"
            );
            None
        }
    }
}
