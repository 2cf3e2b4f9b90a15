//! GELU (erf and tanh forms), log-softmax, dropout.

use burn::tensor::{Device, Tensor, TensorData};
use peft_ops::reference;

use crate::common::{Rng, assert_close, autodiff, grad_of, tensor, weighted_sum};

/// Values on the plain device, values and input gradients under autodiff, fused vs `composed`.
fn check_unary<const D: usize>(
    what: &str,
    shape: [usize; D],
    std: f32,
    fused: fn(Tensor<D>) -> Tensor<D>,
    composed: fn(Tensor<D>) -> Tensor<D>,
) {
    let mut rng = Rng::new(7);
    let x = rng.data(&shape, std);
    let w = rng.data(&shape, 1.0);
    let plain = Device::flex();
    assert_close(
        &format!("{what} forward"),
        fused(tensor(&x, &plain, false)).into_data(),
        composed(tensor(&x, &plain, false)).into_data(),
    );
    let device = autodiff();
    let (xf, xc) = (
        tensor::<D>(&x, &device, true),
        tensor::<D>(&x, &device, true),
    );
    let (yf, yc) = (fused(xf.clone()), composed(xc.clone()));
    assert_close(
        &format!("{what} forward (autodiff)"),
        yf.clone().into_data(),
        yc.clone().into_data(),
    );
    let gf = weighted_sum(yf, &w).backward();
    let gc = weighted_sum(yc, &w).backward();
    assert_close(
        &format!("{what} gradient"),
        grad_of(&xf, &gf),
        grad_of(&xc, &gc),
    );
}

#[test]
fn gelu_minilm_intermediate() {
    // The intermediate activation of all-MiniLM-L6-v2: [16, 64, 1536].
    check_unary("gelu", [16, 64, 1536], 3.0, peft_ops::gelu, reference::gelu);
}

#[test]
fn gelu_tanh_gpt2_mlp() {
    check_unary(
        "gelu_tanh",
        [4, 32, 256],
        3.0,
        peft_ops::gelu_tanh,
        reference::gelu_tanh,
    );
}

#[test]
fn log_softmax_causal_lm_logits() {
    // Tiny Llama's logits: [16, 63, 128].
    check_unary(
        "log_softmax",
        [16, 63, 128],
        4.0,
        peft_ops::log_softmax,
        reference::log_softmax,
    );
}

#[test]
fn erf_within_1e6_of_libm() {
    let mut worst = 0f64;
    for i in -200_000..=200_000 {
        let x = i as f32 * 5e-5;
        let err = (f64::from(peft_ops::math::erf(x)) - libm::erf(f64::from(x))).abs();
        worst = worst.max(err);
    }
    assert!(worst < 1e-6, "erf max error {worst:e}");
}

#[test]
fn gelu_within_1e6_of_exact() {
    let xs: Vec<f32> = (-100_000..=100_000).map(|i| i as f32 * 1e-4).collect();
    let n = xs.len();
    let y = peft_ops::gelu(Tensor::<1>::from_data(
        TensorData::new(xs.clone(), [n]),
        &Device::flex(),
    ));
    let y = y.into_data().try_to_vec::<f32>().unwrap();
    let worst = xs
        .iter()
        .zip(&y)
        .map(|(&x, &g)| {
            let x = f64::from(x);
            let exact = 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
            (f64::from(g) - exact).abs()
        })
        .fold(0f64, f64::max);
    assert!(worst < 1e-6, "gelu max error {worst:e}");
}

#[test]
fn dropout_mask_rate_scale_and_gradient() {
    let (n, p) = (1 << 16, 0.1);
    let device = autodiff();
    let x = Tensor::<1>::ones([n], &device).require_grad();
    let _guard = crate::common::device_rng();
    device.seed(11);
    let y = peft_ops::dropout(x.clone(), p);
    device.seed(11);
    let key = peft_ops::dropout_key(&device);
    let mask = peft_ops::dropout_mask(key, p, n);
    let kept = mask.iter().filter(|k| **k).count() as f64 / n as f64;
    assert!((kept - 0.9).abs() < 0.01, "kept fraction {kept}");
    let scale = 1.0 / (1.0 - p as f32);
    let expected: Vec<f32> = mask.iter().map(|&k| if k { scale } else { 0.0 }).collect();
    let expected = TensorData::new(expected, [n]);
    assert_close("dropout forward", y.clone().into_data(), expected.clone());
    // d(Σy)/dx is the same mask, regenerated from the key.
    let grads = y.sum().backward();
    assert_close("dropout gradient", grad_of(&x, &grads), expected);
}

#[test]
fn dropout_key_follows_the_device_seed() {
    let device = autodiff();
    let _guard = crate::common::device_rng();
    device.seed(3);
    let a = peft_ops::dropout_key(&device);
    let b = peft_ops::dropout_key(&device);
    device.seed(3);
    assert_eq!(
        peft_ops::dropout_key(&device),
        a,
        "same seed, same first key"
    );
    assert_ne!(a, b, "consecutive keys differ");
    device.seed(4);
    assert_ne!(
        peft_ops::dropout_key(&device),
        a,
        "another seed, another key"
    );
}

