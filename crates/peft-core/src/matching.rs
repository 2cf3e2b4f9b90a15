//! Which modules an adapter attaches to: PEFT's matching rules, reproduced exactly, plus an error
//! for list entries that match nothing (PEFT ignores those silently).

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};

/// `target_modules` / `exclude_modules`: a list of names (exact or dot-bounded suffix) or one
/// regular expression that must match the whole module path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Entries matched as exact path or `.`-bounded suffix.
    List(Vec<String>),
    /// A regex matched against the whole path (`"all-linear"` is special).
    Regex(String),
}

impl TargetModules {
    /// A list target from names.
    pub fn list<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        TargetModules::List(names.into_iter().map(Into::into).collect())
    }
}

impl<S: Into<String>, const N: usize> From<[S; N]> for TargetModules {
    fn from(value: [S; N]) -> Self {
        TargetModules::list(value)
    }
}

impl From<&str> for TargetModules {
    fn from(value: &str) -> Self {
        TargetModules::Regex(value.to_string())
    }
}

/// `layers_to_transform`: one layer index or several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerIndices {
    /// A single layer.
    One(usize),
    /// Several layers.
    Many(Vec<usize>),
}

impl LayerIndices {
    fn contains(&self, index: usize) -> bool {
        match self {
            LayerIndices::One(i) => *i == index,
            LayerIndices::Many(v) => v.contains(&index),
        }
    }

    /// PEFT treats an empty list as "no layer filter".
    fn is_filter(&self) -> bool {
        !matches!(self, LayerIndices::Many(v) if v.is_empty())
    }
}

/// `layers_pattern`: the name of the layer container (`layers`, `h`), or several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersPattern {
    /// One container name.
    One(String),
    /// Several container names (the first that yields an index wins).
    Many(Vec<String>),
}

/// The targeting part of a method config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetSpec {
    /// `target_modules`.
    pub target_modules: Option<TargetModules>,
    /// `exclude_modules`.
    pub exclude_modules: Option<TargetModules>,
    /// `layers_to_transform`.
    pub layers_to_transform: Option<LayerIndices>,
    /// `layers_pattern`.
    pub layers_pattern: Option<LayersPattern>,
}

/// Compile `pattern` so it must match the whole string (Python's `re.fullmatch`).
fn full_match_regex(key: &str, pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        PeftError::invalid_config(
            key,
            format!("`{pattern}` is not a valid regular expression: {e}"),
        )
    })
}

fn list_matches(names: &[String], key: &str) -> bool {
    names.iter().any(|name| {
        key == name
            || (key.len() > name.len()
                && key.ends_with(name.as_str())
                && key.as_bytes()[key.len() - name.len() - 1] == b'.')
    })
}

enum Matcher {
    None,
    List(Vec<String>),
    Regex(Regex),
}

impl Matcher {
    fn new(key: &str, spec: &Option<TargetModules>) -> Result<Self> {
        Ok(match spec {
            None => Matcher::None,
            Some(TargetModules::List(v)) => Matcher::List(v.clone()),
            Some(TargetModules::Regex(p)) => Matcher::Regex(full_match_regex(key, p)?),
        })
    }

    fn matches(&self, key: &str) -> bool {
        match self {
            Matcher::None => false,
            Matcher::List(v) => list_matches(v, key),
            Matcher::Regex(r) => r.is_match(key),
        }
    }
}

/// A [`TargetSpec`] compiled for repeated matching.
pub struct TargetMatcher {
    targets: Matcher,
    exclude: Matcher,
    layers: Option<LayerIndices>,
    layer_regexes: Vec<Regex>,
}

