//! [`UnsupportedOptions`]: the PEFT options a method config carries without implementing them,
//! in one place instead of a public field each.
//!
//! PEFT writes every option of a config into `adapter_config.json`, the ones nobody set
//! included (`"use_qalora": false`, `"arrow_config": null`, ...). A method keeps them so a file
//! round-trips unchanged and so a file that *does* set one is refused by name rather than loaded
//! and computed without it. Each method lists its options once, in an [`UnsupportedTable`];
//! [`UnsupportedOptions`] holds their raw JSON values, writes them back under the same keys
//! (PEFT's default where a config never set one) and [`check`](UnsupportedOptions::check)s them.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::error::{PeftError, Result};

/// What a method does with an option it does not implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionPolicy {
    /// The option changes the math: any value but PEFT's default (or `null`, or `false`) is
    /// refused, since computing without it would silently give other numbers.
    Refused,
    /// The option has no effect here (it is read only together with another option that is
    /// refused itself, such as `qalora_group_size` with `use_qalora`): kept for round trips,
    /// never refused.
    Inert,
}

/// One PEFT option a method carries without implementing it.
#[derive(Debug, Clone, Copy)]
pub struct UnsupportedOption {
    /// The key in `adapter_config.json`.
    pub key: &'static str,
    /// PEFT's default, as JSON text (`"null"`, `"false"`, `"{}"`, `"16"`): what is written when
    /// a config never set the option.
    pub default: &'static str,
    /// What the option does in PEFT, for the error that refuses it.
    pub effect: &'static str,
    /// Whether a value other than the default is refused.
    pub policy: OptionPolicy,
}

impl UnsupportedOption {
    /// A refused option (see [`OptionPolicy::Refused`]).
    pub const fn refused(key: &'static str, default: &'static str, effect: &'static str) -> Self {
        Self {
            key,
            default,
            effect,
            policy: OptionPolicy::Refused,
        }
    }

    /// An inert option (see [`OptionPolicy::Inert`]).
    pub const fn inert(key: &'static str, default: &'static str, effect: &'static str) -> Self {
        Self {
            key,
            default,
            effect,
            policy: OptionPolicy::Inert,
        }
    }

    /// PEFT's default as a JSON value.
    ///
    /// # Panics
    /// If [`default`](Self::default) is not JSON (a mistake in the method's table, which its
    /// tests catch through [`UnsupportedOptions::default`]).
    pub fn default_value(&self) -> Value {
        serde_json::from_str(self.default).unwrap_or_else(|e| {
            panic!(
                "the default of unsupported option `{}` is not JSON ({}): {e}",
                self.key, self.default
            )
        })
    }

    /// Whether `value` asks for the option: neither the default nor `null` / `false`, which
    /// PEFT reads as "off" (`if config.use_qalora:`, `if config.layer_replication:`).
    pub fn is_set(&self, value: &Value) -> bool {
        !matches!(value, Value::Null | Value::Bool(false)) && *value != self.default_value()
    }
}

/// The unsupported options of one method, as a type, so that the config's (de)serializer knows
/// which keys are its own.
///
/// ```
/// use peft_core::unsupported::{UnsupportedOption, UnsupportedTable};
///
/// struct MyMethodOptions;
/// impl UnsupportedTable for MyMethodOptions {
///     const METHOD: &'static str = "My method";
///     const OPTIONS: &'static [UnsupportedOption] = &[
///         UnsupportedOption::refused("use_fancy_init", "false", "a data-driven initialization"),
///     ];
/// }
/// ```
pub trait UnsupportedTable {
    /// The method's name, for messages (`"LoRA"`).
    const METHOD: &'static str;
    /// The options, each key once.
    const OPTIONS: &'static [UnsupportedOption];
}

