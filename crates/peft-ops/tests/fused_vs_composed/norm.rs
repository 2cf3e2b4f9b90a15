//! LayerNorm (with a residual, with and without beta) and RMSNorm.

use burn::tensor::{Device, Tensor};
use peft_ops::reference;

use crate::common::{Rng, assert_close, autodiff, grad_of, tensor, weighted_sum};

/// Inputs are tracked or not per `tracked` = [x, residual, gamma, beta].
fn layer_norm_case(shape: [usize; 3], residual: bool, beta: bool, tracked: [bool; 4]) {
    let width = shape[2];
    let mut rng = Rng::new(width as u64 + u64::from(residual));
    let x = rng.data(&shape, 2.0);
    let r = rng.data(&shape, 1.0);
    let g = rng.data(&[width], 1.0);
    let b = rng.data(&[width], 1.0);
    let w = rng.data(&shape, 1.0);
    let eps = 1e-12;
    let make = |device: &Device, grad: bool| {
        (
            tensor::<3>(&x, device, grad && tracked[0]),
            residual.then(|| tensor::<3>(&r, device, grad && tracked[1])),
            tensor::<1>(&g, device, grad && tracked[2]),
            beta.then(|| tensor::<1>(&b, device, grad && tracked[3])),
        )
    };
    let plain = Device::flex();
    let (px, pr, pg, pb) = make(&plain, false);
    assert_close(
        "layer_norm forward",
        peft_ops::layer_norm(px.clone(), pr.clone(), pg.clone(), pb.clone(), eps).into_data(),
        reference::layer_norm(px, pr, pg, pb, eps).into_data(),
    );
    let device = autodiff();
    let (fx, fr, fg, fb) = make(&device, true);
    let (cx, cr, cg, cb) = make(&device, true);
    let yf = peft_ops::layer_norm(fx.clone(), fr.clone(), fg.clone(), fb.clone(), eps);
    let yc = reference::layer_norm(cx.clone(), cr.clone(), cg.clone(), cb.clone(), eps);
    assert_close(
        "layer_norm forward (autodiff)",
        yf.clone().into_data(),
        yc.clone().into_data(),
    );
    let gf = weighted_sum(yf, &w).backward();
    let gc = weighted_sum(yc, &w).backward();
    if tracked[0] {
        assert_close("dx", grad_of(&fx, &gf), grad_of(&cx, &gc));
    }
    if let (Some(f), Some(c), true) = (&fr, &cr, tracked[1]) {
        assert_close("dresidual", grad_of(f, &gf), grad_of(c, &gc));
    }
    if tracked[2] {
        assert_close("dgamma", grad_of(&fg, &gf), grad_of(&cg, &gc));
    }
    if let (Some(f), Some(c), true) = (&fb, &cb, tracked[3]) {
        assert_close("dbeta", grad_of(f, &gf), grad_of(c, &gc));
    }
}

#[test]
fn bert_post_norm_with_residual() {
    // `LayerNorm(dense(x) + residual)` of all-MiniLM-L6-v2, full fine-tuning (all tracked).
    layer_norm_case([16, 64, 384], true, true, [true; 4]);
}

#[test]
fn frozen_norm_under_lora() {
    // LoRA training: gamma and beta frozen; the residual stream untracked (first layer).
    layer_norm_case([8, 64, 384], true, true, [true, false, false, false]);
}

#[test]
fn layer_norm_without_residual_or_beta() {
    layer_norm_case([4, 17, 40], false, false, [true, false, true, false]);
}

#[test]
fn rms_norm_tiny_llama() {
    let shape = [16, 64, 32];
    let mut rng = Rng::new(5);
    let x = rng.data(&shape, 1.5);
    let g = rng.data(&[32], 1.0);
    let w = rng.data(&shape, 1.0);
    let eps = 1e-6;
    let plain = Device::flex();
    assert_close(
        "rms_norm forward",
        peft_ops::rms_norm(
            tensor::<3>(&x, &plain, false),
            tensor(&g, &plain, false),
            eps,
        )
        .into_data(),
        reference::rms_norm(
            tensor::<3>(&x, &plain, false),
            tensor(&g, &plain, false),
            eps,
        )
        .into_data(),
    );
    let device = autodiff();
    let (fx, fg) = (
        tensor::<3>(&x, &device, true),
        tensor::<1>(&g, &device, true),
    );
    let (cx, cg) = (
        tensor::<3>(&x, &device, true),
        tensor::<1>(&g, &device, true),
    );
    let yf = peft_ops::rms_norm(fx.clone(), fg.clone(), eps);
    let yc = reference::rms_norm(cx.clone(), cg.clone(), eps);
    let gf = weighted_sum(yf, &w).backward();
    let gc = weighted_sum(yc, &w).backward();
    assert_close("dx", grad_of(&fx, &gf), grad_of(&cx, &gc));
    assert_close("dgamma", grad_of(&fg, &gf), grad_of(&cg, &gc));
}

#[test]
fn module_helpers_match_the_modules() {
    use burn::nn::{LayerNormConfig, RmsNormConfig};
    let device = Device::flex();
    let mut rng = Rng::new(9);
    let x: Tensor<3> = tensor(&rng.data(&[2, 5, 24], 1.0), &device, false);
    let r: Tensor<3> = tensor(&rng.data(&[2, 5, 24], 1.0), &device, false);
    let ln = LayerNormConfig::new(24).with_epsilon(1e-5).init(&device);
    assert_close(
        "nn::layer_norm",
        peft_ops::nn::layer_norm(&ln, 1e-5, x.clone(), Some(r.clone())).into_data(),
        ln.forward(x.clone() + r).into_data(),
    );
    let rms = RmsNormConfig::new(24).with_epsilon(1e-6).init(&device);
    assert_close(
        "nn::rms_norm",
        peft_ops::nn::rms_norm(&rms, x.clone()).into_data(),
        rms.forward(x).into_data(),
    );
}
