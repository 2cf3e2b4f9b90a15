//! Label maps: class names in id order, built from training rows, saved as `label_map.json`.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::DataError;

/// The class names of a classification data set, in id order.
///
/// Built from the training rows by [`LabelMap::from_labels`]: when every label is a
/// non-negative integer (written without leading zeros) the ids are the integers themselves
/// and the names are `"0"..="max"`; otherwise the names are the distinct labels sorted
/// alphabetically (byte order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    /// The name of each class; the id of a class is its index.
    pub names: Vec<String>,
}

#[derive(Deserialize)]
struct LabelMapFile {
    id2label: HashMap<String, String>,
    #[serde(default)]
    label2id: Option<HashMap<String, usize>>,
}

/// Serializes `(key, value)` pairs as a JSON object in the given order.
struct OrderedMap<'a, V: Serialize>(Vec<(String, &'a V)>);

impl<V: Serialize> Serialize for OrderedMap<'_, V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

fn canonical_int(s: &str) -> Option<usize> {
    let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if digits && (s == "0" || !s.starts_with('0')) {
        s.parse().ok()
    } else {
        None
    }
}

impl LabelMap {
    /// Build the map of a set of raw labels (see the type's documentation).
    pub fn from_labels<I, S>(labels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let distinct: BTreeSet<String> =
            labels.into_iter().map(|s| s.as_ref().to_string()).collect();
        let ints: Option<Vec<usize>> = distinct.iter().map(|s| canonical_int(s)).collect();
        let names = match ints {
            Some(ints) if !ints.is_empty() => {
                let max = ints.into_iter().max().unwrap_or(0);
                (0..=max).map(|i| i.to_string()).collect()
            }
            _ => distinct.into_iter().collect(),
        };
        Self { names }
    }

    /// The id of a label.
    pub fn id(&self, label: &str) -> Option<usize> {
        self.names.iter().position(|n| n == label)
    }

    /// The name of an id.
    pub fn name(&self, id: usize) -> Option<&str> {
        self.names.get(id).map(String::as_str)
    }

    /// The number of classes.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the map has no class.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// `{"id2label": {"0": name, …}, "label2id": {name: 0, …}}` (the format of a Hugging Face
    /// `config.json`), pretty-printed, with a final newline.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        let ids: Vec<usize> = (0..self.names.len()).collect();
        let id2label = OrderedMap(
            self.names
                .iter()
                .enumerate()
                .map(|(i, n)| (i.to_string(), n))
                .collect(),
        );
        let label2id = OrderedMap(
            self.names
                .iter()
                .zip(&ids)
                .map(|(n, i)| (n.clone(), i))
                .collect(),
        );
        let json = serde_json::json!({ "id2label": id2label, "label2id": label2id });
        let mut text = serde_json::to_string_pretty(&json).expect("strings serialize");
        text.push('\n');
        text.into_bytes()
    }

    /// Write [`to_json_bytes`](Self::to_json_bytes) to `path` (usually
    /// `<dir>/`[`LABEL_MAP_FILE`]), atomically ([`peft_core::atomic::write_file`]).
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        peft_core::atomic::write_file(path, &self.to_json_bytes()).map_err(|e| DataError::Io {
            file: e.path,
            source: e.source,
        })
    }

    /// Read a map written by [`LabelMap::save`] (or any `id2label` object with ids `0..n`).
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let text = fs::read_to_string(path).map_err(|source| DataError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        let bad = |line: usize, reason: String| DataError::Malformed {
            file: path.to_path_buf(),
            line,
            reason,
        };
        let file: LabelMapFile =
            serde_json::from_str(&text).map_err(|e| bad(e.line(), e.to_string()))?;
        let n = file.id2label.len();
        let mut names = vec![None; n];
        for (id, name) in file.id2label {
            let slot = id
                .parse::<usize>()
                .ok()
                .and_then(|i| names.get_mut(i))
                .ok_or_else(|| bad(1, format!("id2label: id `{id}` is not in 0..{n}")))?;
            *slot = Some(name);
        }
        let names: Vec<String> = names
            .into_iter()
            .map(|n| n.ok_or_else(|| bad(1, "id2label: ids are not 0..n".into())))
            .collect::<Result<_, _>>()?;
        let map = Self { names };
        if let Some(label2id) = file.label2id {
            for (name, id) in label2id {
                if map.id(&name) != Some(id) {
                    return Err(bad(
                        1,
                        format!("label2id[`{name}`] = {id} disagrees with id2label"),
                    ));
                }
            }
        }
        Ok(map)
    }
}
