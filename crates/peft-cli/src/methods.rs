//! The one place where the CLI links its method crates.
//!
//! A method registers its `peft_type` with `peft-core` (through `typetag`) when its crate is
//! linked into the program; a crate that nothing names is not linked. Every subcommand reads
//! and writes adapters through `peft-core` alone, so naming the crates here makes every method
//! available everywhere. To ship another method: add its crate to `Cargo.toml` and a line here.

use peft_ia3 as _;
use peft_lora as _;
use peft_prefix as _;

/// The `peft_type`s this build knows, sorted (`IA3`, `LORA`, `PREFIX_TUNING`).
pub fn registered() -> Vec<String> {
    peft_core::bundle::registered_methods()
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_shipped_method_is_registered() {
        assert_eq!(super::registered(), ["IA3", "LORA", "PREFIX_TUNING"]);
    }
}
