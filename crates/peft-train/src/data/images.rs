//! Image classification data: an image folder (one subfolder per class, PNG / JPEG, as
//! torchvision's `ImageFolder`) or a pixel CSV (MNIST-style: one image per row, its pixels then
//! its label; `.csv` or `.csv.gz`), resized and normalized as the model's
//! `preprocessor_config.json` says (transformers' image processors: `size`, `image_mean`,
//! `image_std`, `rescale_factor`), or with ImageNet's statistics (torchvision's defaults) when
//! the model has none.
//!
//! Every failure names the file (and the line of a CSV row): a broken image, a row of the
//! wrong width, a value that is not a pixel, pixels of a channel count the model cannot take.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::imageops::FilterType;
use image::{ImageBuffer, Luma, Rgb};
use serde::Deserialize;
use serde_json::Value;

use super::{DataError, Example, LabelMap};

/// The largest image side accepted after resizing (a config cannot ask for more memory than a
/// sane batch needs).
const MAX_SIDE: usize = 4096;

/// One preprocessed image, channels first: `[channels, height, width]` values.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Channels.
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// `channels · height · width` normalized values.
    pub values: Vec<f32>,
}

// Every value is finite (pixels are checked to be in 0..=255, the std positive), so equality is
// an equivalence, as `Example`'s `Eq` needs.
impl Eq for Image {}

/// How images become the model's `pixel_values`.
///
/// ```
/// use peft_train::data::ImagePreprocess;
/// let imagenet = ImagePreprocess::imagenet(224, 3);
/// assert_eq!(imagenet.mean, [0.485, 0.456, 0.406]);
/// assert_eq!(imagenet.size, [224, 224]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePreprocess {
    /// `[height, width]` after resizing (bilinear).
    pub size: [usize; 2],
    /// Channels the model reads (a grayscale image is repeated to 3, as PIL's
    /// `convert("RGB")`; a color image becomes luma for a 1-channel model).
    pub channels: usize,
    /// Per-channel mean, subtracted after rescaling.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation, divided by after.
    pub std: Vec<f32>,
    /// Factor from stored values (0-255) to the model's range.
    pub rescale: f32,
}

#[derive(Deserialize)]
struct PreprocessorFile {
    #[serde(default)]
    image_mean: Option<Vec<f32>>,
    #[serde(default)]
    image_std: Option<Vec<f32>>,
    #[serde(default)]
    size: Option<Value>,
    #[serde(default)]
    rescale_factor: Option<f32>,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "yes")]
    do_normalize: bool,
}

fn yes() -> bool {
    true
}

