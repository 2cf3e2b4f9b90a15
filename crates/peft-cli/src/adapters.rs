//! `--adapter [NAME=]DIR` (repeatable) and `--adapter-per-row a,b,__base__`: which adapters a
//! subcommand loads, and whether they run together on every row or one per row.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use peft_core::PeftModel;
use peft_core::nn::{BASE_ROW, ForwardContext};
use peft_models::HfModel;

use crate::UsageError;

/// One `--adapter` value: `NAME=DIR`, or a plain `DIR` (named `default`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterArg {
    /// The adapter's name in the model.
    pub name: String,
    /// Its PEFT bundle folder.
    pub dir: PathBuf,
}

/// clap value parser of `--adapter`: the folder must exist (a typo is named at once, before
/// anything loads).
pub fn parse_adapter(value: &str) -> Result<AdapterArg, String> {
    let arg = split_adapter(value)?;
    if !arg.dir.exists() {
        return Err(format!(
            "the adapter folder {} does not exist; pass a PEFT bundle folder (with \
             adapter_config.json), e.g. <output>/adapter or <output>/best",
            arg.dir.display()
        ));
    }
    if !arg.dir.is_dir() {
        return Err(format!(
            "{} is a file; pass the folder that holds adapter_config.json",
            arg.dir.display()
        ));
    }
    Ok(arg)
}

fn split_adapter(value: &str) -> Result<AdapterArg, String> {
    // `NAME=DIR` only when NAME could name an adapter: a path may hold `=` too.
    if let Some((name, dir)) = value.split_once('=')
        && !name.is_empty()
        && !name.contains(['/', '\\', '.'])
    {
        if dir.is_empty() {
            return Err(format!("`{value}`: the folder after `{name}=` is missing"));
        }
        return Ok(AdapterArg {
            name: name.to_string(),
            dir: PathBuf::from(dir),
        });
    }
    Ok(AdapterArg {
        name: "default".into(),
        dir: PathBuf::from(value),
    })
}

/// The `task_type` of the bundle in `dir` (`adapter_config.json`), when it names one.
pub fn task_type(dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    config.get("task_type")?.as_str().map(str::to_string)
}

/// The names of `--adapter-per-row`, one per row (a type of its own so clap keeps the list as
/// one value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowNames(pub Vec<String>);

/// clap value parser of `--adapter-per-row`: comma-separated names, one per row.
pub fn parse_rows(value: &str) -> Result<RowNames, String> {
    let names: Vec<String> = value.split(',').map(|s| s.trim().to_string()).collect();
    if names.iter().any(String::is_empty) {
        return Err(format!(
            "`{value}`: give one adapter name (or `{BASE_ROW}`) per row, separated by commas"
        ));
    }
    Ok(RowNames(names))
}

/// Wrap `model` with every adapter of `adapters` loaded. Without `rows`, all of them are
/// active together (merged into the weights first when `merge`); with `rows`, none is
/// active and the returned context runs row `i` with the adapter `rows[i]` names.
pub fn load(
    model: HfModel,
    adapters: &[AdapterArg],
    merge: bool,
    rows: Option<&[String]>,
    device: &Device,
) -> Result<(PeftModel<HfModel>, ForwardContext)> {
    let mut peft = PeftModel::new(model);
    for (i, a) in adapters.iter().enumerate() {
        if adapters[..i].iter().any(|b| b.name == a.name) {
            bail!(UsageError(format!(
                "--adapter: the name `{}` is used twice; name them `NAME=DIR`",
                a.name
            )));
        }
        peft.load_adapter(&a.dir, &a.name)
            .with_context(|| format!("loading adapter {} from {}", a.name, a.dir.display()))?;
    }
    let names: Vec<&str> = adapters.iter().map(|a| a.name.as_str()).collect();
    let Some(rows) = rows else {
        if names.len() > 1 {
            peft.set_adapters(&names)?;
        }
        if merge && !names.is_empty() {
            peft.merge().context("merging the adapters")?;
        }
        return Ok((peft, ForwardContext::default()));
    };
    if merge {
        bail!(UsageError(
            "--merge and --adapter-per-row exclude each other: a mixed batch needs the adapters \
             unmerged"
                .into()
        ));
    }
    if let Some(unknown) = rows
        .iter()
        .find(|r| r.as_str() != BASE_ROW && !names.contains(&r.as_str()))
    {
        bail!(UsageError(format!(
            "--adapter-per-row: no adapter `{unknown}`; loaded: {} (or `{BASE_ROW}` for none)",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )));
    }
    let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
    let ctx = peft.adapter_rows(&rows, device)?;
    Ok((peft, ctx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_values() {
        assert_eq!(
            split_adapter("sql=out/sql").unwrap(),
            AdapterArg {
                name: "sql".into(),
                dir: "out/sql".into()
            }
        );
        assert_eq!(split_adapter("out/best").unwrap().name, "default");
        // A path holding `=` stays a path.
        assert_eq!(
            split_adapter("runs/a=b/best").unwrap().dir,
            PathBuf::from("runs/a=b/best")
        );
        assert!(split_adapter("sql=").is_err());
        // A folder that is not there is named before anything loads.
        let err = parse_adapter("no/such/adapter").unwrap_err();
        assert!(err.contains("no/such/adapter does not exist"), "{err}");
        assert_eq!(
            parse_rows("a, __base__,b").unwrap().0,
            ["a", "__base__", "b"]
        );
        assert!(parse_rows("a,,b").is_err());
    }
}
