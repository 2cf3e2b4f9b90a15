//! Run-time choice of the instruction set for the elementwise kernels.
//!
//! The kernels are plain loops written so that LLVM vectorizes them (no branches in the body,
//! fixed-width accumulators for reductions). Each is compiled three times, for AVX-512, for
//! AVX2 + FMA and for the baseline target, and [`multiversion!`] picks one at run time, as the
//! `gemm` crate does for its micro-kernels: one binary runs at full width on any x86-64.

use std::sync::OnceLock;

/// Instruction-set level of the running CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// AVX-512 F/DQ/BW/VL (x86-64-v4).
    V4,
    /// AVX2 + FMA (x86-64-v3).
    V3,
    /// The compilation target's baseline.
    Base,
}

/// The level of this CPU (detected once).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("fma")
    {
        Level::V4
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        Level::V3
    } else {
        Level::Base
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Base
}

/// `a * b + c`, fused when the kernel is compiled for a level with FMA (a scalar `fmaf` call
/// otherwise, which would stop vectorization).
#[inline(always)]
pub fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Defines `$name(args) -> ret` that runs `$kernel::<FMA>(args)` compiled for the best level
/// of the running CPU. `$kernel` must be `#[inline(always)]` so that it is compiled inside each
/// `#[target_feature]` wrapper.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? = $kernel:ident) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    $kernel::<true>($($arg),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    $kernel::<true>($($arg),*)
                }
                match $crate::kernels::simd::level() {
                    // SAFETY: `level()` detected these features on the running CPU.
                    $crate::kernels::simd::Level::V4 => return unsafe { v4($($arg),*) },
                    // SAFETY: as above.
                    $crate::kernels::simd::Level::V3 => return unsafe { v3($($arg),*) },
                    $crate::kernels::simd::Level::Base => {}
                }
            }
            $kernel::<false>($($arg),*)
        }
    };
}

pub(crate) use multiversion;

/// Lanes of the fixed-width accumulators used by the reductions (one AVX-512 register).
pub const LANES: usize = 16;

/// Sum of `x`, with [`LANES`] independent accumulators so that it vectorizes.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let mut total: f32 = chunks.remainder().iter().sum();
    total += acc.iter().sum::<f32>();
    total
}

/// Sum of `a[i] * b[i]`, vectorized like [`sum`].
#[inline(always)]
pub fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..LANES {
            acc[i] = fmadd::<FMA>(x[i], y[i], acc[i]);
        }
    }
    let mut total = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        total += x * y;
    }
    total + acc.iter().sum::<f32>()
}

/// Maximum of `x` (`-inf` when empty), vectorized like [`sum`].
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in chunks.remainder().iter().chain(acc.iter()) {
        if v > m {
            m = v;
        }
    }
    m
}

/// The sums of the lanes of `a`, `b`, `c`, `e` as one 4-lane register: 13 shuffles and adds
/// shared by the four, where four `_mm512_reduce_add_ps` take about 32 (a tenth of a 4 x 4
/// tile of `few_rows` at `k` = 576).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub fn sums4(
    a: std::arch::x86_64::__m512,
    b: std::arch::x86_64::__m512,
    c: std::arch::x86_64::__m512,
    e: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, e.
    let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    let ce = _mm512_add_ps(_mm512_unpacklo_ps(c, e), _mm512_unpackhi_ps(c, e));
    // Per 128-bit lane: that lane's sums of a, b, c, e.
    let lo = _mm512_shuffle_ps::<0x44>(ab, ce);
    let hi = _mm512_shuffle_ps::<0xEE>(ab, ce);
    let per_lane = _mm512_add_ps(lo, hi);
    // Across the four 128-bit lanes: (0 + 2, 1 + 3), then (0 + 1).
    let half = _mm512_add_ps(per_lane, _mm512_shuffle_f32x4::<0x4E>(per_lane, per_lane));
    let all = _mm512_add_ps(half, _mm512_shuffle_f32x4::<0xB1>(half, half));
    _mm512_castps512_ps128(all)
}