impl ImagePreprocess {
    /// torchvision's ImageNet normalization at `size` x `size` with `channels` channels.
    pub fn imagenet(size: usize, channels: usize) -> Self {
        let (mean, std) = if channels == 3 {
            (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225])
        } else {
            (vec![0.5; channels], vec![0.5; channels])
        };
        Self {
            size: [size, size],
            channels,
            mean,
            std,
            rescale: 1.0 / 255.0,
        }
    }

    /// The preprocessing a model folder describes in `preprocessor_config.json` (its `size`,
    /// statistics and rescale factor), or [`imagenet`](Self::imagenet) at 224 without the
    /// file; `size` overrides the side (a smaller input trains faster).
    pub fn for_model(dir: &Path, channels: usize, size: Option<usize>) -> Result<Self, DataError> {
        let file = dir.join("preprocessor_config.json");
        let mut pre = if file.is_file() {
            Self::read(&file, channels)?
        } else {
            Self::imagenet(224, channels)
        };
        if let Some(side) = size {
            pre.size = [side, side];
        }
        let [h, w] = pre.size;
        if h == 0 || w == 0 || h > MAX_SIDE || w > MAX_SIDE {
            return Err(DataError::Malformed {
                file: file.clone(),
                line: 0,
                reason: format!("image size {h}x{w} is outside 1..={MAX_SIDE}"),
            });
        }
        Ok(pre)
    }

    fn read(file: &Path, channels: usize) -> Result<Self, DataError> {
        let bad = |reason: String| DataError::Malformed {
            file: file.to_path_buf(),
            line: 0,
            reason,
        };
        let text = fs::read_to_string(file).map_err(|source| DataError::Io {
            file: file.to_path_buf(),
            source,
        })?;
        let raw: PreprocessorFile = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not a preprocessor config: {e}")))?;
        let size = match &raw.size {
            None => [224, 224],
            Some(Value::Number(n)) => {
                let s = n.as_u64().unwrap_or(0) as usize;
                [s, s]
            }
            Some(Value::Object(m)) => {
                let get = |k: &str| m.get(k).and_then(Value::as_u64).map(|v| v as usize);
                match (get("height"), get("width"), get("shortest_edge")) {
                    (Some(h), Some(w), _) => [h, w],
                    (_, _, Some(s)) => [s, s],
                    _ => return Err(bad(format!("`size` {m:?} has no height/width"))),
                }
            }
            Some(other) => return Err(bad(format!("`size` is {other}, not a size"))),
        };
        let defaults = Self::imagenet(size[0], channels);
        let stat = |v: Option<Vec<f32>>, default: Vec<f32>, key: &str| match v {
            Some(v) if v.len() == channels => Ok(v),
            Some(v) => Err(bad(format!(
                "`{key}` has {} values; the model reads {channels} channels",
                v.len()
            ))),
            None => Ok(default),
        };
        let (mean, std) = if raw.do_normalize {
            (
                stat(raw.image_mean, defaults.mean, "image_mean")?,
                stat(raw.image_std, defaults.std, "image_std")?,
            )
        } else {
            (vec![0.0; channels], vec![1.0; channels])
        };
        if std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(bad(format!("`image_std` {std:?} must be positive")));
        }
        let rescale = if raw.do_rescale {
            raw.rescale_factor.unwrap_or(1.0 / 255.0)
        } else {
            1.0
        };
        Ok(Self {
            size,
            channels,
            mean,
            std,
            rescale,
        })
    }

    /// Resize, convert and normalize an image given as `channels` planes of 0-255 values
    /// (`[c, h, w]`, `c` 1, 3 or 4: gray, RGB, RGBA).
    fn apply(&self, c: usize, h: usize, w: usize, planes: &[f32]) -> Image {
        let [out_h, out_w] = self.size;
        let plane = |i: usize| &planes[i * h * w..(i + 1) * h * w];
        // To the model's channels first, at the source size (cheaper than after resizing when
        // shrinking, and the same when growing for a linear filter).
        let converted: Vec<Vec<f32>> = match (c, self.channels) {
            (1, n) => vec![plane(0).to_vec(); n],
            (3 | 4, 1) => vec![
                (0..h * w)
                    .map(|i| 0.299 * plane(0)[i] + 0.587 * plane(1)[i] + 0.114 * plane(2)[i])
                    .collect(),
            ],
            (3 | 4, 3) => (0..3).map(|i| plane(i).to_vec()).collect(),
            _ => unreachable!("checked by the readers"),
        };
        let mut values = Vec::with_capacity(self.channels * out_h * out_w);
        for (i, p) in converted.into_iter().enumerate() {
            // The image crate's float images hold 0..=1 (its resize clamps to that range), so
            // the plane is resized in those units and scaled back after.
            let resized = if [h, w] == [out_h, out_w] {
                p
            } else {
                let unit: Vec<f32> = p.into_iter().map(|v| v / 255.0).collect();
                let buf: ImageBuffer<Luma<f32>, Vec<f32>> =
                    ImageBuffer::from_raw(w as u32, h as u32, unit).expect("h * w values");
                image::imageops::resize(&buf, out_w as u32, out_h as u32, FilterType::Triangle)
                    .into_raw()
                    .into_iter()
                    .map(|v| v * 255.0)
                    .collect()
            };
            let (mean, std) = (self.mean[i], self.std[i]);
            values.extend(resized.into_iter().map(|v| (v * self.rescale - mean) / std));
        }
        Image {
            channels: self.channels,
            height: out_h,
            width: out_w,
            values,
        }
    }

    /// Whether images of `c` channels convert to the model's.
    fn takes(&self, c: usize) -> bool {
        matches!((c, self.channels), (1, _) | (3 | 4, 1) | (3 | 4, 3))
    }
}

