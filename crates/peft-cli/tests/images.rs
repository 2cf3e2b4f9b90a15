//! `burn-peft train` on image models end to end (the tiny ResNet classifier of
//! `tests/fixtures/models/resnet_cls`): LoRA on the convolutions from a pixel CSV and from an
//! image folder, the head alone (`method: head`), the trained bundle run by `forward` and scored
//! by `eval`; and bad
//! image data as exit code 2 naming the file (and line).

mod common;

use std::path::{Path, PathBuf};

use common::{bad_input, burn_peft, fixtures, text};

fn resnet() -> PathBuf {
    fixtures().join("models/resnet_cls")
}

/// A pixel CSV of `rows` 3x8x8 images (labels 0..3) with an optional broken row.
fn pixel_csv(dir: &Path, name: &str, rows: usize, broken: Option<&str>) -> PathBuf {
    let mut text = String::new();
    for r in 0..rows {
        let cells: Vec<String> = (0..3 * 8 * 8)
            .map(|i| ((i * 7 + r * 31) % 256).to_string())
            .collect();
        text += &format!("{},{}\n", cells.join(","), r % 3);
    }
    if let Some(line) = broken {
        text += line;
        text += "\n";
    }
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    file
}

fn config(dir: &Path, method: &str, train: &str, eval: &str) -> PathBuf {
    let yaml = format!(
        "model:\n  name_or_path: {}\n  task: classification\n{method}\ndata:\n  train: {train}\n  eval: {eval}\n  image_size: 32\n  image_shape: [3, 8, 8]\ntrain:\n  epochs: 1\n  max_steps: 2\n  batch_size: 4\n  learning_rate: 1.0e-3\n  progress: false\noutput: out\n",
        resnet().display()
    );
    let file = dir.join("run.yaml");
    std::fs::write(&file, yaml).unwrap();
    file
}

const LORA: &str = "method:\n  peft_type: LORA\n  r: 4\n  lora_alpha: 8\n  target_modules: '.*\\.convolution'\n  modules_to_save: [classifier.1]";

#[test]
fn lora_on_a_resnet_trains_from_a_pixel_csv_and_the_bundle_runs() {
    let dir = tempfile::tempdir().unwrap();
    pixel_csv(dir.path(), "train.csv", 12, None);
    pixel_csv(dir.path(), "eval.csv", 6, None);
    let run = config(dir.path(), LORA, "train.csv", "eval.csv");
    let out = burn_peft().arg("train").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("12 train / 6 eval"), "{stdout}");
    let bundle = dir.path().join("out/adapter");
    assert!(bundle.join("adapter_model.safetensors").is_file());
    // The trained bundle runs on images through `forward`.
    let result = dir.path().join("result.safetensors");
    let out = burn_peft()
        .args(["forward", "--model"])
        .arg(resnet())
        .arg("--adapter")
        .arg(&bundle)
        .arg("--inputs")
        .arg(resnet().join("inputs.safetensors"))
        .arg("--output")
        .arg(&result)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let logits = &common::f32_tensors(&result)["logits"];
    assert_eq!(logits.1, [2, 3]);
    // `eval` reads the images as training did (the data config and label map beside the
    // adapter).
    let out = burn_peft()
        .args(["eval", "--model"])
        .arg(resnet())
        .arg("--adapter")
        .arg(&bundle)
        .arg("--data")
        .arg(dir.path().join("eval.csv"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("(6 examples): accuracy"), "{stdout}");
}

#[test]
fn the_head_alone_trains_from_an_image_folder() {
    let dir = tempfile::tempdir().unwrap();
    for (class, shade) in [("dark", 20u8), ("light", 230u8)] {
        let folder = dir.path().join("images").join(class);
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..4u8 {
            let img = image::RgbImage::from_pixel(10, 12, image::Rgb([shade, shade + i, shade]));
            img.save(folder.join(format!("{i}.png"))).unwrap();
        }
    }
    let run = config(dir.path(), "method: head", "images", "images");
    let out = burn_peft().arg("train").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("the classification head alone"), "{stdout}");
    // Only the head trains: 16 features x 2 classes + 2 biases.
    assert!(stdout.contains("trainable params: 34 "), "{stdout}");
    let labels = std::fs::read_to_string(dir.path().join("out/label_map.json")).unwrap();
    assert!(
        labels.contains("dark") && labels.contains("light"),
        "{labels}"
    );
}

#[test]
fn bad_image_data_is_exit_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    pixel_csv(dir.path(), "eval.csv", 3, None);
    // A row of the wrong width: the file and its line.
    pixel_csv(dir.path(), "train.csv", 4, Some("1,2,3,0"));
    let run = config(dir.path(), LORA, "train.csv", "eval.csv");
    let out = burn_peft().arg("train").arg(&run).output().unwrap();
    bad_input(&out, &["train.csv:5", "193 values"]);
    // A broken image in an image folder.
    let folder = dir.path().join("broken/a");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("x.png"), b"\x89PNG\r\n\x1a\nbroken").unwrap();
    let run = config(dir.path(), LORA, "broken", "eval.csv");
    let out = burn_peft().arg("train").arg(&run).output().unwrap();
    bad_input(&out, &["x.png", "not a readable PNG / JPEG image"]);
    // Pixels of a channel count the model cannot take.
    let run = config(dir.path(), LORA, "eval.csv", "eval.csv");
    let yaml = std::fs::read_to_string(&run)
        .unwrap()
        .replace("image_shape: [3, 8, 8]", "image_shape: [2, 12, 8]");
    std::fs::write(&run, yaml).unwrap();
    let out = burn_peft().arg("train").arg(&run).output().unwrap();
    bad_input(&out, &["eval.csv", "2 channels"]);
}
