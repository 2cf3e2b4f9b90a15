//! The check that a test binary built without a GPU feature ignores its GPU tests (so the
//! test count says what ran; they used to print `SKIPPED` and count as passed). Shared by
//! `tests/vulkan.rs` and `crates/peft-cli/tests/vulkan.rs`.

/// The name of the test that calls [`assert_gpu_tests_ignored`] in each binary.
const CHECK: &str = "without_a_gpu_feature_the_gpu_tests_are_ignored";

/// Every test of the running binary is ignored, except `runs_anywhere` (tests that need no
/// GPU) and the check itself; the binary has at least one GPU test.
pub fn assert_gpu_tests_ignored(runs_anywhere: &[&str]) {
    let list = |ignored: bool| -> Vec<String> {
        let mut command = std::process::Command::new(std::env::current_exe().unwrap());
        command.args(["--list", "--format", "terse"]);
        if ignored {
            command.arg("--ignored");
        }
        let out = command.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .map(str::to_string)
            .collect()
    };
    let ignored = list(true);
    let gpu: Vec<String> = list(false)
        .into_iter()
        .filter(|t| t != CHECK && !runs_anywhere.contains(&t.as_str()))
        .collect();
    assert!(!gpu.is_empty());
    for test in &gpu {
        assert!(
            ignored.contains(test),
            "`{test}` runs (and passes as SKIPPED) in a build without a GPU feature"
        );
    }
}
