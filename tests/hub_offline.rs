//! `HF_HUB_OFFLINE=1`: a hub id resolves from the cache only, and fails fast with a clear
//! message when the files are absent (hf-hub itself ignores this variable).

use burn::tensor::Device;
use burn_peft::models::{ModelError, Task, from_pretrained};

#[test]
fn offline_mode_fails_fast_without_the_cache_and_resolves_with_it() {
    let cache = tempfile::tempdir().unwrap();
    // SAFETY: this test binary has a single test, set before any other thread starts.
    unsafe {
        std::env::set_var("HF_HUB_CACHE", cache.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let device = Device::flex();
    // The offline branch returns before any download is attempted; its message proves we took it.
    match from_pretrained("some-org/not-cached", Task::Auto, &device) {
        Err(ModelError::NotFound { id, reason }) => {
            assert_eq!(id, "some-org/not-cached");
            assert!(reason.contains("HF_HUB_OFFLINE"), "{reason}");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }

    // Lay a model out in the hub cache layout (as huggingface_hub does) and resolve it by id.
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/gpt2");
    let repo = cache.path().join("models--some-org--tiny-gpt2");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(file), snapshot.join(file)).unwrap();
    }
    let loaded = from_pretrained("some-org/tiny-gpt2", Task::Auto, &device).unwrap();
    assert!(loaded.model.is_causal_lm());
    assert_eq!(loaded.dir, snapshot);
}
