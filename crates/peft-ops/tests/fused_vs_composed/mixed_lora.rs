//! LoRA over a mixed-adapter batch: the one-pass kernel against PEFT's composition (gather each
//! adapter's rows, two matmuls, scatter-add), at the serving shape of a SmolLM2-sized model.

use burn::tensor::{Device, Tensor, TensorData};
use peft_ops::{LowRank, reference};

use crate::common::{Rng, assert_close, autodiff, tensor};

const D_IN: usize = 576;
const D_OUT: usize = 192;

/// Three adapters of ranks 8, 16 and 4.
fn adapters(rng: &mut Rng, device: &Device) -> Vec<LowRank> {
    [(8, 2.0), (16, 0.5), (4, 1.0)]
        .into_iter()
        .map(|(r, scaling)| LowRank {
            a: tensor(&rng.data(&[D_IN, r], 0.05), device, false),
            b: tensor(&rng.data(&[r, D_OUT], 0.05), device, false),
            scaling,
        })
        .collect()
}

/// 16 batch rows over the adapters and the base; `per_row` positions each.
fn compare(per_row: usize) {
    let device = Device::flex();
    let mut rng = Rng::new(29);
    let adapters = adapters(&mut rng, &device);
    let slots: Vec<Option<usize>> = (0..16)
        .map(|b| [Some(0), Some(1), None, Some(2), Some(1)][b % 5])
        .collect();
    let n = slots.len() * per_row;
    let x = rng.data(&[n, D_IN], 1.0);
    let y = rng.data(&[n, D_OUT], 1.0);
    let [xf, yf] = [&x, &y].map(|d| tensor::<2>(d, &device, false));
    let fused = peft_ops::mixed_lora(xf.clone(), yf.clone(), &slots, &adapters);
    let composed = reference::mixed_lora(xf.clone(), yf.clone(), &slots, &adapters);
    assert_close("mixed lora", fused.into_data(), composed.into_data());
    // `y` was shared (the clones above), so the kernel copied it rather than writing into it.
    assert_eq!(yf.into_data(), y);
}

#[test]
fn mixed_lora_decode_rows_match_the_composition() {
    compare(1);
}

#[test]
fn mixed_lora_prompt_rows_match_the_composition() {
    compare(9);
}

/// In a training graph the composition runs, so gradients reach the factors.
#[test]
fn mixed_lora_in_autodiff_gives_factor_gradients() {
    let device = autodiff();
    let mut rng = Rng::new(31);
    let x: Tensor<2> = tensor(&rng.data(&[4, D_IN], 1.0), &device, false);
    let y: Tensor<2> = Tensor::zeros([4, D_OUT], &device);
    let a: Tensor<2> = tensor(&rng.data(&[D_IN, 8], 0.05), &device, true);
    let b: Tensor<2> = tensor(&TensorData::ones::<f32, _>([8, D_OUT]), &device, true);
    let adapter = LowRank {
        a: a.clone(),
        b,
        scaling: 2.0,
    };
    let out = peft_ops::mixed_lora(x, y, &[None, Some(0), None, None], &[adapter]);
    let grads = out.sum().backward();
    let ga = a.grad(&grads).expect("A takes part in the product");
    assert!(ga.abs().sum().into_scalar::<f32>() > 0.0);
}