/// Read the examples of `path`: an image folder, or a pixel CSV (`.csv`, `.csv.gz`) whose rows
/// hold `shape`'s pixels (`[height, width]` or `[channels, height, width]`, channels first;
/// by default square single-channel images, every column but the last a pixel) then the
/// label. `labels` maps class names to ids (the training set's);
/// without it the map is built from the classes found (folder names sorted, or the CSV's
/// label values, as [`LabelMap::from_labels`]).
pub fn load_image_examples(
    path: &Path,
    pre: &ImagePreprocess,
    shape: Option<&[usize]>,
    labels: Option<&LabelMap>,
) -> Result<(Vec<Example>, Option<LabelMap>), DataError> {
    let rows = if path.is_dir() {
        read_folder(path, pre)?
    } else {
        read_pixel_csv(path, pre, shape)?
    };
    if rows.is_empty() {
        return Err(DataError::Empty {
            file: path.to_path_buf(),
        });
    }
    let found = match labels {
        Some(_) => None,
        None => Some(LabelMap::from_labels(rows.iter().map(|r| r.label.as_str()))),
    };
    let map = labels.or(found.as_ref()).expect("one of the two");
    let examples = rows
        .into_iter()
        .map(|row| {
            let id = map.id(&row.label).ok_or_else(|| DataError::UnknownLabel {
                file: row.file.clone(),
                line: row.line,
                label: row.label.clone(),
                known: map.names.clone(),
            })?;
            Ok(Example::image(Arc::new(row.image), id, row.line))
        })
        .collect::<Result<Vec<_>, DataError>>()?;
    Ok((examples, found))
}

struct Row {
    file: PathBuf,
    line: usize,
    label: String,
    image: Image,
}

fn bad_image(file: &Path, reason: String) -> DataError {
    DataError::BadImage {
        file: file.to_path_buf(),
        reason,
    }
}

/// `root/<class>/<image>`: classes are the subfolders (sorted), images their PNG / JPEG files
/// (other files are skipped with a warning).
fn read_folder(root: &Path, pre: &ImagePreprocess) -> Result<Vec<Row>, DataError> {
    let io = |file: &Path| {
        let file = file.to_path_buf();
        move |source| DataError::Io { file, source }
    };
    let mut classes: Vec<PathBuf> = fs::read_dir(root)
        .map_err(io(root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(bad_image(
            root,
            "an image folder holds one subfolder of images per class, and this one has none".into(),
        ));
    }
    let mut rows = Vec::new();
    let mut skipped = 0;
    for class in classes {
        let label = class
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut files: Vec<PathBuf> = fs::read_dir(&class)
            .map_err(io(&class))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for file in files {
            let ext = file
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase());
            if !matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
                skipped += 1;
                continue;
            }
            let image = decode(&file, pre)?;
            rows.push(Row {
                file,
                line: 0,
                label: label.clone(),
                image,
            });
        }
    }
    if skipped > 0 {
        log::warn!(
            "{}: skipped {skipped} files that are not .png / .jpg / .jpeg",
            root.display()
        );
    }
    Ok(rows)
}

fn decode(file: &Path, pre: &ImagePreprocess) -> Result<Image, DataError> {
    let bytes = fs::read(file).map_err(|source| DataError::Io {
        file: file.to_path_buf(),
        source,
    })?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad_image(file, e.to_string()))?;
    // Decoding limits: a forged header cannot make the decoder allocate gigabytes.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(16_384);
    limits.max_image_height = Some(16_384);
    limits.max_alloc = Some(512 << 20);
    reader.limits(limits);
    let decoded = reader
        .decode()
        .map_err(|e| bad_image(file, format!("not a readable PNG / JPEG image: {e}")))?;
    let (w, h) = (decoded.width() as usize, decoded.height() as usize);
    let color = decoded.color().has_color();
    let planes = if color {
        let rgb: ImageBuffer<Rgb<u8>, Vec<u8>> = decoded.to_rgb8();
        channels_first(rgb.as_raw(), 3, h, w)
    } else {
        decoded
            .to_luma8()
            .into_raw()
            .into_iter()
            .map(f32::from)
            .collect()
    };
    let c = if color { 3 } else { 1 };
    if !pre.takes(c) {
        return Err(bad_image(
            file,
            format!("{c} channels; the model reads {}", pre.channels),
        ));
    }
    Ok(pre.apply(c, h, w, &planes))
}