/// The raw JSON values of a method's unsupported PEFT options (its [`UnsupportedTable`]).
///
/// Embedded in a method config with `#[serde(flatten)]`: it takes its table's keys from the
/// top level of `adapter_config.json` (any JSON value; other keys are left to the config) and
/// writes every one of them back, PEFT's default where the file had none, so a written config
/// has PEFT's keys and a file read and written again keeps its values. Keys sort on writing
/// ([`bundle::render_config`](crate::bundle::render_config)), so where the field sits in the
/// config does not matter.
///
/// [`check`](Self::check) refuses the first [`OptionPolicy::Refused`] option that is set, as
/// [`PeftError::Unsupported`] naming the key.
///
/// ```
/// use peft_core::PeftError;
/// use peft_core::unsupported::{UnsupportedOption, UnsupportedOptions, UnsupportedTable};
/// use serde_json::json;
///
/// struct Options;
/// impl UnsupportedTable for Options {
///     const METHOD: &'static str = "LoRA";
///     const OPTIONS: &'static [UnsupportedOption] = &[
///         UnsupportedOption::refused("use_qalora", "false", "quantization-aware LoRA"),
///         UnsupportedOption::inert("qalora_group_size", "16", "read only with use_qalora"),
///     ];
/// }
///
/// let mut options = UnsupportedOptions::<Options>::default();
/// assert_eq!(serde_json::to_value(&options).unwrap(), json!({"use_qalora": false, "qalora_group_size": 16}));
/// options.set("qalora_group_size", json!(32)).unwrap();
/// assert!(options.check().is_ok());
/// options.set("use_qalora", json!(true)).unwrap();
/// match options.check() {
///     Err(PeftError::Unsupported { key, .. }) => assert_eq!(key, "use_qalora"),
///     other => panic!("{other:?}"),
/// }
/// assert!(options.set("no_such_key", json!(1)).is_err());
/// ```
pub struct UnsupportedOptions<T: UnsupportedTable> {
    /// One value per entry of `T::OPTIONS`, same order.
    values: Vec<Value>,
    table: PhantomData<fn() -> T>,
}

impl<T: UnsupportedTable> Default for UnsupportedOptions<T> {
    /// Every option at PEFT's default.
    fn default() -> Self {
        Self {
            values: T::OPTIONS.iter().map(|o| o.default_value()).collect(),
            table: PhantomData,
        }
    }
}

impl<T: UnsupportedTable> Clone for UnsupportedOptions<T> {
    fn clone(&self) -> Self {
        Self {
            values: self.values.clone(),
            table: PhantomData,
        }
    }
}

impl<T: UnsupportedTable> PartialEq for UnsupportedOptions<T> {
    fn eq(&self, other: &Self) -> bool {
        self.values == other.values
    }
}

impl<T: UnsupportedTable> fmt::Debug for UnsupportedOptions<T> {
    /// Only the options that differ from PEFT's default: twenty `null`s say nothing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (option, value) in T::OPTIONS.iter().zip(&self.values) {
            if *value != option.default_value() {
                map.entry(&option.key, value);
            }
        }
        map.finish()
    }
}

impl<T: UnsupportedTable> UnsupportedOptions<T> {
    fn index(&self, key: &str) -> Option<usize> {
        T::OPTIONS.iter().position(|o| o.key == key)
    }

    /// The value of `key` (PEFT's default when unset); `None` for a key not in the table.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index(key).map(|i| &self.values[i])
    }

    /// Set `key` (a PEFT option the method does not implement) to `value`;
    /// [`PeftError::InvalidConfig`] for a key not in the table. Setting a refused option makes
    /// [`check`](Self::check) (and so the method's `validate`) fail.
    pub fn set(&mut self, key: &str, value: Value) -> Result<()> {
        match self.index(key) {
            Some(i) => {
                self.values[i] = value;
                Ok(())
            }
            None => Err(PeftError::invalid_config(
                key,
                format!(
                    "is not an unsupported option of {}; its unsupported options: {}",
                    T::METHOD,
                    T::OPTIONS
                        .iter()
                        .map(|o| o.key)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// Every option with its value, in the table's order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static UnsupportedOption, &Value)> {
        T::OPTIONS.iter().zip(&self.values)
    }

    /// The options that ask for something we do not implement
    /// ([`OptionPolicy::Refused`] and [set](UnsupportedOption::is_set)).
    pub fn refused(&self) -> impl Iterator<Item = (&'static UnsupportedOption, &Value)> {
        self.iter()
            .filter(|(o, v)| o.policy == OptionPolicy::Refused && o.is_set(v))
    }

    /// `Ok` when no refused option is set; else [`PeftError::Unsupported`] for the first one,
    /// naming its key, the value found and what to do.
    pub fn check(&self) -> Result<()> {
        match self.refused().next() {
            None => Ok(()),
            Some((option, value)) => Err(PeftError::unsupported(
                option.key,
                value.to_string(),
                format!(
                    "{}; {} here implements only PEFT's default, {}: leave the key out of a \
                     config of yours, and run an adapter trained with it in PEFT",
                    option.effect,
                    T::METHOD,
                    option.default
                ),
            )),
        }
    }
}

impl<T: UnsupportedTable> Serialize for UnsupportedOptions<T> {
    /// Every key of the table, PEFT's default where unset: PEFT writes them all.
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.values.len()))?;
        for (option, value) in self.iter() {
            map.serialize_entry(option.key, value)?;
        }
        map.end()
    }
}

