//! Learning-rate schedules with linear warmup, as `transformers.get_scheduler`.

use serde::{Deserialize, Serialize};

/// The decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Constant after warmup.
    Constant,
    /// Linear decay to 0 at the last step.
    #[default]
    Linear,
    /// Half-cosine decay to 0 at the last step.
    Cosine,
}

/// The learning rate at optimizer step `step` (0-based) of `total`, with `warmup` warmup steps.
pub fn lr_at(schedule: Schedule, base: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return base * (step as f64 + 1.0) / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        assert_eq!(lr_at(Schedule::Linear, 1.0, 0, 10, 2), 0.5);
        assert_eq!(lr_at(Schedule::Linear, 1.0, 1, 10, 2), 1.0);
        assert_eq!(lr_at(Schedule::Linear, 1.0, 2, 10, 2), 1.0);
        assert!((lr_at(Schedule::Linear, 1.0, 6, 10, 2) - 0.5).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 6, 10, 2) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(Schedule::Constant, 1.0, 9, 10, 2), 1.0);
        assert!(lr_at(Schedule::Cosine, 1.0, 10, 10, 2).abs() < 1e-12);
    }
}
