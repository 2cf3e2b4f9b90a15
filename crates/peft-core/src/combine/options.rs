//! The options of a combination: PEFT's `combination_type`, `density`, `majority_sign_method`
//! and SVD keyword arguments, plus the seed of the DARE masks.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};

/// How adapters are combined: PEFT's `combination_type`, with PEFT's names.
///
/// `linear`, `ties`, `dare_linear`, `dare_ties` and `magnitude_prune` combine the low-rank
/// factors themselves and need equal ranks; `cat` concatenates them (exact, rank = sum of
/// ranks); `svd` and the `*_svd` variants combine the full weight deltas and factor the result
/// back to rank `svd_rank` with a truncated SVD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CombinationType {
    /// Weighted sum of the factors (`sqrt(|w·s|)` on each side): an approximation.
    Linear,
    /// Concatenation of the factors: exactly the weighted sum of the deltas.
    Cat,
    /// Weighted sum of the deltas, refactored by truncated SVD (PEFT's default).
    #[default]
    Svd,
    /// TIES on the factors: magnitude pruning, sign election, disjoint mean.
    Ties,
    /// TIES on the deltas, then SVD.
    TiesSvd,
    /// DARE on the factors: random pruning with rescaling by `1/density`, then a weighted sum.
    DareLinear,
    /// DARE pruning, then TIES sign election and disjoint mean, on the factors.
    DareTies,
    /// DARE on the deltas, then SVD.
    DareLinearSvd,
    /// DARE + TIES on the deltas, then SVD.
    DareTiesSvd,
    /// Magnitude pruning of the factors, then a weighted sum.
    MagnitudePrune,
    /// Magnitude pruning of the deltas, weighted sum, then SVD.
    MagnitudePruneSvd,
}

impl CombinationType {
    /// Every type, in PEFT's documentation order.
    pub const ALL: [CombinationType; 11] = [
        CombinationType::Svd,
        CombinationType::Linear,
        CombinationType::Cat,
        CombinationType::Ties,
        CombinationType::TiesSvd,
        CombinationType::DareTies,
        CombinationType::DareLinear,
        CombinationType::DareTiesSvd,
        CombinationType::DareLinearSvd,
        CombinationType::MagnitudePrune,
        CombinationType::MagnitudePruneSvd,
    ];

    /// PEFT's name (`ties_svd`, ...).
    pub fn name(self) -> &'static str {
        match self {
            CombinationType::Linear => "linear",
            CombinationType::Cat => "cat",
            CombinationType::Svd => "svd",
            CombinationType::Ties => "ties",
            CombinationType::TiesSvd => "ties_svd",
            CombinationType::DareLinear => "dare_linear",
            CombinationType::DareTies => "dare_ties",
            CombinationType::DareLinearSvd => "dare_linear_svd",
            CombinationType::DareTiesSvd => "dare_ties_svd",
            CombinationType::MagnitudePrune => "magnitude_prune",
            CombinationType::MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }

    /// Whether the result is refactored by SVD (`svd` and `*_svd`).
    pub fn uses_svd(self) -> bool {
        self.name().ends_with("svd")
    }

    /// Whether `density` is required (every pruning type).
    pub fn needs_density(self) -> bool {
        !matches!(
            self,
            CombinationType::Linear | CombinationType::Cat | CombinationType::Svd
        )
    }

    /// Whether the type elects a majority sign (TIES variants), so `majority_sign_method` applies.
    pub fn elects_sign(self) -> bool {
        matches!(
            self,
            CombinationType::Ties
                | CombinationType::TiesSvd
                | CombinationType::DareTies
                | CombinationType::DareTiesSvd
        )
    }

    /// Whether the type draws random masks (DARE), so `seed` applies.
    pub fn is_random(self) -> bool {
        self.name().starts_with("dare")
    }

    /// Whether the type needs all adapters to have the same rank (it combines factors
    /// element-wise): `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`.
    pub fn needs_equal_ranks(self) -> bool {
        !self.uses_svd() && self != CombinationType::Cat
    }
}

impl fmt::Display for CombinationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CombinationType {
    type Err = PeftError;

    /// Parse PEFT's name.
    ///
    /// ```
    /// use peft_core::CombinationType;
    /// assert_eq!("ties_svd".parse::<CombinationType>().unwrap(), CombinationType::TiesSvd);
    /// assert!("tie".parse::<CombinationType>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        CombinationType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                PeftError::invalid_config(
                    "combination_type",
                    format!(
                        "unknown `{s}`; expected one of: {}",
                        CombinationType::ALL.map(|t| t.name()).join(", ")
                    ),
                )
            })
    }
}

/// How TIES elects the sign of each entry: PEFT's `majority_sign_method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MajoritySignMethod {
    /// The sign of the sum of the (pruned) values.
    #[default]
    Total,
    /// The sign held by most (pruned) values.
    Frequency,
}

impl MajoritySignMethod {
    /// PEFT's name.
    pub fn name(self) -> &'static str {
        match self {
            MajoritySignMethod::Total => "total",
            MajoritySignMethod::Frequency => "frequency",
        }
    }
}

