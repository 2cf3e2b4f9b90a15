//! The fused quantized products against the reference composition (dequantize, then Burn's
//! matmul): values and input gradients for every format, `n = 1` (the matrix-vector kernel) and
//! `n > 1` (tiles + GEMM), row counts that are not a multiple of a tile or a task; the embedding
//! lookup, row selection, and the typed errors.

use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_ops::quant::{
    QuantBytes, QuantError, QuantFormat, QuantMatrix, quant_matmul, quant_matmul_t, quant_rows,
    quant_swiglu, try_quant_rows,
};
use peft_ops::reference;

/// SplitMix64, so the inputs do not depend on any device RNG.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }

    fn values(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * std).collect()
    }
}

/// Byte offsets of the `f16` scales in a block (ggml-common.h).
fn f16_fields(format: QuantFormat) -> &'static [usize] {
    match format {
        QuantFormat::Q2_K => &[80, 82],
        QuantFormat::Q3_K => &[108],
        QuantFormat::Q4_K | QuantFormat::Q5_K => &[0, 2],
        QuantFormat::Q6_K => &[208],
        _ => &[],
    }
}

/// A random matrix: quantized normal values, or random valid blocks (random bits, small finite
/// `f16` scales) for the K-quants, which are not quantized here.
fn random_matrix(format: QuantFormat, rows: usize, cols: usize, rng: &mut Rng) -> QuantMatrix {
    if format.can_quantize() {
        let values = rng.values(rows * cols, 0.5);
        return QuantMatrix::quantize(format, &values, rows, cols).unwrap();
    }
    let bb = format.block_bytes();
    let mut bytes: Vec<u8> = (0..rows * format.row_bytes(cols).unwrap())
        .map(|_| rng.next_u64() as u8)
        .collect();
    for block in bytes.chunks_exact_mut(bb) {
        for &off in f16_fields(format) {
            let scale = half::f16::from_f32(rng.normal() * 0.01);
            block[off..off + 2].copy_from_slice(&scale.to_bits().to_le_bytes());
        }
    }
    QuantMatrix::new(format, rows, cols, QuantBytes::from_vec(bytes)).unwrap()
}

/// `(rows, cols)` cases per format: a small one, and one with several tiles, several rayon
/// tasks and two column chunks, none of them full at the end.
fn shapes(format: QuantFormat) -> [(usize, usize); 3] {
    match format.block_size() {
        1 => [(1, 7), (37, 40), (300, 512)],
        32 => [(1, 32), (37, 96), (300, 512)],
        64 => [(1, 64), (37, 192), (300, 512)],
        _ => [(1, 256), (37, 256), (300, 512)],
    }
}

/// Asserts `|got - want| <= 2e-5 · Σ|a_k·b_k| + 1e-6` element by element, where `scale` holds
/// `Σ|a_k·b_k|` of each element (the size of the dot product's rounding error).
fn assert_close(what: &str, got: &[f32], want: &[f32], scale: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
        let tol = 2e-5 * s + 1e-6;
        assert!(
            (g - w).abs() <= tol,
            "{what}: element {i}: {g} vs {w} (tolerance {tol:e})"
        );
    }
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// `Σ_k |a[i][k]·b[k][j]|` for row-major `a` `[n, k]` and `b` `[k, m]`.
fn abs_product(a: &[f32], b: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    for i in 0..n {
        for kk in 0..k {
            let av = a[i * k + kk].abs();
            for j in 0..m {
                out[i * m + j] += av * b[kk * m + j].abs();
            }
        }
    }
    out
}

fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; a.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
    t
}

