//! Raw access to flex tensors: contiguous `f32` slices, strided views, and outputs laid out like
//! an input.

use burn::backend::flex::FlexTensor;
use burn::tensor::{Shape, TensorData};

/// `t` with a contiguous layout (a no-op when it already is).
pub fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The elements of a contiguous `f32` tensor, in row-major order.
///
/// # Panics
/// If `t` is not contiguous or not `f32` (callers pass [`contiguous`] tensors of the dtype the
/// public functions checked).
pub fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("peft-ops kernels take contiguous f32 tensors")
}

/// The buffer of `t` when `t` owns it alone and it is exactly the tensor's elements.
pub fn exclusive(t: &mut FlexTensor) -> Option<&mut [f32]> {
    let n = t.layout().num_elements();
    if !t.is_contiguous() || t.layout().start_offset() != 0 {
        return None;
    }
    let buf = t.try_storage_mut::<f32>()?;
    (buf.len() == n).then_some(buf)
}

/// `t` contiguous and the only holder of its buffer (a copy when something else holds it), for
/// a kernel that writes its result into it ([`exclusive`] then gives that buffer).
pub fn owned(t: FlexTensor) -> FlexTensor {
    let mut t = contiguous(t);
    if exclusive(&mut t).is_none() {
        t = from_vec(slice(&t).to_vec(), &dims(&t));
    }
    t
}

/// A contiguous tensor of `shape` holding `data`.
pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, Shape::from(shape.to_vec())))
}

/// Dimensions of `t`.
pub fn dims(t: &FlexTensor) -> Vec<usize> {
    let shape = t.layout().shape();
    (0..shape.num_dims()).map(|i| shape[i]).collect()
}

/// A read-only strided view of a 4-D `f32` tensor: element `(a, b, c, d)` is at
/// `base + a·s0 + b·s1 + c·s2 + d·s3`.
#[derive(Debug, Clone, Copy)]
pub struct View4 {
    /// First element.
    pub base: *const f32,
    /// Sizes.
    pub dims: [usize; 4],
    /// Strides in elements (0 for a broadcast dimension).
    pub strides: [isize; 4],
}

// SAFETY: a view only reads, and the tensor it borrows from outlives every parallel loop that
// uses it (the kernels keep the tensor alive for the whole call).
unsafe impl Send for View4 {}
// SAFETY: as above.
unsafe impl Sync for View4 {}

impl View4 {
    /// A view of `t` (4-D, `f32`) when its strides are usable by the GEMM and the kernels:
    /// non-negative, and non-zero on every dimension longer than one. `None` otherwise (make it
    /// [`contiguous`] first).
    pub fn of(t: &FlexTensor) -> Option<Self> {
        let layout = t.layout();
        let shape = layout.shape();
        assert_eq!(shape.num_dims(), 4, "expected a 4-D tensor");
        let dims = [shape[0], shape[1], shape[2], shape[3]];
        let s = layout.strides();
        let strides = [s[0], s[1], s[2], s[3]];
        if (0..4).any(|i| dims[i] > 1 && strides[i] <= 0) {
            return None;
        }
        let storage: &[f32] = t.storage();
        // SAFETY: the layout's start offset lies inside the storage buffer.
        let base = unsafe { storage.as_ptr().add(layout.start_offset()) };
        Some(Self {
            base,
            dims,
            strides,
        })
    }

    /// [`View4::of`] on `t`, or on a contiguous copy (returned alongside, to keep it alive).
    pub fn of_or_copy(t: FlexTensor) -> (FlexTensor, Self) {
        match Self::of(&t) {
            Some(v) => (t, v),
            None => {
                let t = t.to_contiguous();
                let v = Self::of(&t).expect("a contiguous tensor has positive strides");
                (t, v)
            }
        }
    }