impl TargetMatcher {
    /// Compile `spec`. `all_linear` is the target list that `"all-linear"` stands for in this
    /// model (see [`all_linear_names`]).
    pub fn new(spec: &TargetSpec, all_linear: &[String]) -> Result<Self> {
        let targets = match &spec.target_modules {
            Some(TargetModules::Regex(p)) if p == "all-linear" => {
                Matcher::List(all_linear.to_vec())
            }
            other => Matcher::new("target_modules", other)?,
        };
        if matches!(spec.target_modules, Some(TargetModules::Regex(ref p)) if p != "all-linear")
            && spec.layers_to_transform.is_some()
        {
            return Err(PeftError::invalid_config(
                "layers_to_transform",
                "cannot be used when target_modules is a regular expression (as in PEFT); use a list of names",
            ));
        }
        if spec.layers_pattern.is_some() && spec.layers_to_transform.is_none() {
            return Err(PeftError::invalid_config(
                "layers_pattern",
                "is only used together with layers_to_transform (as in PEFT); set both or neither",
            ));
        }
        let layer_regexes = match &spec.layers_pattern {
            None => vec![Regex::new(r"^.*?\.[^.]*\.(\d+)\.").expect("static regex")],
            Some(p) => {
                let patterns = match p {
                    LayersPattern::One(s) => vec![s.clone()],
                    LayersPattern::Many(v) => v.clone(),
                };
                patterns
                    .iter()
                    .map(|p| {
                        Regex::new(&format!(r"^(?:|.*?\.){p}\.(\d+)\.")).map_err(|e| {
                            PeftError::invalid_config(
                                "layers_pattern",
                                format!("`{p}` is not a valid regular expression: {e}"),
                            )
                        })
                    })
                    .collect::<Result<_>>()?
            }
        };
        Ok(Self {
            targets,
            exclude: Matcher::new("exclude_modules", &spec.exclude_modules)?,
            layers: spec.layers_to_transform.clone(),
            layer_regexes,
        })
    }

    /// Whether `exclude_modules` rules `key` out.
    pub fn is_excluded(&self, key: &str) -> bool {
        self.exclude.matches(key)
    }

    /// Whether `target_modules` (before exclusion and layer selection) names `key`.
    pub fn names(&self, key: &str) -> bool {
        self.targets.matches(key)
    }

    /// The layer index of `key` as PEFT reads it (`None` when the key has none).
    pub fn layer_index(&self, key: &str) -> Option<usize> {
        self.layer_regexes
            .iter()
            .find_map(|r| r.captures(key))
            .and_then(|c| c[1].parse().ok())
    }

    /// PEFT's full decision for one module key: not excluded, named by the targets and, when
    /// `layers_to_transform` is set, in one of those layers. As in PEFT, a list entry equal to
    /// the whole key matches before the layer filter is applied.
    pub fn is_target(&self, key: &str) -> bool {
        if self.is_excluded(key) || !self.names(key) {
            return false;
        }
        if let Matcher::List(entries) = &self.targets
            && entries.iter().any(|e| e == key)
        {
            return true;
        }
        match &self.layers {
            Some(layers) if layers.is_filter() => {
                self.layer_index(key).is_some_and(|i| layers.contains(i))
            }
            _ => true,
        }
    }
}

/// What `"all-linear"` stands for: the full path of every linear site except `excluded` (the
/// output embeddings, and the classification head for `SEQ_CLS`), as PEFT's
/// `_maybe_include_all_linear_layers` sets `target_modules` to the set of module names.
///
/// ```
/// use peft_core::matching::all_linear_names;
/// let paths = ["model.layers.0.q_proj".to_string(), "lm_head".to_string()];
/// assert_eq!(all_linear_names(&paths, &["lm_head".into()]), ["model.layers.0.q_proj"]);
/// ```
pub fn all_linear_names(linear_paths: &[String], excluded: &[String]) -> Vec<String> {
    linear_paths
        .iter()
        .filter(|p| !excluded.contains(p))
        .cloned()
        .collect()
}

