//! A small dense row-major `f64` matrix: the host-side working type of adapter combination.
//!
//! Combination is a one-off computation on adapter-sized tensors, so it runs on the host in
//! double precision whatever device the adapters live on (PEFT computes it in the adapters'
//! dtype, float32 here: the difference is rounding, far below the 1e-4 parity bound).

use burn::tensor::TensorData;

/// A dense `rows x cols` matrix, row-major.
///
/// ```
/// use peft_lora::combine::Matrix;
/// let a = Matrix::from_rows(&[&[1.0, 2.0], &[3.0, 4.0]]);
/// assert_eq!(a.matmul(&Matrix::identity(2)), a);
/// assert_eq!(a.transpose().get(0, 1), 3.0);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f64>,
}

impl Matrix {
    /// A matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// The identity.
    pub fn identity(n: usize) -> Self {
        let mut m = Self::zeros(n, n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    /// A matrix from row-major values; `data.len()` must be `rows * cols`.
    pub fn new(rows: usize, cols: usize, data: Vec<f64>) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "Matrix::new: {rows}x{cols} needs {} values",
            rows * cols
        );
        Self { rows, cols, data }
    }

    /// A matrix from rows of equal length.
    pub fn from_rows(rows: &[&[f64]]) -> Self {
        let cols = rows.first().map_or(0, |r| r.len());
        let data = rows
            .iter()
            .flat_map(|r| {
                assert_eq!(r.len(), cols, "Matrix::from_rows: ragged rows");
                r.iter().copied()
            })
            .collect();
        Self::new(rows.len(), cols, data)
    }

    /// A matrix from a 2-D tensor's data (any float dtype).
    pub fn from_data(data: &TensorData) -> Self {
        let shape = data.shape();
        assert_eq!(shape.len(), 2, "Matrix::from_data: expected a 2-D tensor");
        let values: Vec<f64> = data
            .clone()
            .convert::<f64>()
            .try_into_vec::<f64>()
            .expect("converted to f64");
        Self::new(shape[0], shape[1], values)
    }