#[test]
fn swiglu_tiny_llama_mlp() {
    let shape = [16, 64, 96];
    let mut rng = Rng::new(12);
    let a = rng.data(&shape, 3.0);
    let b = rng.data(&shape, 1.0);
    let w = rng.data(&shape, 1.0);
    let plain = Device::flex();
    assert_close(
        "swiglu forward",
        peft_ops::swiglu(tensor::<3>(&a, &plain, false), tensor(&b, &plain, false)).into_data(),
        reference::swiglu(tensor::<3>(&a, &plain, false), tensor(&b, &plain, false)).into_data(),
    );
    let device = autodiff();
    let (fa, fb) = (
        tensor::<3>(&a, &device, true),
        tensor::<3>(&b, &device, true),
    );
    let (ca, cb) = (
        tensor::<3>(&a, &device, true),
        tensor::<3>(&b, &device, true),
    );
    let gf = weighted_sum(peft_ops::swiglu(fa.clone(), fb.clone()), &w).backward();
    let gc = weighted_sum(reference::swiglu(ca.clone(), cb.clone()), &w).backward();
    assert_close("swiglu da", grad_of(&fa, &gf), grad_of(&ca, &gc));
    assert_close("swiglu db", grad_of(&fb, &gf), grad_of(&cb, &gc));
}

#[test]
fn rope_on_split_heads() {
    // Llama's q after `split_heads` (a strided view), head size 8, tables for positions 3..67.
    let (b, s, h, d) = (4, 64, 4, 8);
    let mut rng = Rng::new(21);
    let x = rng.data(&[b, s, h * d], 1.0);
    let w = rng.data(&[b, h, s, d], 1.0);
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in 3..3 + s {
        for _ in 0..2 {
            for i in 0..d / 2 {
                let a = p as f32 * 10000f32.powf(-(2.0 * i as f32) / d as f32);
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    let (cos, sin) = (TensorData::new(cos, [s, d]), TensorData::new(sin, [s, d]));
    let split = |t: Tensor<3>| t.reshape([b, s, h, d]).swap_dims(1, 2);
    let run = |f: fn(Tensor<4>, Tensor<2>, Tensor<2>) -> Tensor<4>, device: &Device, grad: bool| {
        let leaf = tensor::<3>(&x, device, grad);
        let y = f(
            split(leaf.clone()),
            tensor(&cos, device, false),
            tensor(&sin, device, false),
        );
        (leaf, y)
    };
    let plain = Device::flex();
    assert_close(
        "rope forward",
        run(peft_ops::rope, &plain, false).1.into_data(),
        run(reference::rope, &plain, false).1.into_data(),
    );
    let device = autodiff();
    let (fx, fy) = run(peft_ops::rope, &device, true);
    let (cx, cy) = run(reference::rope, &device, true);
    let gf = weighted_sum(fy, &w).backward();
    let gc = weighted_sum(cy, &w).backward();
    assert_close("rope dx", grad_of(&fx, &gf), grad_of(&cx, &gc));
}

#[test]
fn rope_with_a_table_per_row() {
    // A left-padded decode step: each of 5 rows at its own position (one token, s = 1), and a
    // left-padded prompt (s = 6) whose rows start at different offsets; head size 64.
    for (b, s) in [(5, 1), (3, 6)] {
        let (h, d) = (3, 64);
        let mut rng = Rng::new(22 + s as u64);
        let x = rng.data(&[b, s, h * d], 1.0);
        let w = rng.data(&[b, h, s, d], 1.0);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for row in 0..b {
            for p in 0..s {
                let position = (7 * row + p) as f32 - 2.0; // padding sits at negative positions
                for _ in 0..2 {
                    for i in 0..d / 2 {
                        let a = position * 10000f32.powf(-(2.0 * i as f32) / d as f32);
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
            }
        }
        let (cos, sin) = (
            TensorData::new(cos, [b * s, d]),
            TensorData::new(sin, [b * s, d]),
        );
        let split = |t: Tensor<3>| t.reshape([b, s, h, d]).swap_dims(1, 2);
        let run = |fused: bool, device: &Device, grad: bool| {
            let leaf = tensor::<3>(&x, device, grad);
            let (c, sn) = (
                tensor::<2>(&cos, device, false),
                tensor::<2>(&sin, device, false),
            );
            let y = if fused {
                peft_ops::rope(split(leaf.clone()), c, sn)
            } else {
                // The broadcast transformers does, tables `[b, 1, s, d]`.
                let table = |t: Tensor<2>| t.reshape([b, 1, s, d]);
                reference::rope_broadcast(split(leaf.clone()), table(c), table(sn))
            };
            (leaf, y)
        };
        let plain = Device::flex();
        assert_close(
            "rope per row forward",
            run(true, &plain, false).1.into_data(),
            run(false, &plain, false).1.into_data(),
        );
        assert_close(
            "rope per row, composed",
            reference::rope(
                split(tensor::<3>(&x, &plain, false)),
                tensor(&cos, &plain, false),
                tensor(&sin, &plain, false),
            )
            .into_data(),
            run(false, &plain, false).1.into_data(),
        );
        let device = autodiff();
        let (fx, fy) = run(true, &device, true);
        let (cx, cy) = run(false, &device, true);
        let gf = weighted_sum(fy, &w).backward();
        let gc = weighted_sum(cy, &w).backward();
        assert_close("rope per row dx", grad_of(&fx, &gf), grad_of(&cx, &gc));
    }
}