    /// Pointer to element `(a, b, 0, 0)`.
    #[inline]
    pub fn at(&self, a: usize, b: usize) -> *const f32 {
        // SAFETY: `a`, `b` are in bounds, so the offset stays inside the viewed storage.
        unsafe {
            self.base
                .offset(a as isize * self.strides[0] + b as isize * self.strides[1])
        }
    }
}

/// An output buffer for a 4-D tensor of `dims` whose memory order follows `like`'s strides (so a
/// gradient of a `[b, s, h, d]`-in-memory input, such as the query after `split_heads`, is
/// written in that order and the reshapes above it stay free).
pub struct Out4 {
    /// The elements, in memory order.
    pub data: Vec<f32>,
    /// Sizes in logical order.
    pub dims: [usize; 4],
    /// Strides of the logical dimensions into `data`.
    pub strides: [isize; 4],
    /// `order[p]` = the logical dimension stored at memory position `p` (outermost first).
    order: [usize; 4],
}

impl Out4 {
    /// A zeroed buffer of `dims`, laid out in the memory order of `like` (contiguous when `like`
    /// has broadcast dimensions).
    pub fn like(dims: [usize; 4], like: Option<&View4>) -> Self {
        let mut order = [0usize, 1, 2, 3];
        if let Some(v) = like
            && (0..4).all(|i| v.dims[i] == 1 || v.strides[i] > 0)
        {
            // Outermost = largest stride; ties (size-1 dims) keep the logical order.
            order.sort_by(|&a, &b| v.strides[b].cmp(&v.strides[a]).then(a.cmp(&b)));
        }
        let mut strides = [0isize; 4];
        let mut step = 1isize;
        for &d in order.iter().rev() {
            strides[d] = step;
            step *= dims[d] as isize;
        }
        Self {
            data: vec![0.0; dims.iter().product()],
            dims,
            strides,
            order,
        }
    }

    /// Mutable pointer to element `(a, b, 0, 0)`.
    #[inline]
    pub fn at(&mut self, a: usize, b: usize) -> *mut f32 {
        let offset = a as isize * self.strides[0] + b as isize * self.strides[1];
        // SAFETY: in bounds for in-bounds `a`, `b`.
        unsafe { self.data.as_mut_ptr().offset(offset) }
    }

    /// The tensor, with logical shape `dims` over the memory-ordered buffer.
    pub fn into_tensor(self) -> FlexTensor {
        let mem_dims: Vec<usize> = self.order.iter().map(|&d| self.dims[d]).collect();
        let t = from_vec(self.data, &mem_dims);
        let mut axes = [0usize; 4];
        for (p, &d) in self.order.iter().enumerate() {
            axes[d] = p;
        }
        if axes == [0, 1, 2, 3] {
            t
        } else {
            t.permute(&axes)
        }
    }
}

/// A strided 2-D `f32` view of `t` for the GEMM ([`Mat`](super::matmul::Mat)) when its strides
/// are usable (as [`View4::of`] decides), or of a contiguous copy, returned alongside to keep
/// it alive (as [`View4::of_or_copy`]).
pub fn mat_or_copy(t: FlexTensor) -> (FlexTensor, super::matmul::Mat) {
    let of = |t: &FlexTensor| {
        let layout = t.layout();
        let shape = layout.shape();
        assert_eq!(shape.num_dims(), 2, "expected a 2-D tensor");
        let (rows, cols) = (shape[0], shape[1]);
        let s = layout.strides();
        if (rows > 1 && s[0] <= 0) || (cols > 1 && s[1] <= 0) {
            return None;
        }
        let storage: &[f32] = t.storage();
        Some(super::matmul::Mat {
            // SAFETY: the layout's start offset lies inside the storage buffer.
            ptr: unsafe { storage.as_ptr().add(layout.start_offset()) },
            rows,
            cols,
            rs: s[0],
            cs: s[1],
        })
    };
    match of(&t) {
        Some(m) => (t, m),
        None => {
            let t = t.to_contiguous();
            let m = of(&t).expect("a contiguous tensor has positive strides");
            (t, m)
        }
    }
}
