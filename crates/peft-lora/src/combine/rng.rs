//! The seeded random stream of the DARE masks.
//!
//! PEFT draws them with `torch.bernoulli` from PyTorch's global generator, a stream we cannot
//! reproduce. Ours is SplitMix64 (Steele et al., 2014; passes BigCrush), written out here so the
//! masks depend only on the seed, never on a dependency's version. Every tensor gets its own
//! stream, keyed by (seed, module path, input index, tensor), so a module's masks do not depend
//! on which other modules exist or in which order they are processed.

/// A SplitMix64 generator.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// The stream of tensor `tensor` of input `input` at module `key` under `seed`.
    pub(crate) fn for_tensor(seed: u64, key: &str, input: usize, tensor: u64) -> Self {
        let mut h = Self { state: seed };
        let mut mix = |x: u64| {
            h.state ^= x;
            h.next_u64()
        };
        mix(fnv1a(key));
        mix(input as u64);
        let start = mix(tensor);
        Self { state: start }
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform number in `[0, 1)` with 53 random bits.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// FNV-1a, 64 bit: a stable hash of the module path (std's hasher may change between releases).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let draw = |seed, key, input, tensor| {
            let mut r = SplitMix64::for_tensor(seed, key, input, tensor);
            (0..4).map(|_| r.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7, "q", 0, 0), draw(7, "q", 0, 0));
        assert_ne!(draw(7, "q", 0, 0), draw(8, "q", 0, 0));
        assert_ne!(draw(7, "q", 0, 0), draw(7, "k", 0, 0));
        assert_ne!(draw(7, "q", 0, 0), draw(7, "q", 1, 0));
        assert_ne!(draw(7, "q", 0, 0), draw(7, "q", 0, 1));
    }

    #[test]
    fn splitmix_reference_values() {
        // First outputs of SplitMix64 seeded with 0 (the published reference sequence).
        let mut r = SplitMix64 { state: 0 };
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn uniform_mean_is_one_half() {
        let mut r = SplitMix64::for_tensor(1, "x", 0, 0);
        let n = 200_000;
        let mean = (0..n).map(|_| r.next_f64()).sum::<f64>() / n as f64;
        // Standard error sqrt(1/12/n) = 6.5e-4; 5 sigma.
        assert!((mean - 0.5).abs() < 3.3e-3, "{mean}");
    }
}
