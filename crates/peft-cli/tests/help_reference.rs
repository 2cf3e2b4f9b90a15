//! The CLI reference cannot drift from the binary: `docs/cli.md` is every subcommand's
//! `--help` as the binary prints it (regenerate with `BURN_PEFT_UPDATE_DOCS=1 cargo test -p
//! peft-cli --test help_reference`), and every `--flag` a `burn-peft ...` line of the README or
//! of a guide in `docs/` shows exists on its subcommand.

mod common;

use std::path::PathBuf;

use common::*;

fn docs() -> PathBuf {
    fixtures().join("../../docs/cli.md")
}

fn help(args: &[&str]) -> String {
    let out = burn_peft().args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The subcommands `burn-peft --help` lists (without `help`).
fn subcommands() -> Vec<String> {
    let top = help(&[]);
    let list = top
        .split("Commands:\n")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .expect("a Commands section");
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

fn reference() -> String {
    let mut out = String::from(
        "# `burn-peft` command-line reference\n\nGenerated from the binary's `--help` (checked by \
         `crates/peft-cli/tests/help_reference.rs`; regenerate with `BURN_PEFT_UPDATE_DOCS=1 \
         cargo test -p peft-cli --test help_reference`).\n\n```text\n",
    );
    out.push_str(&help(&[]));
    out.push_str("```\n");
    for sub in subcommands() {
        out.push_str(&format!("\n## `burn-peft {sub}`\n\n```text\n"));
        out.push_str(&help(&[&sub]));
        out.push_str("```\n");
    }
    out
}

#[test]
fn docs_cli_md_is_the_binarys_help() {
    let generated = reference();
    if std::env::var_os("BURN_PEFT_UPDATE_DOCS").is_some() {
        std::fs::write(docs(), &generated).unwrap();
    }
    let committed = std::fs::read_to_string(docs()).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/cli.md differs from the binary's --help; regenerate it with \
         BURN_PEFT_UPDATE_DOCS=1 cargo test -p peft-cli --test help_reference"
    );
}

#[test]
fn readme_and_guide_flags_exist_on_their_subcommands() {
    let mut pages = vec![fixtures().join("../../README.md")];
    let guides = std::fs::read_dir(fixtures().join("../../docs")).unwrap();
    pages.extend(
        guides
            .map(|entry| entry.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "md") && !p.ends_with("cli.md")),
    );
    let text: String = pages
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let mut checked = 0;
    for line in text.lines().filter(|l| l.starts_with("burn-peft ")) {
        // Without the trailing `# comment`.
        let line = line.split(" #").next().unwrap_or(line);
        let mut words = line.split_whitespace().skip(1);
        let Some(sub) = words.next() else { continue };
        let help = help(&[sub]);
        for flag in line
            .split(|c: char| c.is_whitespace() || c == '[' || c == ']' || c == '|')
            .filter(|w| w.starts_with("--") && w.len() > 2)
        {
            let flag = flag.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "README or docs/: `{line}` shows {flag}, which `burn-peft {sub} --help` does not have"
            );
            checked += 1;
        }
    }
    assert!(
        checked > 50,
        "only {checked} flags found in the README and docs/"
    );
}
