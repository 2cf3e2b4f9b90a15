//! `burn-peft combine` on kohya `.safetensors` LoRA files (tests/fixtures/sd_fuse): no
//! `--model`, `cat` only, one combined kohya file out; a PEFT bundle still needs `--model`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use peft_lora::kohya::{LoraFile, LoraFormat};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn combine(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_burn-peft"))
        .arg("combine")
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn args(output: &Path, extra: &[&str]) -> Vec<String> {
    let dir = fixtures().join("sd_fuse");
    let mut args = vec![
        "--adapter".to_string(),
        format!("{}:0.7", dir.join("a.safetensors").display()),
        "--adapter".to_string(),
        format!("{}:0.5", dir.join("b.safetensors").display()),
        "--output".to_string(),
        output.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn lora_files_combine_into_one_kohya_file() {
    let tmp = tempfile::tempdir().unwrap();
    let output = tmp.path().join("both.safetensors");
    let out = combine(&args(&output, &[]));
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("into 10 modules, rank up to 6, F32"),
        "{stdout}"
    );
    let lora = LoraFile::read(&output).unwrap();
    assert_eq!(lora.format, LoraFormat::Kohya);
    assert_eq!(lora.modules.len(), 10);
    let q = lora
        .module("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
        .unwrap();
    assert_eq!((q.rank, q.alpha), (6, 6.0));

    // `--type cat` is accepted; a weight-less input counts once.
    let again = tmp.path().join("again.safetensors");
    let mut a = args(&again, &["--type", "cat"]);
    a[1] = fixtures()
        .join("sd_fuse/a.safetensors")
        .display()
        .to_string();
    let out = combine(&a);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1×"));
}

#[test]
fn bad_lora_file_combines_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let output = tmp.path().join("both.safetensors");
    for (extra, needle) in [
        (&["--type", "svd"][..], "only `cat`"),
        (&["--model", "x"][..], "--model is not used"),
    ] {
        let out = combine(&args(&output, extra));
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains(needle), "{}", text(&out));
    }
    let out = combine(&args(&tmp.path().join("dir"), &[]));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("ending in .safetensors"),
        "{}",
        text(&out)
    );
    // One module with two shapes: both files named.
    let out = combine(&[
        "--adapter".into(),
        fixtures()
            .join("sd_fuse/a.safetensors")
            .display()
            .to_string(),
        "--adapter".into(),
        fixtures()
            .join("sd_fuse/wrong_shape.safetensors")
            .display()
            .to_string(),
        "--output".into(),
        output.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("wrong_shape.safetensors"),
        "{}",
        text(&out)
    );
    assert!(!output.exists());

    // A PEFT bundle without --model is still refused.
    let out = combine(&[
        "--adapter".into(),
        "a=some/dir:0.5".into(),
        "--output".into(),
        tmp.path().join("bundle").display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--model"), "{}", text(&out));
}
