//! Truncated SVD of a combined delta, as PEFT's `_svd_generalized_task_arithmetic_weighted_adapter`
//! uses it: `U, S, Vh = svd(delta)`, `B = U[:, :r] @ diag(S[:r])`, `A = Vh[:r]`, optionally
//! clamped at a quantile of their values.
//!
//! The decomposition itself is Burn's (`burn-linalg`: Golub-Kahan bidiagonalization and
//! LAPACK-style `dbdsqr`), in float64 on the host.

use std::panic::{AssertUnwindSafe, catch_unwind};

use burn::tensor::{DType, Device, Tensor, TensorData};

use super::matrix::Matrix;
use super::qr::thin_qr;

/// Upper bound on QR sweeps per singular value (LAPACK's `dbdsqr` allows 6; this is lenient).
const SWEEPS: usize = 60;

/// `U [rows, k]`, singular values `[k]` (descending) and `Vt [k, cols]`, `k = min(rows, cols)`.
#[derive(Debug, Clone)]
pub struct Svd {
    /// Left singular vectors, one per column.
    pub u: Matrix,
    /// Singular values, descending.
    pub s: Vec<f64>,
    /// Right singular vectors, one per row.
    pub vt: Matrix,
}

/// The thin SVD of `m`; `Err` with burn-linalg's message if it does not converge.
pub fn thin_svd(m: &Matrix) -> Result<Svd, String> {
    let (rows, cols) = (m.rows(), m.cols());
    let k = rows.min(cols);
    if k == 0 {
        return Ok(Svd {
            u: Matrix::zeros(rows, 0),
            s: Vec::new(),
            vt: Matrix::zeros(0, cols),
        });
    }
    let device = Device::flex();
    let data = TensorData::new(m.values().to_vec(), [rows, cols]);
    let run = || {
        let t = Tensor::<2>::from_data(data, (&device, DType::F64));
        let (u, s, vt) = burn_linalg::svd::<2, 1>(t, SWEEPS);
        (u.into_data(), s.into_data(), vt.into_data())
    };
    let (u, s, vt) = catch_unwind(AssertUnwindSafe(run)).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the SVD failed".into())
    })?;
    let s = s
        .convert::<f64>()
        .try_into_vec::<f64>()
        .map_err(|e| format!("{e:?}"))?;
    Ok(Svd {
        u: Matrix::from_data(&u),
        s,
        vt: Matrix::from_data(&vt),
    })
}

/// The SVD of `p * q` (`p` is `[rows, n]`, `q` is `[n, cols]`) without forming the product:
/// thin QR factorizations of `p` and `q^T` reduce it to an `n x n` core, `p q = Qp (Rp Rq^T)
/// Qq^T`. Exact (up to rounding) and cheap when `n`, the summed rank of the adapters, is small
/// next to `rows` and `cols`: O((rows + cols) n^2) instead of O(rows cols min(rows, cols)).
pub fn low_rank_svd(p: &Matrix, q: &Matrix) -> Result<Svd, String> {
    let (qp, rp) = thin_qr(p);
    let (qq, rq) = thin_qr(&q.transpose());
    let core = thin_svd(&rp.matmul(&rq.transpose()))?;
    Ok(Svd {
        u: qp.matmul(&core.u),
        s: core.s,
        vt: core.vt.matmul(&qq.transpose()),
    })
}

/// LoRA factors of rank `rank` from an SVD: `A = Vt[:rank]` (`[rank, cols]`) and
/// `B = U[:, :rank] diag(S[:rank])` (`[rows, rank]`), clamped at quantile `clamp` if given, and
/// zero-padded to `rank` when the matrix has fewer singular values than that.
pub fn truncate(svd: &Svd, rank: usize, clamp: Option<f64>) -> (Matrix, Matrix) {
    let k = rank.min(svd.s.len());
    let mut b = svd.u.left_cols(k);
    b.scale_cols(&svd.s[..k]);
    let mut a = svd.vt.top_rows(k);
    if let Some(q) = clamp {
        clamp_factors(&mut a, &mut b, q);
    }
    (a.pad_rows(rank), b.pad_cols(rank))
}