    /// The values as float32 tensor data.
    pub fn to_data(&self) -> TensorData {
        let values: Vec<f32> = self.data.iter().map(|&v| v as f32).collect();
        TensorData::new(values, [self.rows, self.cols])
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The row-major values.
    pub fn values(&self) -> &[f64] {
        &self.data
    }

    /// The row-major values, mutably.
    pub fn values_mut(&mut self) -> &mut [f64] {
        &mut self.data
    }

    /// Entry `(i, j)`.
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    /// Set entry `(i, j)`.
    pub fn set(&mut self, i: usize, j: usize, value: f64) {
        self.data[i * self.cols + j] = value;
    }

    /// The transpose.
    pub fn transpose(&self) -> Self {
        let mut out = Self::zeros(self.cols, self.rows);
        // Blocked so both sides stay in cache for large adapters.
        const BLOCK: usize = 32;
        for i0 in (0..self.rows).step_by(BLOCK) {
            for j0 in (0..self.cols).step_by(BLOCK) {
                for i in i0..(i0 + BLOCK).min(self.rows) {
                    for j in j0..(j0 + BLOCK).min(self.cols) {
                        out.data[j * self.rows + i] = self.data[i * self.cols + j];
                    }
                }
            }
        }
        out
    }

    /// `self * other`.
    pub fn matmul(&self, other: &Matrix) -> Matrix {
        assert_eq!(
            self.cols, other.rows,
            "Matrix::matmul: {}x{} by {}x{}",
            self.rows, self.cols, other.rows, other.cols
        );
        let mut out = Matrix::zeros(self.rows, other.cols);
        // i-k-j order: the inner loop streams a row of `other` into a row of `out`.
        for i in 0..self.rows {
            let out_row = &mut out.data[i * other.cols..(i + 1) * other.cols];
            for k in 0..self.cols {
                let a = self.data[i * self.cols + k];
                if a == 0.0 {
                    continue;
                }
                let b_row = &other.data[k * other.cols..(k + 1) * other.cols];
                for (o, b) in out_row.iter_mut().zip(b_row) {
                    *o += a * b;
                }
            }
        }
        out
    }

    /// Every entry times `factor`.
    pub fn scaled(&self, factor: f64) -> Matrix {
        Matrix::new(
            self.rows,
            self.cols,
            self.data.iter().map(|v| v * factor).collect(),
        )
    }

    /// Row `i` multiplied by `factors[i]` (`diag(factors) * self`).
    pub fn scale_rows(&mut self, factors: &[f64]) {
        for (row, f) in self.data.chunks_mut(self.cols.max(1)).zip(factors) {
            row.iter_mut().for_each(|v| *v *= f);
        }
    }

    /// Column `j` multiplied by `factors[j]` (`self * diag(factors)`).
    pub fn scale_cols(&mut self, factors: &[f64]) {
        for row in self.data.chunks_mut(self.cols.max(1)) {
            row.iter_mut().zip(factors).for_each(|(v, f)| *v *= f);
        }
    }

    /// The first `n` rows.
    pub fn top_rows(&self, n: usize) -> Matrix {
        let n = n.min(self.rows);
        Matrix::new(n, self.cols, self.data[..n * self.cols].to_vec())
    }

    /// The first `n` columns.
    pub fn left_cols(&self, n: usize) -> Matrix {
        let n = n.min(self.cols);
        let mut out = Matrix::zeros(self.rows, n);
        for i in 0..self.rows {
            out.data[i * n..(i + 1) * n]
                .copy_from_slice(&self.data[i * self.cols..i * self.cols + n]);
        }
        out
    }

    /// `self` with zero rows appended up to `rows` rows.
    pub fn pad_rows(mut self, rows: usize) -> Matrix {
        if rows > self.rows {
            self.data.resize(rows * self.cols, 0.0);
            self.rows = rows;
        }
        self
    }

    /// `self` with zero columns appended up to `cols` columns.
    pub fn pad_cols(&self, cols: usize) -> Matrix {
        if cols <= self.cols {
            return self.clone();
        }
        let mut out = Matrix::zeros(self.rows, cols);
        for i in 0..self.rows {
            out.data[i * cols..i * cols + self.cols]
                .copy_from_slice(&self.data[i * self.cols..(i + 1) * self.cols]);
        }
        out
    }

    /// The matrices stacked top to bottom (equal column counts).
    pub fn vstack(parts: &[Matrix]) -> Matrix {
        let cols = parts.first().map_or(0, |m| m.cols);
        let mut data = Vec::with_capacity(parts.iter().map(|m| m.data.len()).sum());
        for m in parts {
            assert_eq!(m.cols, cols, "Matrix::vstack: column counts differ");
            data.extend_from_slice(&m.data);
        }
        let rows = parts.iter().map(|m| m.rows).sum();
        Matrix::new(rows, cols, data)
    }

    /// The matrices side by side (equal row counts).
    pub fn hstack(parts: &[Matrix]) -> Matrix {
        let rows = parts.first().map_or(0, |m| m.rows);
        let cols: usize = parts.iter().map(|m| m.cols).sum();
        let mut out = Matrix::zeros(rows, cols);
        let mut offset = 0;
        for m in parts {
            assert_eq!(m.rows, rows, "Matrix::hstack: row counts differ");
            for i in 0..rows {
                out.data[i * cols + offset..i * cols + offset + m.cols]
                    .copy_from_slice(&m.data[i * m.cols..(i + 1) * m.cols]);
            }
            offset += m.cols;
        }
        out
    }

    /// Largest absolute entry of `self - other`.
    pub fn max_abs_diff(&self, other: &Matrix) -> f64 {
        assert_eq!((self.rows, self.cols), (other.rows, other.cols));
        self.data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacking_padding_and_products() {
        let a = Matrix::from_rows(&[&[1.0, 2.0, 3.0]]);
        let b = Matrix::from_rows(&[&[4.0, 5.0, 6.0]]);
        let v = Matrix::vstack(&[a.clone(), b.clone()]);
        assert_eq!(v, Matrix::from_rows(&[&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]]));
        let h = Matrix::hstack(&[a.transpose(), b.transpose()]);
        assert_eq!(h, v.transpose());
        assert_eq!(v.clone().pad_rows(3).get(2, 1), 0.0);
        assert_eq!(v.pad_cols(4).cols(), 4);
        assert_eq!(v.matmul(&v.transpose()).get(0, 1), 32.0);
        assert_eq!(
            v.left_cols(2),
            Matrix::from_rows(&[&[1.0, 2.0], &[4.0, 5.0]])
        );
        let mut s = v.clone();
        s.scale_rows(&[2.0, 0.0]);
        assert_eq!(s.values(), &[2.0, 4.0, 6.0, 0.0, 0.0, 0.0]);
        let t = Matrix::from_data(&v.to_data());
        assert_eq!(t, v);
    }

    #[test]
    fn blocked_transpose_matches_definition() {
        let m = Matrix::new(37, 70, (0..37 * 70).map(|i| i as f64).collect());
        let t = m.transpose();
        for i in 0..37 {
            for j in 0..70 {
                assert_eq!(t.get(j, i), m.get(i, j));
            }
        }
    }
}
