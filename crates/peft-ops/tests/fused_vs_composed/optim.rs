//! The AdamW update and the squared norm against their compositions.

use burn::tensor::{Device, Tensor};
use peft_ops::{AdamWStep, reference};

use crate::common::{Rng, assert_close, tensor};

#[test]
fn adamw_three_steps_match_the_composition() {
    // A MiniLM intermediate weight, flattened: 384 x 1536.
    let n = 384 * 1536;
    let device = Device::flex();
    let mut rng = Rng::new(31);
    let p0 = rng.data(&[n], 0.05);
    let (mut pf, mut mf, mut vf): (Tensor<1>, Tensor<1>, Tensor<1>) = (
        tensor(&p0, &device, false),
        Tensor::zeros([n], &device),
        Tensor::zeros([n], &device),
    );
    let (mut pc, mut mc, mut vc) = (pf.clone(), mf.clone(), vf.clone());
    for step in 1..=3 {
        let g: Tensor<1> = tensor(&rng.data(&[n], 0.01), &device, false);
        let s = AdamWStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step,
            grad_scale: 0.5,
        };
        (pf, mf, vf) = peft_ops::adamw(pf, g.clone(), mf, vf, &s);
        (pc, mc, vc) = reference::adamw(pc, g, mc, vc, &s);
    }
    assert_close("adamw p", pf.into_data(), pc.into_data());
    assert_close("adamw m", mf.into_data(), mc.into_data());
    assert_close("adamw v", vf.into_data(), vc.into_data());
}

#[test]
fn sum_squares_matches_the_composition() {
    let device = Device::flex();
    let x: Tensor<2> = tensor(&Rng::new(4).data(&[1536, 384], 0.3), &device, false);
    let fused = peft_ops::sum_squares(x.clone());
    let composed = reference::sum_squares(x);
    assert!(
        (fused - composed).abs() <= 1e-5 * composed,
        "sum of squares {fused} vs {composed}"
    );
}
