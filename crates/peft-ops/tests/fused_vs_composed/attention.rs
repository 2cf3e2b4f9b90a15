//! Scaled dot-product attention: padding, causal, prefix keys, GQA, fully masked rows.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use peft_ops::reference;

use crate::common::{Rng, assert_close, autodiff, grad_of, tensor, weighted_sum};

/// `[b, s, h·d]` -> `[b, h, s, d]` (a strided view, as the models' `split_heads`).
fn split(x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, s, hd] = x.dims();
    x.reshape([b, s, heads, hd / heads]).swap_dims(1, 2)
}

/// Key padding mask `[b, 1, 1, sk]` (true = padding) from per-row lengths, padded on the
/// right (`left = false`) or the left.
fn padding(lengths: &[usize], sk: usize, left: bool, device: &Device) -> Tensor<4, Bool> {
    let b = lengths.len();
    let mut ids = vec![0i64; b * sk];
    for (r, &len) in lengths.iter().enumerate() {
        for j in 0..sk {
            let real = if left { j >= sk - len } else { j < len };
            ids[r * sk + j] = i64::from(real);
        }
    }
    Tensor::<2, Int>::from_data(TensorData::new(ids, [b, sk]), device)
        .equal_elem(0)
        .reshape([b, 1, 1, sk])
}

/// `peft_ops::attention` or `reference::attention`.
type AttentionFn =
    fn(Tensor<4>, Tensor<4>, Tensor<4>, Option<Tensor<4, Bool>>, bool, Option<f64>) -> Tensor<4>;

struct Case {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    sq: usize,
    sk: usize,
    d: usize,
    causal: bool,
    lengths: Option<(Vec<usize>, bool)>,
    /// Expand the mask to `[b, heads, sq, sk]` (as the models do) or leave it broadcast.
    expand_mask: bool,
    /// Which of q, k, v are tracked.
    tracked: [bool; 3],
}

fn run(case: &Case) {
    let mut rng = Rng::new(case.sq as u64 * 31 + case.sk as u64);
    let q = rng.data(&[case.batch, case.sq, case.heads * case.d], 1.0);
    let k = rng.data(&[case.batch, case.sk, case.kv_heads * case.d], 1.0);
    let v = rng.data(&[case.batch, case.sk, case.kv_heads * case.d], 1.0);
    let w = rng.data(&[case.batch, case.heads, case.sq, case.d], 1.0);
    let mask = |device: &Device| {
        case.lengths.as_ref().map(|(lengths, left)| {
            let m = padding(lengths, case.sk, *left, device);
            if case.expand_mask {
                m.expand([case.batch, case.heads, case.sq, case.sk])
            } else {
                m
            }
        })
    };
    let plain = Device::flex();
    let inputs = |device: &Device, grad: bool| {
        (
            tensor::<3>(&q, device, grad && case.tracked[0]),
            tensor::<3>(&k, device, grad && case.tracked[1]),
            tensor::<3>(&v, device, grad && case.tracked[2]),
        )
    };
    let apply = |f: AttentionFn, (q, k, v): (Tensor<3>, Tensor<3>, Tensor<3>), device: &Device| {
        f(
            split(q, case.heads),
            split(k, case.kv_heads),
            split(v, case.kv_heads),
            mask(device),
            case.causal,
            None,
        )
    };
    assert_close(
        "attention forward",
        apply(peft_ops::attention, inputs(&plain, false), &plain).into_data(),
        apply(reference::attention, inputs(&plain, false), &plain).into_data(),
    );
    let device = autodiff();
    let (fq, fk, fv) = inputs(&device, true);
    let (cq, ck, cv) = inputs(&device, true);
    let yf = apply(
        peft_ops::attention,
        (fq.clone(), fk.clone(), fv.clone()),
        &device,
    );
    let yc = apply(
        reference::attention,
        (cq.clone(), ck.clone(), cv.clone()),
        &device,
    );
    assert_close(
        "attention forward (autodiff)",
        yf.clone().into_data(),
        yc.clone().into_data(),
    );
    let gf = weighted_sum(yf, &w).backward();
    let gc = weighted_sum(yc, &w).backward();
    for (name, f, c, tracked) in [
        ("dq", &fq, &cq, case.tracked[0]),
        ("dk", &fk, &ck, case.tracked[1]),
        ("dv", &fv, &cv, case.tracked[2]),
    ] {
        if tracked {
            assert_close(name, grad_of(f, &gf), grad_of(c, &gc));
        }
    }
}

