//! The tensor-level products with a [`QuantMatrix`], and their flex implementation.

use std::sync::Arc;

use burn::backend::Dispatch;
use burn::backend::flex::FlexTensor;
use burn::tensor::{Int, Tensor, TensorData};

use super::{QuantError, QuantMatrix, kernel};
use crate::backend::PeftOps;
use crate::kernels::tensor::{contiguous, dims, from_vec, slice};
use crate::reference;

/// `x` `[n, cols]` (f32) times the matrix's rows: `[n, rows]`, `out[i][j] = dot(x[i], row j)`
/// (a linear layer `x · Wᵀ` with `W` `[out, in]` stored as `rows = out`, `cols = in`).
///
/// Differentiable in `x`; the matrix is frozen (the backward gives `dx = dy · W` only). On flex
/// with `f32` one fused op each way (rows decoded block by block, never a dense copy of the
/// matrix); elsewhere [`reference::quant_matmul`], the same values.
///
/// # Panics
/// If `x`'s last dimension is not `w.cols()` (as any matmul with mismatched shapes).
///
/// ```
/// use std::sync::Arc;
/// use burn::tensor::{Device, Tensor};
/// use peft_ops::quant::{QuantFormat, QuantMatrix, quant_matmul};
///
/// let w = Arc::new(QuantMatrix::quantize(QuantFormat::F32, &[1.0, 2.0, 3.0, 4.0], 2, 2).unwrap());
/// let x = Tensor::<2>::from_floats([[1.0, 1.0]], &Device::flex());
/// let y = quant_matmul(x, &w).into_data().to_vec::<f32>().unwrap();
/// assert_eq!(y, [3.0, 7.0]);
/// ```
pub fn quant_matmul(x: Tensor<2>, w: &Arc<QuantMatrix>) -> Tensor<2> {
    let [_, cols] = x.dims();
    assert_eq!(
        cols,
        w.cols(),
        "quant_matmul: x has {cols} features, the {} matrix has rows of {}",
        w.format(),
        w.cols()
    );
    if !crate::fused(&x) {
        return reference::quant_matmul(x, w);
    }
    Tensor::from_dispatch(<Dispatch as PeftOps>::fused_quant_matmul(
        x.into_dispatch(),
        w.clone(),
    ))
}

/// `dy` `[n, rows]` times the matrix: `[n, cols]` (`dy · W`, the input gradient of
/// [`quant_matmul`], also usable as a product on its own); differentiable in `dy`.
///
/// # Panics
/// If `dy`'s last dimension is not `w.rows()`.
pub fn quant_matmul_t(dy: Tensor<2>, w: &Arc<QuantMatrix>) -> Tensor<2> {
    let [_, rows] = dy.dims();
    assert_eq!(
        rows,
        w.rows(),
        "quant_matmul_t: dy has {rows} features, the {} matrix has {} rows",
        w.format(),
        w.rows()
    );
    if !crate::fused(&dy) {
        return reference::quant_matmul_t(dy, w);
    }
    Tensor::from_dispatch(<Dispatch as PeftOps>::fused_quant_matmul_t(
        dy.into_dispatch(),
        w.clone(),
    ))
}

/// `silu(x · Gᵀ) ⊙ (x · Uᵀ)` for `x` `[n, cols]` and frozen quantized `gate`, `up`
/// `[rows, cols]` (a gated MLP's front half over a QLoRA or GGUF base): `[n, rows]`. The same
/// values as [`swiglu`](crate::swiglu) of two [`quant_matmul`]s; on flex its backward
/// recomputes the two products from `x` instead of keeping them, so a training step holds
/// `cols` values per token here rather than `2 x rows`.
///
/// # Panics
/// If `x` has other than `cols` features or the matrices differ in shape.
pub fn quant_swiglu(x: Tensor<2>, gate: &Arc<QuantMatrix>, up: &Arc<QuantMatrix>) -> Tensor<2> {
    assert!(
        gate.rows() == up.rows() && gate.cols() == up.cols(),
        "quant_swiglu: gate [{}, {}] and up [{}, {}] differ",
        gate.rows(),
        gate.cols(),
        up.rows(),
        up.cols()
    );
    if !crate::fused(&x) {
        let a = reference::quant_matmul(x.clone(), gate);
        return reference::swiglu(a, reference::quant_matmul(x, up));
    }
    let [_, cols] = x.dims();
    assert_eq!(
        cols,
        gate.cols(),
        "quant_swiglu: x has {cols} features, the matrices {}",
        gate.cols()
    );
    Tensor::from_dispatch(<Dispatch as PeftOps>::fused_quant_swiglu(
        x.into_dispatch(),
        gate.clone(),
        up.clone(),
    ))
}

/// Rows `ids` dequantized: `[k, cols]` `f32` on `ids`' device (an embedding lookup); no
/// gradient.
///
/// # Panics
/// On an id out of range (negative or `>= rows`); [`try_quant_rows`] returns the error instead.
///
/// ```
/// use std::sync::Arc;
/// use burn::tensor::{Device, Int, Tensor};
/// use peft_ops::quant::{QuantFormat, QuantMatrix, quant_rows};
///
/// let table: Vec<f32> = (0..4 * 32).map(|i| (i / 32) as f32).collect(); // row r is all r
/// let w = Arc::new(QuantMatrix::quantize(QuantFormat::F16, &table, 4, 32).unwrap());
/// let ids = Tensor::<1, Int>::from_ints([3, 1], &Device::flex());
/// let rows = quant_rows(&w, ids).into_data().to_vec::<f32>().unwrap();
/// assert_eq!((rows[0], rows[32]), (3.0, 1.0));
/// ```
pub fn quant_rows(w: &Arc<QuantMatrix>, ids: Tensor<1, Int>) -> Tensor<2> {
    try_quant_rows(w, ids).unwrap_or_else(|e| panic!("quant_rows: {e}"))
}

/// [`quant_rows`], with an id out of range as an error.
pub fn try_quant_rows(w: &Arc<QuantMatrix>, ids: Tensor<1, Int>) -> Result<Tensor<2>, QuantError> {
    let device = ids.device();
    let data = ids.into_data().convert::<i64>();
    let rows: Vec<usize> = data
        .iter::<i64>()
        .map(|id| {
            usize::try_from(id)
                .ok()
                .filter(|&r| r < w.rows())
                .ok_or(QuantError::InvalidRowId { id, rows: w.rows() })
        })
        .collect::<Result<_, _>>()?;
    let values = w.gather_rows(&rows)?;
    Ok(Tensor::from_data(
        TensorData::new(values, [rows.len(), w.cols()]),
        &device,
    ))
}

/// The fused product on flex: `x · Wᵀ` (`transposed = false`, `x` `[n, cols]`) or `x · W`
/// (`transposed = true`, `x` `[n, rows]`).
pub(crate) fn flex_product(x: FlexTensor, w: &QuantMatrix, transposed: bool) -> FlexTensor {
    let x = contiguous(x);
    let d = dims(&x);
    assert_eq!(d.len(), 2, "quant_matmul: x must be 2-D, got {d:?}");
    let n = d[0];
    let (inner, width) = if transposed {
        (w.rows(), w.cols())
    } else {
        (w.cols(), w.rows())
    };
    assert_eq!(d[1], inner, "quant_matmul: x {d:?} does not fit the matrix");
    let mut out = vec![0f32; n * width];
    if transposed {
        kernel::matmul_t(w, slice(&x), n, &mut out);
    } else {
        kernel::matmul(w, slice(&x), n, &mut out);
    }
    from_vec(out, &[n, width])
}
