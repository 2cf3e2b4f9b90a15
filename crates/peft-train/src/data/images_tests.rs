//! Tests of `images`: image folders, pixel CSVs, preprocessing and their typed errors.
use super::*;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(&path, bytes).unwrap();
    path
}

fn png(w: u32, h: u32, rgb: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new(&mut out);
    let (color, channels) = if rgb {
        (image::ExtendedColorType::Rgb8, 3)
    } else {
        (image::ExtendedColorType::L8, 1)
    };
    let pixels: Vec<u8> = (0..w * h * channels)
        .map(|i| (i * 37 % 256) as u8)
        .collect();
    image::ImageEncoder::write_image(encoder, &pixels, w, h, color).unwrap();
    out
}

#[test]
fn an_image_folder_gives_one_class_per_subfolder() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "cat/a.png", &png(5, 4, true));
    write(dir.path(), "cat/b.PNG", &png(3, 3, false));
    write(dir.path(), "dog/c.png", &png(8, 8, true));
    write(dir.path(), "dog/notes.txt", b"not an image");
    let pre = ImagePreprocess::imagenet(6, 3);
    let (examples, labels) = load_image_examples(dir.path(), &pre, None, None).unwrap();
    assert_eq!(labels.unwrap().names, ["cat", "dog"]);
    assert_eq!(examples.len(), 3);
    assert_eq!(
        examples
            .iter()
            .map(|e| e.label.unwrap())
            .collect::<Vec<_>>(),
        [0, 0, 1]
    );
    let image = examples[1].image.as_ref().unwrap();
    assert_eq!([image.channels, image.height, image.width], [3, 6, 6]);
    // A grayscale image is repeated to RGB before the per-channel normalization.
    let plane = 36;
    let g = |c: usize, i: usize| image.values[c * plane + i] * pre.std[c] + pre.mean[c];
    assert!((g(0, 7) - g(2, 7)).abs() < 1e-5);
}

#[test]
fn a_broken_image_names_its_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a/ok.png", &png(4, 4, true));
    let bad = write(dir.path(), "b/broken.png", b"\x89PNG\r\n\x1a\nnot really");
    let pre = ImagePreprocess::imagenet(4, 3);
    let err = load_image_examples(dir.path(), &pre, None, None).unwrap_err();
    assert!(
        matches!(err, DataError::BadImage { ref file, .. } if *file == bad),
        "{err}"
    );
    assert!(err.to_string().contains("broken.png"), "{err}");
}

#[test]
fn a_folder_without_classes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "loose.png", &png(4, 4, true));
    let err =
        load_image_examples(dir.path(), &ImagePreprocess::imagenet(4, 3), None, None).unwrap_err();
    assert!(err.to_string().contains("subfolder"), "{err}");
}

#[test]
fn a_pixel_csv_reads_mnist_rows_and_names_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let row = |label: &str| {
        let mut cells: Vec<String> = (0..16).map(|i| (i * 10).to_string()).collect();
        cells.push(label.into());
        cells.join(",")
    };
    let good = write(
        dir.path(),
        "digits.csv",
        format!("{}\n{}\n", row("3"), row("7")).as_bytes(),
    );
    let pre = ImagePreprocess::imagenet(8, 3);
    let (examples, labels) = load_image_examples(&good, &pre, None, None).unwrap();
    assert_eq!(examples.len(), 2);
    assert_eq!(labels.unwrap().names.len(), 8); // integer labels 0..=7
    assert_eq!(examples[1].label, Some(7));
    assert_eq!(examples[1].line, 2);
    let image = examples[0].image.as_ref().unwrap();
    assert_eq!([image.channels, image.height, image.width], [3, 8, 8]);

    // A row of the wrong width names the file and the line, and what a row holds.
    let short = write(
        dir.path(),
        "short.csv",
        format!("{}\n1,2,3,4\n", row("1")).as_bytes(),
    );
    let err = load_image_examples(&short, &pre, None, None).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, DataError::Malformed { line: 2, .. }),
        "{text}"
    );
    assert!(
        text.contains("short.csv:2") && text.contains("17 values"),
        "{text}"
    );

    // A value that is not a pixel.
    let bad = write(
        dir.path(),
        "bad.csv",
        format!("{}\n{}\n", row("1"), row("x").replace("150", "high")).as_bytes(),
    );
    let err = load_image_examples(&bad, &pre, None, None).unwrap_err();
    assert!(err.to_string().contains("bad.csv:2"), "{err}");

    // Pixels of a channel count the model cannot take.
    let two = write(dir.path(), "two.csv", format!("{}\n", row("1")).as_bytes());
    let err = load_image_examples(&two, &pre, Some(&[2, 2, 4]), None).unwrap_err();
    assert!(err.to_string().contains("2 channels"), "{err}");
}

/// Resizing keeps values above 1 (the image crate's float images clamp to 0..=1): a white
/// digit stays white.
#[test]
fn resizing_keeps_the_pixel_range() {
    let pre = ImagePreprocess {
        size: [4, 4],
        channels: 1,
        mean: vec![0.0],
        std: vec![1.0],
        rescale: 1.0 / 255.0,
    };
    let image = pre.apply(1, 2, 2, &[255.0, 255.0, 255.0, 255.0]);
    assert!(
        image.values.iter().all(|v| (v - 1.0).abs() < 1e-5),
        "{:?}",
        image.values
    );
    let image = pre.apply(1, 2, 2, &[0.0, 255.0, 0.0, 255.0]);
    let max = image.values.iter().fold(0.0f32, |m, v| m.max(*v));
    assert!((max - 1.0).abs() < 1e-5, "{:?}", image.values);
}

#[test]
fn gzipped_pixel_csv_and_preprocessor_configs_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, b"0,255,255,0,1\n").unwrap();
    let file = write(dir.path(), "d.csv.gz", &gz.finish().unwrap());
    write(
        dir.path(),
        "preprocessor_config.json",
        br#"{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 2, "width": 2}, "rescale_factor": 0.00392156862745098}"#,
    );
    let pre = ImagePreprocess::for_model(dir.path(), 3, None).unwrap();
    assert_eq!((pre.size, pre.mean[0]), ([2, 2], 0.5));
    let (examples, _) = load_image_examples(&file, &pre, None, None).unwrap();
    let values = &examples[0].image.as_ref().unwrap().values;
    assert_eq!(&values[..4], &[-1.0, 1.0, 1.0, -1.0]);
}
