//! The `gemm` crate (burn-flex's own GEMM) on strided `f32` operands.

/// A strided `rows x cols` matrix: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Debug, Clone, Copy)]
pub struct Mat {
    /// First element.
    pub ptr: *const f32,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row stride (elements).
    pub rs: isize,
    /// Column stride (elements).
    pub cs: isize,
}

impl Mat {
    /// A row-major matrix over `data`.
    pub fn row_major(data: &[f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix buffer too small");
        Self {
            ptr: data.as_ptr(),
            rows,
            cols,
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose (a view: strides swapped).
    pub fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// Destination of a product: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Debug, Clone, Copy)]
pub struct MatMut {
    /// First element.
    pub ptr: *mut f32,
    /// Row stride (elements).
    pub rs: isize,
    /// Column stride (elements).
    pub cs: isize,
}

impl MatMut {
    /// A row-major destination over `data` with `cols` columns.
    pub fn row_major(data: &mut [f32], cols: usize) -> Self {
        Self {
            ptr: data.as_mut_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }
}

/// Multiply-accumulates above which the GEMM splits over threads (burn-flex's threshold).
const PARALLEL_ABOVE: usize = 192 * 192 * 192;

/// Whether a product of this size is worth the GEMM's own threading (false inside tasks that are
/// already parallel).
pub fn threaded(m: usize, n: usize, k: usize) -> bool {
    m.saturating_mul(n).saturating_mul(k) >= PARALLEL_ABOVE
}

/// `dst = scale · lhs · rhs`, or `dst += scale · lhs · rhs` when `accumulate`.
///
/// # Safety
/// `lhs`, `rhs` must describe readable memory and `dst` writable memory of `lhs.rows x rhs.cols`
/// elements at its strides, not overlapping the operands, and no other thread may write `dst`'s
/// elements meanwhile.
pub unsafe fn gemm(dst: MatMut, accumulate: bool, lhs: Mat, rhs: Mat, scale: f32, threads: bool) {
    assert_eq!(lhs.cols, rhs.rows, "gemm: inner dimensions differ");
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if threads && threaded(m, n, k) {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: guaranteed by the caller; `gemm` reads `dst` only when `read_dst` is set.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.cs,
            dst.rs,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}
