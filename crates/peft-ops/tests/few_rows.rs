//! `few_rows_matmul`: the product of `matmul` for row-major and transposed weights, and an
//! operand inside an autodiff graph keeps its gradient (the plain `matmul` then runs).

use burn::tensor::{Device, Distribution, Tensor};

fn max_diff(a: Tensor<2>, b: Tensor<2>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn few_rows_equal_matmul_for_row_major_and_transposed_weights() {
    let device = Device::flex();
    for m in [1, 2, 8, 32, 33, 64, 65] {
        let x = Tensor::<2>::random([m, 576], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<2>::random([576, 1000], Distribution::Normal(0.0, 0.05), &device);
        // An `[out, in]` weight viewed as `[in, out]`, as a dequantized or GGUF layer holds it.
        let stored = Tensor::<2>::random([1000, 576], Distribution::Normal(0.0, 0.05), &device);
        for w in [w, stored.transpose()] {
            assert_eq!(peft_ops::few_rows(&x, &w), m <= 64, "{m} rows");
            let diff = max_diff(
                peft_ops::few_rows_matmul(x.clone(), w.clone()),
                x.clone().matmul(w),
            );
            assert!(diff < 1e-4, "{m} rows: {diff}");
        }
    }
}

#[test]
fn a_tracked_operand_keeps_its_gradient() {
    let device = Device::flex().autodiff();
    let x = Tensor::<2>::random([4, 64], Distribution::Normal(0.0, 1.0), &device);
    let w = Tensor::<2>::random([64, 32], Distribution::Normal(0.0, 0.1), &device);
    let leaf = Tensor::<2>::random([4, 64], Distribution::Normal(0.0, 1.0), &device).require_grad();
    // An intermediate of the graph: `is_require_grad` is false for it, `is_tracked` true.
    let x = x + leaf.clone();
    assert!(!peft_ops::few_rows(&x, &w));
    let grads = peft_ops::few_rows_matmul(x.clone(), w.clone())
        .sum()
        .backward();
    let got = leaf.grad(&grads).expect("a gradient reaches the leaf");
    let want = w.inner().sum_dim(1).transpose().expand([4, 64]);
    assert!(max_diff(got, want) < 1e-5);
}