#[test]
fn fused_matches_reference_values_and_input_gradients() {
    let mut rng = Rng(7);
    let device = Device::flex().autodiff();
    for format in QuantFormat::ALL {
        for (rows, cols) in shapes(format) {
            let w = Arc::new(random_matrix(format, rows, cols, &mut rng));
            let dense = w.dequantize();
            let dense_t = transpose(&dense, rows, cols);
            for n in [1, 3, 33] {
                let what = format!("{format} [{rows}, {cols}] n={n}");
                let xv = rng.values(n * cols, 1.0);
                let gv = rng.values(n * rows, 1.0);
                let x_data = TensorData::new(xv.clone(), [n, cols]);
                let g_data = TensorData::new(gv.clone(), [n, rows]);

                // Forward, through autodiff, with the gradient of `Σ y·g` (dx = g · W).
                let x = Tensor::<2>::from_data(x_data.clone(), &device).require_grad();
                let y = quant_matmul(x.clone(), &w);
                let g = Tensor::<2>::from_data(g_data.clone(), &device);
                let grads = (y.clone() * g.clone()).sum().backward();
                let dx = to_vec(x.grad(&grads).unwrap());

                let xr = Tensor::<2>::from_data(x_data.clone(), &device).require_grad();
                let yr = reference::quant_matmul(xr.clone(), &w);
                let grads_r = (yr.clone() * g).sum().backward();
                let dxr = to_vec(xr.grad(&grads_r).unwrap());

                let y_scale = abs_product(&xv, &dense_t, n, cols, rows);
                assert_close(
                    &format!("{what} forward"),
                    &to_vec(y),
                    &to_vec(yr),
                    &y_scale,
                );
                let dx_scale = abs_product(&gv, &dense, n, rows, cols);
                assert_close(&format!("{what} dx"), &dx, &dxr, &dx_scale);

                // The transposed product on its own, without autodiff.
                let plain = Device::flex();
                let dy = Tensor::<2>::from_data(g_data.clone(), &plain);
                let t = quant_matmul_t(dy.clone(), &w);
                let tr = reference::quant_matmul_t(dy, &w);
                assert_close(&format!("{what} dy·W"), &to_vec(t), &to_vec(tr), &dx_scale);
            }
        }
    }
}

#[test]
fn gradients_flow_through_both_products() {
    // `z = quant_matmul_t(quant_matmul(x))` = x·Wᵀ·W: dx = g·Wᵀ·W through two fused nodes.
    let mut rng = Rng(11);
    let w = Arc::new(random_matrix(QuantFormat::Q4_K, 20, 256, &mut rng));
    let device = Device::flex().autodiff();
    let x_data = TensorData::new(rng.values(5 * 256, 1.0), [5, 256]);
    let g_data = TensorData::new(rng.values(5 * 256, 1.0), [5, 256]);
    let run = |fused: bool| {
        let x = Tensor::<2>::from_data(x_data.clone(), &device).require_grad();
        let z = if fused {
            quant_matmul_t(quant_matmul(x.clone(), &w), &w)
        } else {
            reference::quant_matmul_t(reference::quant_matmul(x.clone(), &w), &w)
        };
        let g = Tensor::<2>::from_data(g_data.clone(), &device);
        let grads = (z.clone() * g).sum().backward();
        (to_vec(z), to_vec(x.grad(&grads).unwrap()))
    };
    let ((z, dx), (zr, dxr)) = (run(true), run(false));
    let max = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = vec![max(&zr).max(max(&dxr)); z.len()];
    assert_close("z", &z, &zr, &scale);
    assert_close("dx", &dx, &dxr, &scale);
}

/// SwiGLU over two frozen quantized projections, its backward recomputing both products: the
/// values and input gradient of `swiglu(quant_matmul(x, G), quant_matmul(x, U))`, for the
/// formats a QLoRA or GGUF MLP has, tracked and untracked.
#[test]
fn quant_swiglu_equals_the_composition_and_recomputes_its_gradient() {
    let mut rng = Rng(23);
    for format in [
        QuantFormat::Q4_1,
        QuantFormat::Nf4,
        QuantFormat::Q8_0,
        QuantFormat::BF16,
    ] {
        let gate = Arc::new(random_matrix(format, 96, 128, &mut rng));
        let up = Arc::new(random_matrix(format, 96, 128, &mut rng));
        let device = Device::flex().autodiff();
        let x_data = TensorData::new(rng.values(7 * 128, 1.0), [7, 128]);
        let g_data = TensorData::new(rng.values(7 * 96, 1.0), [7, 96]);
        let run = |fused: bool| {
            let x = Tensor::<2>::from_data(x_data.clone(), &device).require_grad();
            let z = if fused {
                quant_swiglu(x.clone(), &gate, &up)
            } else {
                peft_ops::swiglu(quant_matmul(x.clone(), &gate), quant_matmul(x.clone(), &up))
            };
            let g = Tensor::<2>::from_data(g_data.clone(), &device);
            let grads = (z.clone() * g).sum().backward();
            (to_vec(z), to_vec(x.grad(&grads).unwrap()))
        };
        let ((z, dx), (zr, dxr)) = (run(true), run(false));
        let max = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scale = vec![max(&zr).max(max(&dxr)); z.len().max(dx.len())];
        assert_close(&format!("{format:?} z"), &z, &zr, &scale);
        assert_close(&format!("{format:?} dx"), &dx, &dxr, &scale);
        // Untracked (inference): the forward alone.
        let x = Tensor::<2>::from_data(x_data.clone(), &Device::flex());
        assert_close(
            &format!("{format:?} plain"),
            &to_vec(quant_swiglu(x, &gate, &up)),
            &zr,
            &scale,
        );
    }
}

