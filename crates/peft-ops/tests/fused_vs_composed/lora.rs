//! LoRA on activations: without dropout against the composition, with dropout against the
//! composition on the same mask.

use burn::tensor::{Device, Tensor, TensorData};
use peft_ops::reference;

use crate::common::{Rng, assert_close, autodiff, grad_of, tensor, weighted_sum};

const N: usize = 1024; // 16 x 64 tokens
const D: usize = 384;
const R: usize = 8;
const SCALING: f64 = 2.0;

struct Inputs {
    x: TensorData,
    y: TensorData,
    a: TensorData,
    b: TensorData,
    w: TensorData,
}

fn inputs() -> Inputs {
    let mut rng = Rng::new(17);
    Inputs {
        x: rng.data(&[N, D], 1.0),
        y: rng.data(&[N, D], 1.0),
        a: rng.data(&[D, R], 0.05),
        b: rng.data(&[R, D], 0.05),
        w: rng.data(&[N, D], 1.0),
    }
}

/// `[x, y, a, b]` on `device`, tracked per `tracked`.
fn leaves(i: &Inputs, device: &Device, tracked: [bool; 4]) -> [Tensor<2>; 4] {
    [
        tensor(&i.x, device, tracked[0]),
        tensor(&i.y, device, tracked[1]),
        tensor(&i.a, device, tracked[2]),
        tensor(&i.b, device, tracked[3]),
    ]
}

fn compare(tracked: [bool; 4], prob: f64) {
    let i = inputs();
    let device = autodiff();
    let _guard = crate::common::device_rng();
    let [fx, fy, fa, fb] = leaves(&i, &device, tracked);
    device.seed(23);
    let yf = peft_ops::lora(
        fx.clone(),
        fy.clone(),
        fa.clone(),
        fb.clone(),
        SCALING,
        prob,
    );
    // The composition on the very mask the fused op drew (same seed, same key).
    let [cx, cy, ca, cb] = leaves(&i, &device, tracked);
    let dropped = if prob > 0.0 {
        device.seed(23);
        let key = peft_ops::dropout_key(&device);
        let keep = 1.0 - prob as f32;
        let mask: Vec<f32> = peft_ops::dropout_mask(key, prob, N * D)
            .into_iter()
            .map(|k| if k { 1.0 / keep } else { 0.0 })
            .collect();
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [N, D]), &device);
        cx.clone() * mask
    } else {
        cx.clone()
    };
    let yc = reference::lora(dropped, cy.clone(), ca.clone(), cb.clone(), SCALING);
    assert_close(
        "lora forward",
        yf.clone().into_data(),
        yc.clone().into_data(),
    );
    let gf = weighted_sum(yf, &i.w).backward();
    let gc = weighted_sum(yc, &i.w).backward();
    for (name, f, c, t) in [
        ("dx", &fx, &cx, tracked[0]),
        ("dy", &fy, &cy, tracked[1]),
        ("dA", &fa, &ca, tracked[2]),
        ("dB", &fb, &cb, tracked[3]),
    ] {
        if t {
            assert_close(name, grad_of(f, &gf), grad_of(c, &gc));
        }
    }
}

#[test]
fn lora_without_dropout() {
    compare([true; 4], 0.0);
}

#[test]
fn lora_with_dropout_same_mask() {
    compare([true; 4], 0.1);
}

#[test]
fn lora_first_layer_input_untracked() {
    // The first LoRA site sees the (frozen) embeddings: only A, B and the base output.
    compare([false, true, true, true], 0.1);
}

#[test]
fn lora_inference_matches() {
    let i = inputs();
    let plain = Device::flex();
    let [x, y, a, b] = leaves(&i, &plain, [false; 4]);
    assert_close(
        "lora inference",
        peft_ops::lora(x.clone(), y.clone(), a.clone(), b.clone(), SCALING, 0.0).into_data(),
        reference::lora(x, y, a, b, SCALING).into_data(),
    );
}
