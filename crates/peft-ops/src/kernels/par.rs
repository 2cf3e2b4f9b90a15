//! Splitting work over rayon's global pool (the pool burn-flex's GEMM uses, sized by
//! `RAYON_NUM_THREADS`).

use rayon::prelude::*;

/// Elements per task of an elementwise kernel: large enough that a task outweighs rayon's
/// scheduling (a few µs), small enough to balance two to a few dozen threads.
pub const CHUNK: usize = 1 << 14;

/// Calls `f(start, out_chunk)` for consecutive chunks of `out` (`start` = index of the chunk's
/// first element), in parallel when `out` spans more than one chunk.
pub fn chunks_mut<F>(out: &mut [f32], chunk: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    let chunk = chunk.max(1);
    if out.len() <= chunk {
        f(0, out);
        return;
    }
    out.par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, c)| f(i * chunk, c));
}

/// Rows per task for a row-wise kernel on rows of `width` elements (about [`CHUNK`] elements).
pub fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}

/// A raw pointer that may cross threads; every use writes a region no other task touches.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut f32);

// SAFETY: the pointer is only dereferenced at disjoint offsets by the tasks of one parallel
// loop, while the buffer it points into outlives the loop (see each use).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer `count` elements further.
    ///
    /// # Safety
    /// The result must stay inside the allocation.
    #[inline]
    pub unsafe fn add(self, count: isize) -> *mut f32 {
        // SAFETY: guaranteed by the caller.
        unsafe { self.0.offset(count) }
    }
}
