//! LoRA on activations as one op: `out = y + s·(drop(x)·A)·B`.
//!
//! The forward keeps `x`, the rank-`r` product `low = drop(x)·A` and the dropout key; the
//! backward regenerates the mask and computes only what is asked for:
//! `dlow = s·g·Bᵀ`, `dB = s·lowᵀ·g`, `dA = drop(x)ᵀ·dlow`, `dx = drop(dlow·Aᵀ)`, `dy = g`.
//! No `[n, in]` masked copy of `x` outlives the forward (the composed version keeps it for the
//! matmul's backward).

use burn::backend::flex::FlexTensor;

use super::dropout::{self, Mask};
use super::matmul::{Mat, MatMut, gemm};
use super::tensor::{contiguous, dims, exclusive, from_vec, owned, slice};

/// Sizes of a LoRA product.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    n: usize,
    d_in: usize,
    r: usize,
    d_out: usize,
}

fn sizes(x: &FlexTensor, a: &FlexTensor, b: &FlexTensor) -> Sizes {
    let (xd, ad, bd) = (dims(x), dims(a), dims(b));
    assert!(
        xd.len() == 2 && ad.len() == 2 && bd.len() == 2,
        "lora: x, A and B must be 2-D"
    );
    assert!(
        xd[1] == ad[0] && ad[1] == bd[0],
        "lora: x {xd:?}, A {ad:?}, B {bd:?} do not chain"
    );
    Sizes {
        n: xd[0],
        d_in: xd[1],
        r: ad[1],
        d_out: bd[1],
    }
}

/// The forward: `(out, low)`. `x`, `a`, `b` must be contiguous.
pub fn forward(
    x: &FlexTensor,
    y: FlexTensor,
    a: &FlexTensor,
    b: &FlexTensor,
    scaling: f32,
    mask: Option<Mask>,
) -> (FlexTensor, FlexTensor) {
    let sz = sizes(x, a, b);
    let xs = slice(x);
    let dropped = mask.map(|m| dropout::apply(xs, m));
    let input = dropped.as_deref().unwrap_or(xs);
    let mut low = vec![0f32; sz.n * sz.r];
    // SAFETY (both GEMMs): the buffers hold the shapes given; nothing else writes them.
    unsafe {
        gemm(
            MatMut::row_major(&mut low, sz.r),
            false,
            Mat::row_major(input, sz.n, sz.d_in),
            Mat::row_major(slice(a), sz.d_in, sz.r),
            1.0,
            true,
        )
    };
    drop(dropped);
    assert_eq!(dims(&y), [sz.n, sz.d_out], "lora: y must be [n, out]");
    // The base output's buffer becomes the result when nothing else holds it (copied otherwise).
    // In place, not through `into_data`: a buffer from flex's own ops is allocated 16-aligned,
    // which `TensorData::try_into_vec::<f32>` cannot hand over, so it copied every time.
    let mut out = owned(y);
    let buf = exclusive(&mut out).expect("a fresh tensor owns its buffer");
    unsafe {
        gemm(
            MatMut::row_major(buf, sz.d_out),
            true,
            Mat::row_major(&low, sz.n, sz.r),
            Mat::row_major(slice(b), sz.r, sz.d_out),
            scaling,
            true,
        )
    };
    (out, from_vec(low, &[sz.n, sz.r]))
}

/// Which gradients to compute.
#[derive(Debug, Clone, Copy)]
pub struct Needs {
    /// The input `x`.
    pub x: bool,
    /// `A`.
    pub a: bool,
    /// `B`.
    pub b: bool,
}