/// Interleaved `[h, w, c]` bytes to `[c, h, w]` values.
fn channels_first(bytes: &[u8], c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; c * h * w];
    for (i, px) in bytes.chunks_exact(c).enumerate() {
        for (ch, v) in px.iter().enumerate() {
            out[ch * h * w + i] = f32::from(*v);
        }
    }
    out
}

/// A pixel CSV: each row `shape`'s pixels (0-255, channels first) then the label; an optional
/// header row (any cell that is not a number) is skipped.
fn read_pixel_csv(
    path: &Path,
    pre: &ImagePreprocess,
    shape: Option<&[usize]>,
) -> Result<Vec<Row>, DataError> {
    let io = |source| DataError::Io {
        file: path.to_path_buf(),
        source,
    };
    let raw = fs::read(path).map_err(io)?;
    let text = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = String::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_string(&mut out)
            .map_err(|e| bad_image(path, format!("not a gzip file of CSV text: {e}")))?;
        out
    } else {
        String::from_utf8(raw).map_err(|_| bad_image(path, "not UTF-8 CSV text".into()))?
    };
    let mut rows = Vec::new();
    let mut layout: Option<[usize; 3]> = match shape {
        None => None,
        Some(&[h, w]) => Some([1, h, w]),
        Some(&[c, h, w]) => Some([c, h, w]),
        Some(other) => {
            return Err(bad_image(
                path,
                format!(
                    "data.image_shape {other:?} is neither [height, width] nor [channels, height, width]"
                ),
            ));
        }
    };
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        let numbers: Option<Vec<f32>> = cells[..cells.len() - 1]
            .iter()
            .map(|c| c.parse::<f32>().ok())
            .collect();
        let Some(pixels) = numbers else {
            if rows.is_empty() && index == 0 {
                continue; // a header row
            }
            let (col, cell) = cells
                .iter()
                .enumerate()
                .find(|(_, c)| c.parse::<f32>().is_err())
                .expect("some cell failed");
            return Err(DataError::Malformed {
                file: path.to_path_buf(),
                line: line_no,
                reason: format!("column {} is `{cell}`, not a pixel value", col + 1),
            });
        };
        let [c, h, w] = *layout.get_or_insert_with(|| {
            let side = (pixels.len() as f64).sqrt().round() as usize;
            [1, side, side]
        });
        let expected = c * h * w;
        if pixels.len() != expected {
            return Err(DataError::Malformed {
                file: path.to_path_buf(),
                line: line_no,
                reason: format!(
                    "{} values; a row holds {expected} pixels ({c}x{h}x{w}) and a label = {} \
                     values (set data.image_shape for other images)",
                    cells.len(),
                    expected + 1
                ),
            });
        }
        if let Some(v) = pixels.iter().find(|v| !(0.0..=255.0).contains(*v)) {
            return Err(DataError::Malformed {
                file: path.to_path_buf(),
                line: line_no,
                reason: format!("pixel value {v} is outside 0..=255"),
            });
        }
        if !pre.takes(c) {
            return Err(bad_image(
                path,
                format!("rows of {c} channels; the model reads {}", pre.channels),
            ));
        }
        rows.push(Row {
            file: path.to_path_buf(),
            line: line_no,
            label: cells[cells.len() - 1].to_string(),
            image: pre.apply(c, h, w, &pixels),
        });
    }
    Ok(rows)
}

#[cfg(test)]
#[path = "images_tests.rs"]
mod tests;
