//! [`QuantMatrix`]: a frozen weight matrix in a block format.

use std::sync::Arc;

use super::dequant::dequantize_blocks;
use super::{QuantBytes, QuantError, QuantFormat, nf4, quantize};

/// `rows` rows of `cols` values, each row [`QuantFormat::row_bytes`]`(cols)` bytes of
/// consecutive blocks (GGUF's layout: a linear layer's `[out, in]` weight is `rows = out`,
/// `cols = in`; an embedding table has one row per token).
///
/// Cheap to clone (the bytes are shared). Built from a file buffer with [`QuantMatrix::new`]
/// (every size checked before anything is allocated), or from `f32` values with
/// [`QuantMatrix::quantize`].
///
/// ```
/// use peft_ops::quant::{QuantFormat, QuantMatrix};
///
/// let values: Vec<f32> = (0..2 * 64).map(|i| (i as f32 - 64.0) / 16.0).collect();
/// let w = QuantMatrix::quantize(QuantFormat::Q8_0, &values, 2, 64).unwrap();
/// assert_eq!(w.stored_bytes(), 2 * 2 * 34); // 2 rows of 2 blocks of 34 bytes
/// let back = w.dequantize();
/// assert!(back.iter().zip(&values).all(|(a, b)| (a - b).abs() < 0.02));
/// ```
#[derive(Clone, Debug)]
pub struct QuantMatrix {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: QuantBytes,
}

/// Bytes per row of `rows x cols` in `format`, and the total, checked (the element count
/// `rows·cols` must fit too, for [`QuantMatrix::dequantize`]).
fn sizes(format: QuantFormat, rows: usize, cols: usize) -> Result<(usize, usize), QuantError> {
    let row_bytes = format
        .row_bytes(cols)
        .ok_or_else(|| match cols % format.block_size() {
            0 => QuantError::TooLarge { format, rows, cols },
            _ => QuantError::ColsNotMultiple {
                format,
                cols,
                block_size: format.block_size(),
            },
        })?;
    let total = rows
        .checked_mul(row_bytes)
        .filter(|_| {
            rows.checked_mul(cols)
                .and_then(|n| n.checked_mul(4))
                .is_some_and(|b| b <= isize::MAX as usize)
        })
        .ok_or(QuantError::TooLarge { format, rows, cols })?;
    Ok((row_bytes, total))
}

impl QuantMatrix {
    /// A matrix over `data`: an error (never a panic) when `cols` is not a whole number of
    /// blocks, a size overflows, or `data` is not exactly `rows · row_bytes(cols)` bytes.
    pub fn new(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        data: QuantBytes,
    ) -> Result<Self, QuantError> {
        let (row_bytes, expected) = sizes(format, rows, cols)?;
        if data.len() != expected {
            return Err(QuantError::DataLength {
                format,
                rows,
                cols,
                expected,
                actual: data.len(),
            });
        }
        Ok(Self {
            format,
            rows,
            cols,
            row_bytes,
            data,
        })
    }

