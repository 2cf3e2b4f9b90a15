//! `few_rows_matmul`: the product of `matmul` for row-major and transposed weights; a tracked
//! input gets the gradient `matmul` gives it, and a tracked weight takes the plain `matmul`.

use burn::tensor::{Device, Distribution, Tensor};

fn max_diff(a: Tensor<2>, b: Tensor<2>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn few_rows_equal_matmul_for_row_major_and_transposed_weights() {
    let device = Device::flex();
    for m in [1, 2, 8, 32, 33, 64, 65, 200, 256, 257] {
        let x = Tensor::<2>::random([m, 576], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<2>::random([576, 1000], Distribution::Normal(0.0, 0.05), &device);
        // An `[out, in]` weight viewed as `[in, out]`, as a dequantized or GGUF layer holds it.
        let stored = Tensor::<2>::random([1000, 576], Distribution::Normal(0.0, 0.05), &device);
        for w in [w, stored.transpose()] {
            assert_eq!(peft_ops::few_rows(&x, &w), m <= 256, "{m} rows");
            let diff = max_diff(
                peft_ops::few_rows_matmul(x.clone(), w.clone()),
                x.clone().matmul(w),
            );
            assert!(diff < 1e-4, "{m} rows: {diff}");
        }
    }
}

#[test]
fn a_tracked_input_gets_its_gradient() {
    let device = Device::flex().autodiff();
    for m in [4, 100] {
        // A frozen `[out, in]` weight viewed as `[in, out]` (the kernels' own layout) and a
        // row-major one (burn-flex's product).
        let stored = Tensor::<2>::random([32, 64], Distribution::Normal(0.0, 0.1), &device);
        let row_major = Tensor::<2>::random([64, 32], Distribution::Normal(0.0, 0.1), &device);
        for w in [stored.transpose(), row_major] {
            let x = Tensor::<2>::random([m, 64], Distribution::Normal(0.0, 1.0), &device);
            let leaf = Tensor::<2>::random([m, 64], Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
            // An intermediate of the graph: `is_require_grad` is false for it, `is_tracked` true.
            // One per product, so each backward has its own tape.
            let (x1, x2) = (x.clone() + leaf.clone(), x + leaf.clone());
            assert!(peft_ops::few_rows(&x1, &w), "{m} rows");
            let weights = Tensor::<2>::random([m, 32], Distribution::Normal(0.0, 1.0), &device);
            let y = peft_ops::few_rows_matmul(x1, w.clone());
            let want_y = x2.matmul(w.clone());
            assert!(max_diff(y.clone(), want_y.clone()) < 1e-4);
            let got = leaf.grad(&(y * weights.clone()).sum().backward()).unwrap();
            let want = leaf.grad(&(want_y * weights).sum().backward()).unwrap();
            assert!(max_diff(got, want) < 1e-4, "{m} rows");
        }
    }
}

#[test]
fn a_tracked_weight_keeps_its_gradient() {
    let device = Device::flex().autodiff();
    let x = Tensor::<2>::random([4, 64], Distribution::Normal(0.0, 1.0), &device);
    let w = Tensor::<2>::random([64, 32], Distribution::Normal(0.0, 0.1), &device).require_grad();
    assert!(!peft_ops::few_rows(&x, &w));
    let grads = peft_ops::few_rows_matmul(x.clone(), w.clone())
        .sum()
        .backward();
    let got = w.grad(&grads).expect("a gradient reaches the weight");
    let want = x.inner().sum_dim(0).transpose().expand([64, 32]);
    assert!(max_diff(got, want) < 1e-4);
}
