//! Deterministic inputs and comparisons.

use burn::tensor::{Device, Tensor, TensorData};

/// Tolerance of every comparison: `|fused - composed| <= TOL · max(1, |composed|)`.
pub const TOL: f32 = 1e-5;

/// A small deterministic generator (SplitMix64), so the inputs do not depend on the device RNG.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }

    /// `N(0, std²)` data of `shape`.
    pub fn data(&mut self, shape: &[usize], std: f32) -> TensorData {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| self.normal() * std).collect();
        TensorData::new(values, shape.to_vec())
    }
}

/// A tensor of `data` on `device`, tracked when `grad`.
pub fn tensor<const D: usize>(data: &TensorData, device: &Device, grad: bool) -> Tensor<D> {
    let t = Tensor::<D>::from_data(data.clone(), device);
    if grad { t.require_grad() } else { t }
}

/// Max error of `got` against `want` as `|got - want| / max(1, |want|)`.
pub fn max_error(got: &TensorData, want: &TensorData) -> f32 {
    assert_eq!(got.shape(), want.shape(), "shapes differ");
    let g = got.try_to_vec::<f32>().expect("f32");
    let w = want.try_to_vec::<f32>().expect("f32");
    g.iter()
        .zip(&w)
        .map(|(a, b)| {
            assert!(
                a.is_finite() == b.is_finite(),
                "finite mismatch: {a} vs {b}"
            );
            (a - b).abs() / b.abs().max(1.0)
        })
        .fold(0.0, f32::max)
}

/// Asserts `got` is within [`TOL`] of `want`.
pub fn assert_close(what: &str, got: TensorData, want: TensorData) {
    let err = max_error(&got, &want);
    assert!(err <= TOL, "{what}: max error {err:e} > {TOL:e}");
}

/// `Σ out·w` for fixed random weights `w`, so every output element gets a distinct gradient.
pub fn weighted_sum<const D: usize>(out: Tensor<D>, weights: &TensorData) -> Tensor<1> {
    let w = Tensor::<D>::from_data(weights.clone(), &out.device());
    (out * w).sum()
}

/// The gradient of `t` (zeros when it received none), as data.
pub fn grad_of<const D: usize>(t: &Tensor<D>, grads: &burn::tensor::Gradients) -> TensorData {
    match t.grad(grads) {
        Some(g) => g.into_data(),
        None => Tensor::<D>::zeros(t.dims(), &t.device().without_autodiff()).into_data(),
    }
}

/// The training device.
pub fn autodiff() -> Device {
    Device::flex().autodiff()
}

/// Serializes the tests that seed the (process-wide) flex RNG.
pub fn device_rng() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