    /// `values` (`rows x cols`, row-major) quantized to `format`, bit for bit as gguf-py's
    /// `gguf.quants.quantize` (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or bitsandbytes'
    /// `quantize_4bit(quant_type="nf4", blocksize=64)` (NF4). The K-quants are an error naming
    /// the format, as are non-finite values in a block format.
    pub fn quantize(
        format: QuantFormat,
        values: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self, QuantError> {
        let (_, _) = sizes(format, rows, cols)?;
        let n = rows * cols; // checked by `sizes`
        if values.len() != n {
            return Err(QuantError::ValuesLength {
                expected: n,
                actual: values.len(),
            });
        }
        let bytes = quantize::quantize(format, values, cols)?;
        Self::new(format, rows, cols, QuantBytes::from_vec(bytes))
    }

    /// An NF4 matrix from bitsandbytes' arrays: `packed` (the `uint8` codes of
    /// `quantize_4bit`, two per byte, `rows·cols / 2` of them) and `absmax` (one `f32` per 64
    /// values), `cols` a multiple of 64. The bytes are re-laid out (absmax next to its codes).
    pub fn from_bnb_nf4(
        packed: &[u8],
        absmax: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self, QuantError> {
        let (_, expected) = sizes(QuantFormat::Nf4, rows, cols)?;
        let bytes = nf4::from_bnb(packed, absmax, rows * cols).ok_or(QuantError::DataLength {
            format: QuantFormat::Nf4,
            rows,
            cols,
            expected,
            actual: packed.len() + 4 * absmax.len(),
        })?;
        Self::new(QuantFormat::Nf4, rows, cols, QuantBytes::from_vec(bytes))
    }

    /// For an NF4 matrix, bitsandbytes' `(packed codes, absmax)` arrays; `None` for other
    /// formats.
    pub fn to_bnb_nf4(&self) -> Option<(Vec<u8>, Vec<f32>)> {
        (self.format == QuantFormat::Nf4).then(|| nf4::to_bnb(self.data.as_slice()))
    }

    /// The storage format.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// Number of rows (a linear layer's output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row (a linear layer's input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Bytes of quantized storage.
    pub fn stored_bytes(&self) -> usize {
        self.data.len()
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// The stored bytes (rows of blocks).
    pub fn bytes(&self) -> &QuantBytes {
        &self.data
    }

    /// The bytes of row `row`.
    ///
    /// # Panics
    /// If `row >= rows`.
    pub fn row_data(&self, row: usize) -> &[u8] {
        assert!(row < self.rows, "row {row} out of {} rows", self.rows);
        &self.data.as_slice()[row * self.row_bytes..(row + 1) * self.row_bytes]
    }

    /// Row `row` dequantized into `out` (`cols` values), bit for bit as gguf-py / bitsandbytes.
    ///
    /// # Panics
    /// If `row >= rows` or `out.len() != cols`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert_eq!(
            out.len(),
            self.cols,
            "dequantize_row: the output holds {} values, rows have {}",
            out.len(),
            self.cols
        );
        dequantize_blocks(self.format, self.row_data(row), out);
    }

    /// Every row dequantized: `rows x cols` values, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            let bytes = self.data.as_slice();
            super::kernel::for_row_chunks(&mut out, self.cols, |r0, chunk| {
                let n = chunk.len() / self.cols;
                let b = &bytes[r0 * self.row_bytes..(r0 + n) * self.row_bytes];
                dequantize_blocks(self.format, b, chunk);
            });
        }
        out
    }

    /// Rows `ids` dequantized: `ids.len() x cols` values (an embedding lookup); an error for an
    /// id out of range.
    pub fn gather_rows(&self, ids: &[usize]) -> Result<Vec<f32>, QuantError> {
        if let Some(&row) = ids.iter().find(|&&r| r >= self.rows) {
            return Err(QuantError::RowOutOfRange {
                row,
                rows: self.rows,
            });
        }
        let len = ids
            .len()
            .checked_mul(self.cols)
            .ok_or(QuantError::TooLarge {
                format: self.format,
                rows: ids.len(),
                cols: self.cols,
            })?;
        let mut out = vec![0f32; len];
        if self.cols > 0 {
            for (&id, o) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
                self.dequantize_row(id, o);
            }
        }
        Ok(out)
    }

    /// A new matrix whose row `i` is row `order[i]` of this one (whole quantized rows copied
    /// as bytes, nothing requantized): e.g. undoing llama.cpp's permutation of the Q/K
    /// projection rows. An error for an index out of range.
    ///
    /// ```
    /// use peft_ops::quant::{QuantFormat, QuantMatrix};
    ///
    /// let w = QuantMatrix::quantize(QuantFormat::Q4_0, &[1.0; 3 * 32], 3, 32).unwrap();
    /// let picked = w.select_rows(&[2, 0]).unwrap();
    /// assert_eq!(picked.rows(), 2);
    /// assert!(w.select_rows(&[3]).is_err());
    /// ```
    pub fn select_rows(&self, order: &[usize]) -> Result<QuantMatrix, QuantError> {
        if let Some(&row) = order.iter().find(|&&r| r >= self.rows) {
            return Err(QuantError::RowOutOfRange {
                row,
                rows: self.rows,
            });
        }
        let (_, total) = sizes(self.format, order.len(), self.cols)?;
        let mut bytes = Vec::with_capacity(total);
        for &r in order {
            bytes.extend_from_slice(self.row_data(r));
        }
        Self::new(
            self.format,
            order.len(),
            self.cols,
            QuantBytes::from_vec(bytes),
        )
    }

    /// Rows `start..end` sharing this matrix's bytes (no copy): e.g. splitting a fused QKV
    /// projection. An error when the range is reversed or past the last row.
    pub fn slice_rows(&self, start: usize, end: usize) -> Result<QuantMatrix, QuantError> {
        if start > end || end > self.rows {
            return Err(QuantError::RowOutOfRange {
                row: end.max(start),
                rows: self.rows,
            });
        }
        // The new bytes borrow these (a second `Arc` level: rows stay shared, nothing copied).
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(self.data.clone());
        let range = start * self.row_bytes..end * self.row_bytes;
        Self::new(
            self.format,
            end - start,
            self.cols,
            QuantBytes::new(owner, range)?,
        )
    }
}
