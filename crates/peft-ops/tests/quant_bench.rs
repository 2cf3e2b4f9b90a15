//! Throughput of the fused quantized products (ignored by default; run with
//! `cargo test -p peft-ops --test quant_bench -- --ignored --nocapture`).
//!
//! Decoding one token multiplies a `[1, in]` activation by every weight matrix once, so a
//! matrix-vector product's time is what a generated token costs per matrix: the shapes are
//! SmolLM2-135M's (hidden 576, MLP 1536, vocabulary 49152). Each case runs on rayon pools of 1
//! and 2 threads, against Burn's dense `f32` matmul on flex of the same shape (`x · W` with
//! `W` `[in, out]`, what `burn::nn::Linear` computes), and prints the time per product, the
//! GFLOP/s (`2·rows·cols` per product) and the GB/s of weight bytes read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::{Device, Tensor, TensorData};
use peft_ops::quant::{QuantBytes, QuantFormat, QuantMatrix, quant_matmul};

/// Median time of `f` over about 0.5 s of runs (after a warm-up).
fn time(mut f: impl FnMut()) -> Duration {
    for _ in 0..3 {
        f();
    }
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < Duration::from_millis(500) || samples.len() < 5 {
        let t = Instant::now();
        f();
        samples.push(t.elapsed());
    }
    samples.sort();
    samples[samples.len() / 2]
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32 ^ seed).wrapping_mul(0x9E37_79B9).rotate_left(13);
            (h as f32 / u32::MAX as f32 - 0.5) * 0.2
        })
        .collect()
}

/// `values` quantized, or for the K-quants (not quantized here) random blocks with small
/// `f16` scales at their ggml-common.h offsets.
fn matrix(format: QuantFormat, values: &[f32], rows: usize, cols: usize) -> QuantMatrix {
    if format.can_quantize() {
        return QuantMatrix::quantize(format, values, rows, cols).unwrap();
    }
    let fields: &[usize] = match format {
        QuantFormat::Q2_K => &[80, 82],
        QuantFormat::Q3_K => &[108],
        QuantFormat::Q6_K => &[208],
        _ => &[0, 2],
    };
    let mut bytes: Vec<u8> = values.iter().map(|v| v.to_bits() as u8).collect();
    bytes.truncate(rows * format.row_bytes(cols).unwrap());
    for block in bytes.chunks_exact_mut(format.block_bytes()) {
        for &off in fields {
            block[off..off + 2].copy_from_slice(&0x2000u16.to_le_bytes());
        }
    }
    QuantMatrix::new(format, rows, cols, QuantBytes::from_vec(bytes)).unwrap()
}

#[test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
fn quant_matvec_throughput() {
    let device = Device::flex();
    let cases = [
        (QuantFormat::Q4_1, 576, 1536, 1),
        (QuantFormat::Q4_1, 1536, 576, 1),
        (QuantFormat::Q8_0, 49152, 576, 1),
        (QuantFormat::Q4_K, 576, 1536, 1),
        (QuantFormat::Q5_K, 576, 1536, 1),
        (QuantFormat::Q6_K, 576, 1536, 1),
        (QuantFormat::F16, 576, 1536, 1),
        (QuantFormat::Q5_0, 576, 1536, 1),
        (QuantFormat::Nf4, 1536, 576, 1),
        (QuantFormat::Q4_1, 1536, 576, 64),
        (QuantFormat::Q8_0, 49152, 576, 16),
    ];
    println!(
        "{:<6} {:>6} x {:<5} {:>3} {:>3}  {:>10} {:>8} {:>7}   {:>10} {:>8} {:>7}  {:>6}",
        "format",
        "rows",
        "cols",
        "n",
        "thr",
        "fused µs",
        "GFLOP/s",
        "GB/s",
        "dense µs",
        "GFLOP/s",
        "GB/s",
        "ratio"
    );
    for (format, rows, cols, n) in cases {
        let w_values = values(rows * cols, 1);
        let w = Arc::new(matrix(format, &w_values, rows, cols));
        let x = Tensor::<2>::from_data(TensorData::new(values(n * cols, 2), [n, cols]), &device);
        // Burn's layout for a linear layer: `[in, out]`.
        let mut t = vec![0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = w_values[r * cols + c];
            }
        }
        let dense = Tensor::<2>::from_data(TensorData::new(t, [cols, rows]), &device);
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (fused, plain) = pool.install(|| {
                let fused = time(|| {
                    let y = quant_matmul(x.clone(), &w);
                    std::hint::black_box(y.into_data());
                });
                let plain = time(|| {
                    let y = x.clone().matmul(dense.clone());
                    std::hint::black_box(y.into_data());
                });
                (fused, plain)
            });
            let flops = 2.0 * (n * rows * cols) as f64;
            let (fs, ds) = (fused.as_secs_f64(), plain.as_secs_f64());
            println!(
                "{:<6} {:>6} x {:<5} {:>3} {:>3}  {:>10.1} {:>8.2} {:>7.2}   {:>10.1} {:>8.2} {:>7.2}  {:>6.2}",
                format.name(),
                rows,
                cols,
                n,
                threads,
                fs * 1e6,
                flops / fs / 1e9,
                w.stored_bytes() as f64 / fs / 1e9,
                ds * 1e6,
                flops / ds / 1e9,
                (rows * cols * 4) as f64 / ds / 1e9,
                ds / fs,
            );
        }
    }
}