/// Gradients `(dx, dA, dB)` named in `needs` (`dy` is the incoming gradient itself).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &FlexTensor,
    a: &FlexTensor,
    b: &FlexTensor,
    low: &FlexTensor,
    grad: &FlexTensor,
    scaling: f32,
    mask: Option<Mask>,
    needs: Needs,
) -> (Option<FlexTensor>, Option<FlexTensor>, Option<FlexTensor>) {
    let sz = sizes(x, a, b);
    let grad = contiguous(grad.clone());
    let g = Mat::row_major(slice(&grad), sz.n, sz.d_out);
    let a_mat = Mat::row_major(slice(a), sz.d_in, sz.r);
    let b_mat = Mat::row_major(slice(b), sz.r, sz.d_out);
    // SAFETY (every GEMM below): each destination is a fresh buffer of the product's shape.
    let db = needs.b.then(|| {
        let mut db = vec![0f32; sz.r * sz.d_out];
        let low = Mat::row_major(slice(low), sz.n, sz.r);
        unsafe {
            gemm(
                MatMut::row_major(&mut db, sz.d_out),
                false,
                low.t(),
                g,
                scaling,
                true,
            )
        };
        from_vec(db, &[sz.r, sz.d_out])
    });
    if !needs.a && !needs.x {
        return (None, None, db);
    }
    let mut dlow = vec![0f32; sz.n * sz.r];
    unsafe {
        gemm(
            MatMut::row_major(&mut dlow, sz.r),
            false,
            g,
            b_mat.t(),
            scaling,
            true,
        )
    };
    let dlow_mat = Mat::row_major(&dlow, sz.n, sz.r);
    let da = needs.a.then(|| {
        let xs = slice(x);
        let dropped = mask.map(|m| dropout::apply(xs, m));
        let input = dropped.as_deref().unwrap_or(xs);
        let mut da = vec![0f32; sz.d_in * sz.r];
        unsafe {
            gemm(
                MatMut::row_major(&mut da, sz.r),
                false,
                Mat::row_major(input, sz.n, sz.d_in).t(),
                dlow_mat,
                1.0,
                true,
            )
        };
        from_vec(da, &[sz.d_in, sz.r])
    });
    let dx = needs.x.then(|| {
        let mut dx = vec![0f32; sz.n * sz.d_in];
        unsafe {
            gemm(
                MatMut::row_major(&mut dx, sz.d_in),
                false,
                dlow_mat,
                a_mat.t(),
                1.0,
                true,
            )
        };
        let dx = match mask {
            Some(m) => dropout::apply(&dx, m),
            None => dx,
        };
        from_vec(dx, &[sz.n, sz.d_in])
    });
    (dx, da, db)
}

#[cfg(test)]
mod tests {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{DType, Shape};

    use super::super::tensor::{from_vec, slice};

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| ((i * 7 + seed * 13) % 23) as f32 / 23.0 - 0.5)
            .collect()
    }

    /// `y` as flex's own ops allocate it (16-aligned, which `TensorData::try_into_vec::<f32>`
    /// cannot take over).
    fn flex_owned(v: &[f32], shape: [usize; 2]) -> FlexTensor {
        let mut t = FlexTensor::empty(Shape::from(shape.to_vec()), DType::F32);
        t.try_storage_mut::<f32>().unwrap().copy_from_slice(v);
        t
    }

    /// The base output is updated in its own buffer when nothing else holds it, and copied (and
    /// left as it was) when something does; both give `y + s·(x·A)·B`.
    #[test]
    fn base_output_in_place_or_copied() {
        let (n, d_in, r, d_out) = (37, 24, 4, 40);
        let (xv, yv, av, bv) = (
            values(n * d_in, 1),
            values(n * d_out, 2),
            values(d_in * r, 3),
            values(r * d_out, 4),
        );
        let mut expected = yv.clone();
        for i in 0..n {
            for j in 0..d_out {
                let mut acc = 0f64;
                for k in 0..r {
                    let low: f64 = (0..d_in)
                        .map(|c| f64::from(xv[i * d_in + c]) * f64::from(av[c * r + k]))
                        .sum();
                    acc += low * f64::from(bv[k * d_out + j]);
                }
                expected[i * d_out + j] += (0.5 * acc) as f32;
            }
        }
        let (x, a, b) = (
            from_vec(xv, &[n, d_in]),
            from_vec(av, &[d_in, r]),
            from_vec(bv, &[r, d_out]),
        );
        let check = |out: &FlexTensor| {
            let err = slice(out)
                .iter()
                .zip(&expected)
                .map(|(o, e)| (o - e).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "max error {err}");
        };

        let y = flex_owned(&yv, [n, d_out]);
        let at = slice(&y).as_ptr();
        let (out, _) = super::forward(&x, y, &a, &b, 0.5, None);
        assert_eq!(
            slice(&out).as_ptr(),
            at,
            "an unshared y is updated in place"
        );
        check(&out);

        let y = flex_owned(&yv, [n, d_out]);
        let (out, _) = super::forward(&x, y.clone(), &a, &b, 0.5, None);
        assert_ne!(slice(&out).as_ptr(), slice(&y).as_ptr());
        assert_eq!(slice(&y), &yv[..], "a shared y is left as it was");
        check(&out);
    }
}