impl<'de, T: UnsupportedTable> Deserialize<'de> for UnsupportedOptions<T> {
    /// The table's keys, any JSON value each; other keys are skipped (under
    /// `#[serde(flatten)]` they belong to the rest of the config, or are unknown keys that
    /// [`bundle::parse_config`](crate::bundle::parse_config) reports).
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Keys<T>(PhantomData<fn() -> T>);

        impl<'de, T: UnsupportedTable> Visitor<'de> for Keys<T> {
            type Value = UnsupportedOptions<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "the options of a {} config", T::METHOD)
            }

            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut options = UnsupportedOptions::<T>::default();
                while let Some(key) = map.next_key::<String>()? {
                    match options.index(&key) {
                        Some(i) => options.values[i] = map.next_value()?,
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(options)
            }
        }

        d.deserialize_map(Keys(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Table;
    impl UnsupportedTable for Table {
        const METHOD: &'static str = "TEST";
        const OPTIONS: &'static [UnsupportedOption] = &[
            UnsupportedOption::refused("lora_bias", "false", "a bias on B"),
            UnsupportedOption::refused("loftq_config", "{}", "LoftQ"),
            UnsupportedOption::refused("arrow_config", "null", "Arrow routing"),
            UnsupportedOption::inert("megatron_core", "\"megatron.core\"", "a module path"),
        ];
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct Config {
        r: usize,
        #[serde(flatten)]
        unsupported: UnsupportedOptions<Table>,
    }

    #[test]
    fn flattened_options_round_trip_and_leave_other_keys_alone() {
        let text = json!({"r": 4, "loftq_config": {}, "arrow_config": null, "other": 1});
        let config: Config = serde_json::from_value(text).unwrap();
        assert!(config.unsupported.check().is_ok());
        let written = serde_json::to_value(&config).unwrap();
        assert_eq!(
            written,
            json!({"r": 4, "lora_bias": false, "loftq_config": {}, "arrow_config": null,
                   "megatron_core": "megatron.core"})
        );
    }

    #[test]
    fn null_false_and_defaults_are_off_anything_else_is_refused_by_key() {
        for (key, value) in [
            ("lora_bias", json!(null)),
            ("loftq_config", json!(null)),
            ("arrow_config", json!(false)),
            ("megatron_core", json!("elsewhere")),
        ] {
            let mut options = UnsupportedOptions::<Table>::default();
            options.set(key, value.clone()).unwrap();
            assert!(options.check().is_ok(), "{key}: {value}");
        }
        for (key, value) in [
            ("lora_bias", json!(true)),
            ("loftq_config", json!({"loftq_bits": 4})),
            ("arrow_config", json!({"top_k": 2})),
            ("lora_bias", json!("yes")),
        ] {
            let mut options = UnsupportedOptions::<Table>::default();
            options.set(key, value.clone()).unwrap();
            let err = options.check().unwrap_err();
            match &err {
                PeftError::Unsupported { key: k, found, .. } => {
                    assert_eq!(k, key);
                    assert_eq!(*found, value.to_string());
                }
                other => panic!("{other:?}"),
            }
            assert!(err.to_string().contains("PEFT's default"), "{err}");
        }
        let mut options = UnsupportedOptions::<Table>::default();
        options.set("lora_bias", json!(true)).unwrap();
        assert_eq!(format!("{options:?}"), "{\"lora_bias\": Bool(true)}");
    }
}
