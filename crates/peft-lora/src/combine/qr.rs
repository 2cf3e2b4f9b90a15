//! Thin Householder QR of a tall, thin matrix: the reduction step of the low-rank SVD (the
//! stacked LoRA factors of a module are `[out, sum of ranks]`).
//!
//! Works on the columns as contiguous rows (the matrix is transposed once), so every reflector
//! update is a dot product and an axpy over contiguous memory.

use super::matrix::Matrix;

/// `m = Q R` with `Q` `[rows, k]` (orthonormal columns) and `R` `[k, cols]` (upper
/// triangular), `k = min(rows, cols)`.
pub(crate) fn thin_qr(m: &Matrix) -> (Matrix, Matrix) {
    let (rows, cols) = (m.rows(), m.cols());
    let k = rows.min(cols);
    // Column j of `m` is row j of `w`.
    let mut w = m.transpose();
    let mut reflectors: Vec<(Vec<f64>, f64)> = Vec::with_capacity(k);
    let mut r = Matrix::zeros(k, cols);
    for j in 0..k {
        let x = &w.values()[j * rows + j..(j + 1) * rows];
        let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let mut v = x.to_vec();
        // alpha = -sign(x0) ||x|| avoids cancellation in v0 = x0 - alpha.
        let alpha = if x[0] >= 0.0 { -norm } else { norm };
        v[0] -= alpha;
        let v_norm2: f64 = v.iter().map(|e| e * e).sum();
        let beta = if v_norm2 > 0.0 { 2.0 / v_norm2 } else { 0.0 };
        let data = w.values_mut();
        for c in j..cols {
            let col = &mut data[c * rows + j..(c + 1) * rows];
            let dot: f64 = v.iter().zip(col.iter()).map(|(a, b)| a * b).sum();
            let f = beta * dot;
            if f != 0.0 {
                col.iter_mut().zip(&v).for_each(|(e, a)| *e -= f * a);
            }
        }
        for c in j..cols {
            r.set(j, c, data[c * rows + j]);
        }
        reflectors.push((v, beta));
    }
    // Q = H_0 ... H_{k-1} [I_k; 0], column by column (columns as rows of `q_t`).
    let mut q_t = Matrix::zeros(k, rows);
    for i in 0..k {
        q_t.set(i, i, 1.0);
    }
    let data = q_t.values_mut();
    for (j, (v, beta)) in reflectors.iter().enumerate().rev() {
        for c in 0..k {
            let col = &mut data[c * rows + j..(c + 1) * rows];
            let dot: f64 = v.iter().zip(col.iter()).map(|(a, b)| a * b).sum();
            let f = beta * dot;
            if f != 0.0 {
                col.iter_mut().zip(v).for_each(|(e, a)| *e -= f * a);
            }
        }
    }
    (q_t.transpose(), r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rows: usize, cols: usize) -> Matrix {
        Matrix::new(
            rows,
            cols,
            (0..rows * cols)
                .map(|i| ((i * 7919 % 1000) as f64 / 500.0) - 1.0)
                .collect(),
        )
    }

    #[test]
    fn q_is_orthonormal_r_is_triangular_and_qr_is_m() {
        for (rows, cols) in [(50, 6), (6, 6), (4, 9), (30, 1)] {
            let m = sample(rows, cols);
            let (q, r) = thin_qr(&m);
            let k = rows.min(cols);
            assert_eq!((q.rows(), q.cols(), r.rows(), r.cols()), (rows, k, k, cols));
            assert!(q.matmul(&r).max_abs_diff(&m) < 1e-12, "{rows}x{cols}");
            assert!(q.transpose().matmul(&q).max_abs_diff(&Matrix::identity(k)) < 1e-12);
            for i in 0..k {
                for j in 0..i.min(cols) {
                    assert_eq!(r.get(i, j), 0.0);
                }
            }
        }
    }

    #[test]
    fn rank_deficient_columns_are_fine() {
        // Zero columns (zero-padded factors) and a repeated column.
        let mut m = sample(20, 4);
        for i in 0..20 {
            m.set(i, 1, 0.0);
            m.set(i, 3, m.get(i, 0));
        }
        let (q, r) = thin_qr(&m);
        assert!(q.matmul(&r).max_abs_diff(&m) < 1e-12);
        assert!(q.transpose().matmul(&q).max_abs_diff(&Matrix::identity(4)) < 1e-12);
    }
}
