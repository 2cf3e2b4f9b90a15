//! The seeded order of the examples in each epoch.

use rand::{RngCore, SeedableRng, rngs::StdRng};

/// SplitMix64's finalizer: spreads `(seed, epoch)` over the seed space.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform integer in `0..=bound` from raw 64-bit draws (Lemire's method, unbiased).
fn below_or_eq(rng: &mut StdRng, bound: u64) -> u64 {
    let range = bound.wrapping_add(1);
    if range == 0 {
        return rng.next_u64();
    }
    let threshold = range.wrapping_neg() % range;
    loop {
        let m = u128::from(rng.next_u64()) * u128::from(range);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// The order of the examples in an epoch: a permutation of `0..len`, the same for the same
/// `(seed, epoch)` (resumed runs see the same batches), different across epochs.
///
/// A Fisher–Yates shuffle of our own over `StdRng` (seeded from a mix of `seed` and `epoch`)
/// drawing raw `u64`s, so the order depends only on `StdRng`'s stream (stable within rand 0.9).
pub fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(mix(seed ^ mix(epoch as u64)));
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = below_or_eq(&mut rng, i as u64) as usize;
        order.swap(i, j);
    }
    order
}