/// PEFT's `svd_clamp`: `hi = torch.quantile(cat(B.flatten(), A.flatten()), q)`, then both
/// factors clamped to `[-hi, hi]` (`torch.clamp(min=-hi, max=hi)`, so a negative `hi` sets every
/// entry to `hi`, as torch does when min > max).
///
/// ```
/// use peft_lora::combine::{Matrix, clamp_factors};
/// let mut a = Matrix::from_rows(&[&[1.0, -4.0]]);
/// let mut b = Matrix::from_rows(&[&[2.0], &[3.0]]);
/// // values -4, 1, 2, 3: the 0.5 quantile is 1.5
/// clamp_factors(&mut a, &mut b, 0.5);
/// assert_eq!(a.values(), &[1.0, -1.5]);
/// assert_eq!(b.values(), &[1.5, 1.5]);
/// ```
pub fn clamp_factors(a: &mut Matrix, b: &mut Matrix, q: f64) {
    let mut values: Vec<f64> = b.values().iter().chain(a.values()).copied().collect();
    if values.is_empty() {
        return;
    }
    values.sort_by(f64::total_cmp);
    let hi = quantile_sorted(&values, q);
    let lo = -hi;
    for v in a.values_mut().iter_mut().chain(b.values_mut()) {
        *v = v.max(lo).min(hi);
    }
}

/// `torch.quantile(..., interpolation="linear")` of sorted values.
fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let below = pos.floor() as usize;
    let above = (below + 1).min(sorted.len() - 1);
    let frac = pos - below as f64;
    sorted[below] + (sorted[above] - sorted[below]) * frac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(rows: usize, cols: usize, seed: u64) -> Matrix {
        let mut rng = super::super::rng::SplitMix64::for_tensor(seed, "svd", 0, 0);
        Matrix::new(
            rows,
            cols,
            (0..rows * cols)
                .map(|_| rng.next_f64() * 2.0 - 1.0)
                .collect(),
        )
    }

    fn reconstruct(svd: &Svd) -> Matrix {
        let mut us = svd.u.clone();
        us.scale_cols(&svd.s);
        us.matmul(&svd.vt)
    }

    #[test]
    fn thin_svd_reconstructs_and_is_orthonormal() {
        for (rows, cols) in [(7, 4), (4, 7), (16, 16), (1, 5)] {
            let m = random(rows, cols, rows as u64 * 31 + cols as u64);
            let svd = thin_svd(&m).unwrap();
            assert!(reconstruct(&svd).max_abs_diff(&m) < 1e-12, "{rows}x{cols}");
            let k = rows.min(cols);
            let utu = svd.u.transpose().matmul(&svd.u);
            assert!(utu.max_abs_diff(&Matrix::identity(k)) < 1e-12);
            let vvt = svd.vt.matmul(&svd.vt.transpose());
            assert!(vvt.max_abs_diff(&Matrix::identity(k)) < 1e-12);
            assert!(svd.s.windows(2).all(|w| w[0] >= w[1]));
        }
    }

    #[test]
    fn low_rank_svd_equals_dense_svd_of_the_product() {
        let p = random(40, 6, 1);
        let q = random(6, 30, 2);
        let product = p.matmul(&q);
        let fast = low_rank_svd(&p, &q).unwrap();
        let dense = thin_svd(&product).unwrap();
        assert!(reconstruct(&fast).max_abs_diff(&product) < 1e-12);
        for i in 0..6 {
            assert!((fast.s[i] - dense.s[i]).abs() < 1e-12);
        }
        // The rank-3 truncations agree (singular vectors are unique up to sign).
        let (a1, b1) = truncate(&fast, 3, None);
        let (a2, b2) = truncate(&dense, 3, None);
        assert!(b1.matmul(&a1).max_abs_diff(&b2.matmul(&a2)) < 1e-12);
    }

    #[test]
    fn truncation_pads_beyond_the_available_rank() {
        let m = random(3, 5, 9);
        let (a, b) = truncate(&thin_svd(&m).unwrap(), 4, None);
        assert_eq!((a.rows(), a.cols(), b.rows(), b.cols()), (4, 5, 3, 4));
        assert!(b.matmul(&a).max_abs_diff(&m) < 1e-12);
        assert!(a.values()[15..].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn quantile_interpolates_like_torch() {
        let v = [1.0, 2.0, 4.0, 8.0];
        assert_eq!(quantile_sorted(&v, 0.0), 1.0);
        assert_eq!(quantile_sorted(&v, 1.0), 8.0);
        // torch.quantile(tensor([1., 2., 4., 8.]), 0.5) == 3.0; 0.9 -> 6.8
        assert_eq!(quantile_sorted(&v, 0.5), 3.0);
        assert!((quantile_sorted(&v, 0.9) - 6.8).abs() < 1e-12);
    }
}
