//! Branch-free `exp` and `erfc` in `f32`, written so that loops over them vectorize.
//!
//! `libm::erff` / `expf` (what burn-flex's `gelu` calls per element) are scalar calls that stop
//! LLVM from vectorizing a loop; these are straight-line arithmetic with the same accuracy class.

use super::simd::fmadd;

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in a high part with trailing zero bits and the rest (Cody-Waite reduction), so that
// `x - n·ln2` is exact for the `n` that occur.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
// 1.5·2^23: adding it rounds an `f32` of magnitude < 2^22 to an integer, which then sits in the
// low mantissa bits (read back with `to_bits`).
const ROUND: f32 = 12_582_912.0;

/// `e^x` for `x` in about `[-87, 88]` (clamped outside), relative error about 2e-7.
///
/// `e^x = 2^n · e^r` with `n = round(x·log2 e)` and `|r| <= ln2/2`; `e^r` by its Taylor series to
/// degree 7 (truncation error `r^8/8! < 6e-9`).
#[inline(always)]
pub fn exp<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let t = fmadd::<FMA>(x, LOG2E, ROUND);
    let n = t - ROUND;
    let r = fmadd::<FMA>(n, -LN2_HI, x);
    let r = fmadd::<FMA>(n, -LN2_LO, r);
    // Horner form of 1 + r + r²/2! + ... + r⁷/7!.
    let mut q = 1.0 / 5040.0;
    q = fmadd::<FMA>(q, r, 1.0 / 720.0);
    q = fmadd::<FMA>(q, r, 1.0 / 120.0);
    q = fmadd::<FMA>(q, r, 1.0 / 24.0);
    q = fmadd::<FMA>(q, r, 1.0 / 6.0);
    q = fmadd::<FMA>(q, r, 0.5);
    q = fmadd::<FMA>(q, r, 1.0);
    q = fmadd::<FMA>(q, r, 1.0);
    let bits = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits(((bits + 127) << 23) as u32);
    q * scale
}

/// `erfc(z)` for `z >= 0`, absolute error below 2e-7 (Abramowitz & Stegun 7.1.26:
/// `erfc(z) = (a1 t + a2 t² + a3 t³ + a4 t⁴ + a5 t⁵)·e^(-z²)`, `t = 1/(1 + p z)`, error of the
/// formula <= 1.5e-7), together with `e^(-z²)`, which the GELU backward reuses.
#[inline(always)]
pub fn erfc_nonneg<const FMA: bool>(z: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_7;
    const A4: f32 = -1.453_152;
    const A5: f32 = 1.061_405_4;
    let t = 1.0 / fmadd::<FMA>(P, z, 1.0);
    let mut poly = A5;
    poly = fmadd::<FMA>(poly, t, A4);
    poly = fmadd::<FMA>(poly, t, A3);
    poly = fmadd::<FMA>(poly, t, A2);
    poly = fmadd::<FMA>(poly, t, A1);
    poly *= t;
    let gauss = exp::<FMA>(-z * z);
    (poly * gauss, gauss)
}

/// Below this `|z|`, `erf` comes from its Taylor series: `1 - erfc` would lose the last bits
/// to cancellation there (measured: 6e-7 error at `z = 0.035` without this branch).
const TAYLOR_BELOW: f32 = 0.75;

/// `erf(z)` for `|z| < 0.75` by its Taylor series
/// `2/√π · Σ (-1)ⁿ z^(2n+1) / (n! (2n+1))`, eight terms (truncation error about 1e-8).
#[inline(always)]
fn erf_taylor<const FMA: bool>(z: f32) -> f32 {
    // 2/√π / (n! (2n+1)) with alternating signs, n = 0..7.
    const C: [f32; 8] = [
        std::f32::consts::FRAC_2_SQRT_PI,
        -0.376_126_4,
        0.112_837_92,
        -0.026_866_17,
        0.005_223_977_6,
        -8.548_327e-4,
        1.205_533_3e-4,
        -1.492_565e-5,
    ];
    let z2 = z * z;
    let mut p = C[7];
    for c in C[..7].iter().rev() {
        p = fmadd::<FMA>(p, z2, *c);
    }
    p * z
}

/// `1 + erf(z)` (accurate in relative terms for very negative `z`, where it is tiny) and
/// `e^(-z²)`. Absolute error of the first below 3e-7.
#[inline(always)]
pub fn one_plus_erf<const FMA: bool>(z: f32) -> (f32, f32) {
    let a = z.abs();
    let (c, gauss) = erfc_nonneg::<FMA>(a);
    let s = erf_taylor::<FMA>(a);
    let small = if z >= 0.0 { 1.0 + s } else { 1.0 - s };
    let large = if z >= 0.0 { 2.0 - c } else { c };
    (if a < TAYLOR_BELOW { small } else { large }, gauss)
}

/// `erf(x)` in `f32`, absolute error below 3e-7 against the exact function.
///
/// ```
/// let e = peft_ops::math::erf(0.5);
/// assert!((e - 0.520_499_9).abs() < 1e-6);
/// ```
#[inline]
pub fn erf(x: f32) -> f32 {
    one_plus_erf::<false>(x).0 - 1.0
}

/// `e^x` in `f32` (relative error about 1e-7 for `x` in `[-87, 88]`).
///
/// ```
/// assert!((peft_ops::math::exp(1.0) - std::f32::consts::E).abs() < 1e-6);
/// ```
#[inline]
pub fn exp_f32(x: f32) -> f32 {
    exp::<false>(x)
}
