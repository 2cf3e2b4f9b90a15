//! GPT-2 `Conv1D` layers (`[in, out]` in Hugging Face files): LoRA tensors keep PEFT's
//! `[r, in]` / `[out, r]` layout, `modules_to_save` copies are written in the layer's file
//! layout, and merging works the same in Burn's `[in, out]` memory layout.

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use burn_peft::core::bundle::{TensorFile, WEIGHTS_FILE};
use burn_peft::core::nn::{Linear, LinearConfig, WeightLayout};
use burn_peft::core::{Adaptable, PeftModel};
use burn_peft::lora::{InitLoraWeights, LoraConfig};

#[derive(Module, Debug, Adaptable)]
struct Attn {
    c_attn: Linear,
    c_proj: Linear,
}

#[derive(Module, Debug, Adaptable)]
struct Gpt2Like {
    h: Vec<Attn>,
}

fn model(device: &Device) -> Gpt2Like {
    Gpt2Like {
        h: (0..2)
            .map(|_| Attn {
                c_attn: LinearConfig::new(8, 24)
                    .init(device)
                    .with_layout(WeightLayout::Conv1D),
                c_proj: LinearConfig::new(8, 8)
                    .init(device)
                    .with_layout(WeightLayout::Conv1D),
            })
            .collect(),
    }
}

fn forward(m: &Gpt2Like, x: Tensor<2>) -> Vec<f32> {
    m.h.iter()
        .map(|a| a.c_attn.forward(x.clone()))
        .chain(m.h.iter().map(|a| a.c_proj.forward(x.clone())))
        .flat_map(|t| t.into_data().try_to_vec::<f32>().unwrap())
        .collect()
}

#[test]
fn conv1d_layout_saves_peft_shapes_and_merges() {
    let device = Device::flex();
    device.seed(1);
    let base = model(&device);
    let base_copy = base.clone();
    let mut peft = PeftModel::new(base);
    let config = LoraConfig {
        r: 2,
        target_modules: Some(["c_attn"].into()),
        fan_in_fan_out: true,
        modules_to_save: Some(vec!["h.1.c_proj".into()]),
        init_lora_weights: InitLoraWeights::Bool(false),
        ..Default::default()
    };
    peft.add_adapter("default", &config).unwrap();
    let x = Tensor::<2>::random([3, 8], Distribution::Normal(0.0, 1.0), &device);
    let adapted = forward(peft.model(), x.clone());

    let dir = tempfile::tempdir().unwrap();
    peft.save_adapter(dir.path(), "default").unwrap();
    let mut file = TensorFile::read(&dir.path().join(WEIGHTS_FILE)).unwrap();
    file.take("base_model.model.h.0.c_attn.lora_A.weight", &[2, 8])
        .unwrap();
    file.take("base_model.model.h.0.c_attn.lora_B.weight", &[24, 2])
        .unwrap();
    // The copy is written as the Conv1D weight is stored in GPT-2 files: [in, out].
    let copy = file
        .take("base_model.model.h.1.c_proj.weight", &[8, 8])
        .unwrap();
    let ours = peft.model().h[1].c_proj.copies[0].weight.val().into_data();
    assert_eq!(
        copy.try_to_vec::<f32>().unwrap(),
        ours.try_to_vec::<f32>().unwrap()
    );

    let mut reloaded = PeftModel::new(base_copy);
    reloaded.load_adapter(dir.path(), "default").unwrap();
    assert_eq!(forward(reloaded.model(), x.clone()), adapted);

    peft.merge().unwrap();
    let merged = forward(peft.model(), x);
    let diff = merged
        .iter()
        .zip(&adapted)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "merged differs by {diff}");
}