#[test]
fn minilm_padding_mask() {
    // all-MiniLM-L6-v2: 16 x 64, 12 heads x 32, right padding as the tokenizer pads.
    let lengths = (0..16).map(|i| 64 - 3 * i).collect();
    run(&Case {
        batch: 16,
        heads: 12,
        kv_heads: 12,
        sq: 64,
        sk: 64,
        d: 32,
        causal: false,
        lengths: Some((lengths, false)),
        expand_mask: true,
        tracked: [true; 3],
    });
}

#[test]
fn broadcast_mask_and_partial_tracking() {
    // LoRA on query/value: the key of the first layer is not tracked.
    run(&Case {
        batch: 4,
        heads: 4,
        kv_heads: 4,
        sq: 24,
        sk: 24,
        d: 16,
        causal: false,
        lengths: Some((vec![24, 20, 9, 1], false)),
        expand_mask: false,
        tracked: [true, false, true],
    });
}

#[test]
fn tiny_llama_gqa_causal_prefix() {
    // Tiny Llama: 4 query heads on 2 key/value heads of 8, a 16-token prefix before 48
    // queries, causal bottom-right, left padding.
    run(&Case {
        batch: 6,
        heads: 4,
        kv_heads: 2,
        sq: 48,
        sk: 64,
        d: 8,
        causal: true,
        lengths: Some((vec![64, 60, 50, 40, 30, 17], true)),
        expand_mask: true,
        tracked: [true; 3],
    });
}

#[test]
fn causal_without_mask_and_gqa_to_one_head() {
    run(&Case {
        batch: 2,
        heads: 6,
        kv_heads: 1,
        sq: 33,
        sk: 33,
        d: 16,
        causal: true,
        lengths: None,
        expand_mask: true,
        tracked: [true; 3],
    });
}

#[test]
fn fully_masked_rows_give_zeros() {
    // Left padding with a causal mask and no prefix: the first query rows of the padded
    // sequences see no key at all.
    run(&Case {
        batch: 3,
        heads: 2,
        kv_heads: 2,
        sq: 10,
        sk: 10,
        d: 8,
        causal: true,
        lengths: Some((vec![10, 6, 2], true)),
        expand_mask: true,
        tracked: [true; 3],
    });
}

#[test]
fn single_query_decoding_step() {
    // Generation with a cache: one query against 40 keys.
    run(&Case {
        batch: 3,
        heads: 4,
        kv_heads: 2,
        sq: 1,
        sk: 40,
        d: 8,
        causal: true,
        lengths: Some((vec![40, 35, 20], true)),
        expand_mask: true,
        tracked: [true; 3],
    });
}

#[test]
fn single_query_gqa_broadcast_mask() {
    // SmolLM2's grouping (3 query heads per key/value head) and head size, mask not expanded.
    run(&Case {
        batch: 2,
        heads: 9,
        kv_heads: 3,
        sq: 1,
        sk: 70,
        d: 64,
        causal: true,
        lengths: Some((vec![70, 33], true)),
        expand_mask: false,
        tracked: [true; 3],
    });
}

#[test]
fn single_query_grouped_kernels_over_head_widths_and_groups() {
    // The AVX-512 kernels' shapes (widths 64 and 128, 1 to 4 query heads per key/value head;
    // 3 of width 64 is SmolLM2's), key counts that are not a multiple of 4, keys masked on the
    // left; then a group of 5, which takes the generic kernels.
    for (heads, kv_heads, d, sk) in [
        (4, 4, 128, 13),
        (4, 2, 64, 6),
        (6, 2, 64, 11),
        (8, 2, 128, 31),
        (10, 2, 64, 9),
    ] {
        run(&Case {
            batch: 2,
            heads,
            kv_heads,
            sq: 1,
            sk,
            d,
            causal: true,
            lengths: Some((vec![sk, sk - 3], true)),
            expand_mask: false,
            tracked: [true; 3],
        });
    }
}

#[test]
fn single_query_over_a_preallocated_cache() {
    // A KV cache keeps room for later tokens: the keys are the first `len` rows of a longer
    // buffer (a strided view), which the kernel reads in place.
    let device = Device::flex();
    let mut rng = Rng::new(7);
    let (b, heads, kv, len, cap, d) = (2, 6, 2, 37, 64, 16);
    let q = tensor::<3>(&rng.data(&[b, 1, heads * d], 1.0), &device, false);
    let q = split(q, heads);
    let buffer = |rng: &mut Rng| tensor::<4>(&rng.data(&[b, kv, cap, d], 1.0), &device, false);
    let (k, v) = (buffer(&mut rng), buffer(&mut rng));
    let (k, v) = (k.narrow(2, 0, len), v.narrow(2, 0, len));
    let got = peft_ops::attention(q.clone(), k.clone(), v.clone(), None, true, None);
    let want = reference::attention(q, k, v, None, true, None);
    assert_close("cache view", got.into_data(), want.into_data());
}