/// Select the targets of `spec` among `paths` (in order), and error on every list entry of
/// `target_modules` that matches no path, naming the closest ones.
///
/// `skip` removes paths before matching (PEFT never adapts `modules_to_save` modules).
pub fn select_targets(
    spec: &TargetSpec,
    paths: &[String],
    all_linear: &[String],
    skip: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>> {
    let matcher = TargetMatcher::new(spec, all_linear)?;
    match &spec.target_modules {
        Some(TargetModules::List(entries)) => {
            for entry in entries {
                if !paths
                    .iter()
                    .any(|p| list_matches(std::slice::from_ref(entry), p))
                {
                    return Err(PeftError::TargetNotFound {
                        field: "target_modules".into(),
                        entry: entry.clone(),
                        kind: "adaptable layer".into(),
                        closest: closest_names(entry, paths, 3),
                        names: last_names(paths),
                    });
                }
            }
        }
        Some(TargetModules::Regex(p))
            if p != "all-linear" && !paths.iter().any(|k| matcher.names(k)) =>
        {
            return Err(PeftError::TargetNotFound {
                field: "target_modules".into(),
                entry: p.clone(),
                kind: "adaptable layer".into(),
                closest: closest_names(p, paths, 3),
                names: last_names(paths),
            });
        }
        _ => {}
    }
    let selected: Vec<String> = paths
        .iter()
        .filter(|p| !skip(p) && matcher.is_target(p))
        .cloned()
        .collect();
    if selected.is_empty() && spec.target_modules.is_some() {
        return Err(PeftError::invalid_config(
            "target_modules",
            "every matching module was removed by exclude_modules, layers_to_transform or modules_to_save; nothing would be adapted",
        ));
    }
    Ok(selected)
}

/// PEFT's `rank_pattern` / `alpha_pattern` lookup: the first key (in order) for which
/// `(.*\.)?(key)$` matches the module path from its start wins.
pub fn pattern_lookup<'a, V>(
    field: &str,
    patterns: &'a [(String, V)],
    module_path: &str,
) -> Result<Option<&'a V>> {
    for (key, value) in patterns {
        if key == module_path {
            return Ok(Some(value));
        }
        let regex = Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
            PeftError::invalid_config(
                format!("{field}.{key}"),
                format!("not a valid regular expression: {e}"),
            )
        })?;
        if regex.is_match(module_path) {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

/// Up to `n` names from `paths` closest to `entry`: compares `entry` with the path's tail of the
/// same number of segments, by edit distance.
pub fn closest_names(entry: &str, paths: &[String], n: usize) -> Vec<String> {
    let segments = entry.split('.').count();
    let mut tails: Vec<String> = paths
        .iter()
        .map(|p| {
            let parts: Vec<&str> = p.split('.').collect();
            parts[parts.len().saturating_sub(segments)..].join(".")
        })
        .collect();
    tails.sort();
    tails.dedup();
    let mut scored: Vec<(usize, String)> = tails
        .into_iter()
        .map(|t| (edit_distance(entry, &t), t))
        .filter(|(d, t)| *d <= (entry.len().max(t.len()) / 2).max(2))
        .collect();
    scored.sort();
    scored.into_iter().take(n).map(|(_, t)| t).collect()
}

/// The distinct last path segments of `paths` (`query`, `value`, `dense`, ...), in order of
/// first appearance: the short names a `target_modules` entry can use.
pub fn last_names(paths: &[String]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for p in paths {
        let last = p.rsplit('.').next().unwrap_or(p);
        if !names.iter().any(|n| n == last) {
            names.push(last.to_string());
        }
    }
    names
}

/// Levenshtein distance on characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Which modules get a `modules_to_save` copy: PEFT's rule, a plain string suffix of the path
/// (no dot boundary).
pub fn gets_saved_copy(names: &[String], path: &str) -> bool {
    names.iter().any(|n| path.ends_with(n.as_str()))
}

/// Which modules `modules_to_save` keeps away from adapters: PEFT's rule
/// `(^|.*\.){name}($|\..*)`, the module itself and everything under it.
pub fn shielded_by_modules_to_save(names: &[String], path: &str) -> Result<bool> {
    for name in names {
        let regex = Regex::new(&format!(r"^(?:.*\.)?(?:{name})(?:\..*)?$")).map_err(|e| {
            PeftError::invalid_config(
                "modules_to_save",
                format!("`{name}` is not a valid pattern: {e}"),
            )
        })?;
        if regex.is_match(path) {
            return Ok(true);
        }
    }
    Ok(false)
}
