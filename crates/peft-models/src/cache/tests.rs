//! The KV cache's buffers against plain concatenation.

use burn::tensor::{Device, Distribution, Tensor};

use super::KvCache;

fn step(device: &Device, len: usize) -> (Tensor<4>, Tensor<4>) {
    let t = || Tensor::<4>::random([2, 3, len, 8], Distribution::Normal(0.0, 1.0), device);
    (t(), t())
}

#[test]
fn appending_into_the_buffers_equals_concatenation() {
    // A prompt of 5, then 150 one-token steps: the buffers grow three times.
    let device = Device::flex();
    let mut cache = KvCache::new(1);
    let (mut all_k, mut all_v) = step(&device, 5);
    cache.append(0, all_k.clone(), all_v.clone());
    for _ in 0..150 {
        let (k, v) = step(&device, 1);
        all_k = Tensor::cat(vec![all_k, k.clone()], 2);
        all_v = Tensor::cat(vec![all_v, v.clone()], 2);
        let (ck, cv) = cache.append(0, k, v);
        assert_eq!(ck.dims(), all_k.dims());
        ck.into_data().assert_eq(&all_k.clone().into_data(), true);
        cv.into_data().assert_eq(&all_v.clone().into_data(), true);
    }
    assert_eq!(cache.len(), 155);
}

#[test]
fn a_clone_is_not_changed_by_appends_to_the_original() {
    // Appends write in place only into buffers nobody else holds.
    let device = Device::flex();
    let mut cache = KvCache::new(1);
    let (k, v) = step(&device, 4);
    cache.append(0, k, v);
    let (k, v) = step(&device, 1);
    cache.append(0, k, v);
    let snapshot = cache.clone();
    let before = snapshot.layers[0].as_ref().unwrap().filled().0.into_data();
    let (k, v) = step(&device, 1);
    cache.append(0, k, v);
    assert_eq!(snapshot.len(), 5);
    assert_eq!(cache.len(), 6);
    let after = snapshot.layers[0].as_ref().unwrap().filled().0.into_data();
    after.assert_eq(&before, true);
    // And the snapshot still continues on its own.
    let mut snapshot = snapshot;
    let (k, v) = step(&device, 1);
    let (sk, _) = snapshot.append(0, k.clone(), v);
    let want = Tensor::cat(vec![Tensor::from_data(before, &device), k], 2);
    sk.into_data().assert_eq(&want.into_data(), true);
}