/// One generated token's matrix-vector products for a SmolLM2-135M-shaped stack (30 layers of
/// q/o `576x576`, k/v `192x576`, gate/up `1536x576`, down `576x1536`, and the `49152x576` LM
/// head): every layer's matrices distinct, so the weights stream from memory as in a real model
/// (Q4_1 layers and a Q8_0 head: about 80 MB; f32: about 540 MB). Attention, norms and
/// activations are left out: this is the weight-bound part of a token.
#[test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
fn token_throughput() {
    let device = Device::flex();
    let layer: [(usize, usize); 7] = [
        (576, 576),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let mut shapes: Vec<(QuantFormat, usize, usize)> = (0..30)
        .flat_map(|_| layer.iter().map(|&(r, c)| (QuantFormat::Q4_1, r, c)))
        .collect();
    shapes.push((QuantFormat::Q8_0, 49152, 576));
    let mut quant = Vec::new();
    let mut dense = Vec::new();
    for (i, &(format, rows, cols)) in shapes.iter().enumerate() {
        let v = values(rows * cols, i as u32);
        quant.push(Arc::new(matrix(format, &v, rows, cols)));
        // Values do not matter for the timing: Burn's `[in, out]` layout of the same size.
        dense.push(Tensor::<2>::from_data(
            TensorData::new(v, [cols, rows]),
            &device,
        ));
    }
    let inputs: Vec<Tensor<2>> = [576, 1536]
        .iter()
        .map(|&c| Tensor::<2>::from_data(TensorData::new(values(c, 9), [1, c]), &device))
        .collect();
    let input = |cols: usize| inputs[usize::from(cols == 1536)].clone();
    let weights: usize = shapes.iter().map(|&(_, r, c)| r * c).sum();
    let stored: usize = quant.iter().map(|w| w.stored_bytes()).sum();
    println!(
        "{} matrices, {:.1} M weights: quantized {:.1} MB, f32 {:.1} MB",
        shapes.len(),
        weights as f64 / 1e6,
        stored as f64 / 1e6,
        (weights * 4) as f64 / 1e6
    );
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let (fused, plain) = pool.install(|| {
            let fused = time(|| {
                for w in &quant {
                    let y = quant_matmul(input(w.cols()), w);
                    std::hint::black_box(y.into_data());
                }
            });
            let plain = time(|| {
                for d in &dense {
                    let y = input(d.dims()[0]).matmul(d.clone());
                    std::hint::black_box(y.into_data());
                }
            });
            (fused, plain)
        });
        let (fs, ds) = (fused.as_secs_f64(), plain.as_secs_f64());
        println!(
            "{threads} thread(s): quantized {:.2} ms/token ({:.1} tokens/s, {:.2} GB/s, {:.2} GFLOP/s), \
             dense f32 {:.2} ms/token ({:.1} tokens/s, {:.2} GB/s, {:.2} GFLOP/s)",
            fs * 1e3,
            1.0 / fs,
            stored as f64 / fs / 1e9,
            2.0 * weights as f64 / fs / 1e9,
            ds * 1e3,
            1.0 / ds,
            (weights * 4) as f64 / ds / 1e9,
            2.0 * weights as f64 / ds / 1e9,
        );
    }
}