impl FromStr for MajoritySignMethod {
    type Err = PeftError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "total" => Ok(MajoritySignMethod::Total),
            "frequency" => Ok(MajoritySignMethod::Frequency),
            other => Err(PeftError::invalid_config(
                "majority_sign_method",
                format!("unknown `{other}`; expected `total` or `frequency`"),
            )),
        }
    }
}

/// cuSOLVER routines `torch.linalg.svd` accepts as `driver` (PEFT's `svd_driver`).
pub const SVD_DRIVERS: [&str; 3] = ["gesvd", "gesvdj", "gesvda"];

/// The options of [`PeftModel::add_weighted_adapter`]: PEFT's keyword arguments plus a seed.
///
/// ```
/// use peft_core::{CombinationType, CombineOptions};
/// let options = CombineOptions {
///     combination_type: CombinationType::Ties,
///     density: Some(0.5),
///     ..Default::default()
/// };
/// options.validate().unwrap();
/// assert!(CombineOptions { density: Some(1.5), ..options }.validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CombineOptions {
    /// The combination rule (PEFT's default: `svd`).
    pub combination_type: CombinationType,
    /// Fraction of values kept by pruning, in `[0, 1]`; required by every pruning type
    /// (`ties*`, `dare*`, `magnitude_prune*`), ignored by `linear`, `cat` and `svd`.
    pub density: Option<f64>,
    /// Sign election for the TIES variants.
    pub majority_sign_method: MajoritySignMethod,
    /// Rank of the result of the SVD types; by default the largest input rank.
    pub svd_rank: Option<usize>,
    /// Quantile in `[0, 1]` at which the SVD factors are clamped (`None`: no clamping).
    ///
    /// The quantile is taken over the signed factor values, so the result depends on the sign
    /// the SVD solver gives each singular vector pair, which is solver-specific (ours come from
    /// burn-linalg, PEFT's from torch's LAPACK or cuSOLVER). The clamping itself is PEFT's
    /// (checked against it with the signs aligned).
    pub svd_clamp: Option<f64>,
    /// PEFT's `svd_full_matrices`. Only the leading `svd_rank` singular vectors are used, so the
    /// result does not depend on it (PEFT's `True` breaks when `svd_rank` exceeds a module's
    /// `min(in, out)`; here the factors are zero-padded to `svd_rank` in that case).
    pub svd_full_matrices: bool,
    /// PEFT's `svd_driver`: a cuSOLVER routine name (`gesvd`, `gesvdj`, `gesvda`), which only
    /// picks how the same decomposition is computed on CUDA; checked, then the host solver runs.
    pub svd_driver: Option<String>,
    /// Seed of the DARE masks: the same seed gives the same adapter (PyTorch's RNG stream cannot
    /// be reproduced, so the masks differ from PEFT's, not their distribution).
    pub seed: u64,
}

impl Default for CombineOptions {
    fn default() -> Self {
        Self {
            combination_type: CombinationType::default(),
            density: None,
            majority_sign_method: MajoritySignMethod::default(),
            svd_rank: None,
            svd_clamp: None,
            svd_full_matrices: true,
            svd_driver: None,
            seed: 0,
        }
    }
}

impl CombineOptions {
    /// Options for `combination_type` with every other field at its default.
    pub fn new(combination_type: CombinationType) -> Self {
        Self {
            combination_type,
            ..Default::default()
        }
    }

    /// Check the values, naming the option at fault and what to pass instead.
    pub fn validate(&self) -> Result<()> {
        let kind = self.combination_type;
        match self.density {
            None if kind.needs_density() => {
                return Err(PeftError::invalid_config(
                    "density",
                    format!(
                        "combination_type `{kind}` prunes values and needs a density in [0, 1] \
                         (the fraction of values kept, e.g. 0.5)"
                    ),
                ));
            }
            Some(d) if !(0.0..=1.0).contains(&d) => {
                return Err(PeftError::invalid_config(
                    "density",
                    format!("must be in [0, 1] (the fraction of values kept), found {d}"),
                ));
            }
            // PEFT divides by the density after random pruning: 0 would give NaN everywhere.
            Some(d) if d == 0.0 && kind.is_random() => {
                return Err(PeftError::invalid_config(
                    "density",
                    format!(
                        "combination_type `{kind}` rescales the kept values by 1/density, so the \
                         density must be above 0"
                    ),
                ));
            }
            _ => {}
        }
        if self.svd_rank == Some(0) {
            return Err(PeftError::invalid_config(
                "svd_rank",
                "must be at least 1 (or unset for the largest input rank)",
            ));
        }
        if let Some(q) = self.svd_clamp
            && !(0.0..=1.0).contains(&q)
        {
            return Err(PeftError::invalid_config(
                "svd_clamp",
                format!("is a quantile and must be in [0, 1], found {q}"),
            ));
        }
        if let Some(driver) = &self.svd_driver
            && !SVD_DRIVERS.contains(&driver.as_str())
        {
            return Err(PeftError::invalid_config(
                "svd_driver",
                format!(
                    "unknown `{driver}`; expected one of {} or none",
                    SVD_DRIVERS.join(", ")
                ),
            ));
        }
        Ok(())
    }
}