#[test]
fn untracked_inputs_and_empty_matrices() {
    let mut rng = Rng(3);
    let w = Arc::new(random_matrix(QuantFormat::Q8_0, 9, 64, &mut rng));
    let device = Device::flex().autodiff();
    let x = Tensor::<2>::from_data(TensorData::new(rng.values(2 * 64, 1.0), [2, 64]), &device);
    assert_eq!(quant_matmul(x, &w).dims(), [2, 9]);

    let plain = Device::flex();
    let no_rows =
        Arc::new(QuantMatrix::new(QuantFormat::Q4_0, 0, 64, QuantBytes::from_vec(vec![])).unwrap());
    let y = quant_matmul(Tensor::<2>::ones([3, 64], &plain), &no_rows);
    assert_eq!(y.dims(), [3, 0]);
    let no_cols =
        Arc::new(QuantMatrix::new(QuantFormat::Q4_0, 4, 0, QuantBytes::from_vec(vec![])).unwrap());
    let y = quant_matmul(Tensor::<2>::ones([3, 0], &plain), &no_cols);
    assert_eq!(to_vec(y), vec![0.0; 12]);
    let dx = quant_matmul_t(Tensor::<2>::ones([1, 4], &plain), &no_cols);
    assert_eq!(dx.dims(), [1, 0]);
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let mut rng = Rng(5);
    let w = Arc::new(random_matrix(QuantFormat::Q4_1, 300, 512, &mut rng));
    let device = Device::flex();
    for n in [1, 4] {
        let x =
            Tensor::<2>::from_data(TensorData::new(rng.values(n * 512, 1.0), [n, 512]), &device);
        let many = to_vec(quant_matmul(x.clone(), &w));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let one = pool.install(|| to_vec(quant_matmul(x, &w)));
        assert_eq!(
            many.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "n = {n}"
        );
    }
}

#[test]
fn rows_lookup_and_row_selection() {
    let mut rng = Rng(9);
    for format in [
        QuantFormat::Q6_K,
        QuantFormat::Q4_0,
        QuantFormat::Nf4,
        QuantFormat::BF16,
    ] {
        let cols = format.block_size().max(32) * 2;
        let w = Arc::new(random_matrix(format, 10, cols, &mut rng));
        let dense = w.dequantize();
        let row = |r: usize| &dense[r * cols..(r + 1) * cols];
        let device = Device::flex();

        let ids = Tensor::<1, Int>::from_ints([7, 0, 7, 9], &device);
        let got = to_vec(quant_rows(&w, ids));
        let want: Vec<f32> = [7, 0, 7, 9].iter().flat_map(|&r| row(r).to_vec()).collect();
        assert_eq!(got, want, "{format}");
        // On an autodiff device too (no gradient: a constant).
        let ids = Tensor::<1, Int>::from_ints([2], &device.clone().autodiff());
        assert_eq!(to_vec(quant_rows(&w, ids)), row(2).to_vec());

        for bad in [10, -1] {
            let ids = Tensor::<1, Int>::from_ints([1, bad], &device);
            let err = try_quant_rows(&w, ids).unwrap_err();
            assert_eq!(err, QuantError::InvalidRowId { id: bad, rows: 10 });
        }
        assert!(matches!(
            w.gather_rows(&[0, 12]),
            Err(QuantError::RowOutOfRange { row: 12, rows: 10 })
        ));

        // select_rows copies whole quantized rows: the values are the rows', bit for bit.
        let order = [3, 1, 1, 9, 0];
        let picked = w.select_rows(&order).unwrap();
        assert_eq!(
            (picked.rows(), picked.cols(), picked.format()),
            (5, cols, format)
        );
        let want: Vec<f32> = order.iter().flat_map(|&r| row(r).to_vec()).collect();
        assert_eq!(picked.dequantize(), want);
        assert!(matches!(
            w.select_rows(&[0, 10]),
            Err(QuantError::RowOutOfRange { row: 10, rows: 10 })
        ));
        assert_eq!(w.select_rows(&[]).unwrap().rows(), 0);

        let sliced = w.slice_rows(2, 5).unwrap();
        assert_eq!(sliced.dequantize(), dense[2 * cols..5 * cols].to_vec());
        assert!(w.slice_rows(4, 11).is_err());
        assert!(w.slice_rows(5, 4).is_err());
    }
}

#[test]
fn bad_sizes_are_typed_errors() {
    let bytes = |n: usize| QuantBytes::from_vec(vec![0; n]);
    // A data length that does not fit.
    let err = QuantMatrix::new(QuantFormat::Q4_1, 3, 64, bytes(3 * 2 * 20 - 1)).unwrap_err();
    assert_eq!(
        err,
        QuantError::DataLength {
            format: QuantFormat::Q4_1,
            rows: 3,
            cols: 64,
            expected: 120,
            actual: 119
        }
    );
    assert!(err.to_string().contains("120"));
    // Columns not a whole number of blocks.
    let err = QuantMatrix::new(QuantFormat::Q4_K, 1, 300, bytes(144)).unwrap_err();
    assert!(matches!(
        err,
        QuantError::ColsNotMultiple {
            cols: 300,
            block_size: 256,
            ..
        }
    ));
    // Sizes that overflow: refused before allocating anything.
    for (rows, cols) in [
        (usize::MAX, 32),
        (usize::MAX / 2, 64),
        (2, usize::MAX / 32 * 32),
    ] {
        let err = QuantMatrix::new(QuantFormat::Q8_0, rows, cols, bytes(34)).unwrap_err();
        assert!(
            matches!(err, QuantError::TooLarge { .. }),
            "{rows} x {cols}: {err}"
        );
    }
    let err = QuantMatrix::new(QuantFormat::F32, usize::MAX / 4, 2, bytes(8)).unwrap_err();
    assert!(matches!(err, QuantError::TooLarge { .. }), "{err}");
    // An unknown GGML type id.
    for id in [4, 9, 15, 16, 23, 39, 1000, u32::MAX] {
        assert_eq!(QuantFormat::from_ggml_type(id), None);
        assert_eq!(
            QuantFormat::try_from_ggml_type(id),
            Err(QuantError::UnknownGgmlType(id))
        );
    }
    assert_eq!(QuantFormat::Nf4.ggml_type(), None);
    // A byte range outside its buffer.
    let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(vec![0u8; 10]);
    assert!(matches!(
        QuantBytes::new(owner.clone(), 4..11),
        Err(QuantError::RangeOutOfBounds { len: 10, .. })
    ));
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = QuantBytes::new(owner, 6..5);
    assert!(reversed.is_err());
    // Quantization that is not supported or does not fit.
    assert_eq!(
        QuantMatrix::quantize(QuantFormat::Q5_K, &[0.0; 256], 1, 256).unwrap_err(),
        QuantError::CannotQuantize(QuantFormat::Q5_K)
    );
    assert!(
        QuantMatrix::quantize(QuantFormat::Q5_K, &[0.0; 256], 1, 256)
            .unwrap_err()
            .to_string()
            .contains("Q5_K")
    );
    assert!(matches!(
        QuantMatrix::quantize(QuantFormat::Q8_0, &[0.0; 63], 2, 32),
        Err(QuantError::ValuesLength {
            expected: 64,
            actual: 63
        })
    ));
    let mut v = vec![1.0; 64];
    v[40] = f32::NAN;
    assert!(matches!(
        QuantMatrix::quantize(QuantFormat::Nf4, &v, 1, 64),
        Err(QuantError::NonFinite { index: 40, .. })
    ));
    // Plain float formats keep non-finite values.
    assert!(QuantMatrix::quantize(QuantFormat::F16, &v, 1, 64).is_ok());
}
