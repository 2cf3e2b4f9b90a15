//! Evaluation metrics: accuracy, macro F1 (as scikit-learn computes it), perplexity, and a
//! running mean for losses.

use serde::{Deserialize, Serialize};

/// The fraction of `pred` equal to `gold`; 0 for empty inputs.
///
/// # Panics
///
/// If the slices differ in length.
pub fn accuracy(pred: &[usize], gold: &[usize]) -> f64 {
    assert_eq!(
        pred.len(),
        gold.len(),
        "accuracy: pred and gold differ in length"
    );
    if pred.is_empty() {
        return 0.0;
    }
    let right = pred.iter().zip(gold).filter(|(p, g)| p == g).count();
    right as f64 / pred.len() as f64
}

/// Macro-averaged F1, exactly as scikit-learn's
/// `f1_score(gold, pred, average="macro", zero_division=0)` with `labels=None`: the mean, over
/// the classes present in `gold` or in `pred` (not over all `num_classes`), of each class's
/// `F1 = 2·TP / (2·TP + FP + FN)`. A class that is predicted but never true, or true but never
/// predicted, counts with F1 = 0; a class in neither is left out of the mean. 0 for empty
/// inputs.
///
/// `num_classes` sizes the count tables; ids at or above it are still counted.
///
/// # Panics
///
/// If the slices differ in length.
pub fn macro_f1(pred: &[usize], gold: &[usize], num_classes: usize) -> f64 {
    assert_eq!(
        pred.len(),
        gold.len(),
        "macro_f1: pred and gold differ in length"
    );
    let n = pred
        .iter()
        .chain(gold)
        .map(|&c| c + 1)
        .max()
        .unwrap_or(0)
        .max(num_classes);
    // Per class: true positives, predicted count, true count.
    let mut tp = vec![0u64; n];
    let mut predicted = vec![0u64; n];
    let mut actual = vec![0u64; n];
    for (&p, &g) in pred.iter().zip(gold) {
        predicted[p] += 1;
        actual[g] += 1;
        if p == g {
            tp[p] += 1;
        }
    }
    let mut sum = 0.0;
    let mut classes = 0usize;
    for c in 0..n {
        if predicted[c] == 0 && actual[c] == 0 {
            continue;
        }
        classes += 1;
        // 2·TP + FP + FN = predicted + actual, which is > 0 here.
        sum += 2.0 * tp[c] as f64 / (predicted[c] + actual[c]) as f64;
    }
    if classes == 0 {
        0.0
    } else {
        sum / classes as f64
    }
}

/// The perplexity of a mean token cross-entropy (natural log): `exp(mean_loss)`.
pub fn perplexity(mean_loss: f64) -> f64 {
    mean_loss.exp()
}

/// A running mean (of losses, say), summed in `f64`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Mean {
    /// The sum of the values (weighted by their counts).
    pub sum: f64,
    /// The number of values.
    pub count: u64,
}

impl Mean {
    /// An empty mean.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one value.
    pub fn add(&mut self, value: f64) {
        self.sum += value;
        self.count += 1;
    }

    /// Add the mean `value` of `count` values (a batch mean over `count` tokens, say).
    pub fn add_weighted(&mut self, value: f64, count: u64) {
        self.sum += value * count as f64;
        self.count += count;
    }

    /// The mean so far; `None` before any value.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// Whether no value was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Forget every value.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn accuracy_counts_matches() {
        assert_eq!(accuracy(&[0, 1, 2, 1], &[0, 1, 1, 1]), 0.75);
        assert_eq!(accuracy(&[], &[]), 0.0);
        assert_eq!(accuracy(&[3], &[3]), 1.0);
    }

    #[test]
    fn macro_f1_by_hand() {
        // gold [0,1,2,2,3,0,1,4], pred [0,2,2,2,3,1,1,0]:
        // F1 per class: 0 -> 2/4, 1 -> 2/4, 2 -> 4/5, 3 -> 1, 4 -> 0; mean = 2.8 / 5.
        let gold = [0, 1, 2, 2, 3, 0, 1, 4];
        let pred = [0, 2, 2, 2, 3, 1, 1, 0];
        assert!(close(macro_f1(&pred, &gold, 5), 0.56));
        // scikit-learn 1.9.1: f1_score(gold, pred, average="macro", zero_division=0)
        // = 0.5599999999999999.
        assert!(close(macro_f1(&pred, &gold, 5), 0.5599999999999999));
        // Perfect predictions.
        assert_eq!(macro_f1(&[1, 0, 1], &[1, 0, 1], 2), 1.0);
        assert_eq!(macro_f1(&[], &[], 3), 0.0);
    }

    #[test]
    fn macro_f1_matches_sklearn_label_set() {
        // Classes in neither gold nor pred are left out: class 1 of 4 is absent here.
        // scikit-learn 1.9.1: f1_score([0,0,2,2], [0,0,2,3], average="macro",
        // zero_division=0) = 0.5555555555555555 (classes 0, 2, 3: 1, 2/3, 0).
        assert!(close(
            macro_f1(&[0, 0, 2, 3], &[0, 0, 2, 2], 4),
            0.5555555555555555
        ));
        // A never-predicted class counts as 0:
        // f1_score([0,0,1,1], [0,0,0,0], average="macro", zero_division=0) = 0.3333333333333333.
        assert!(close(
            macro_f1(&[0, 0, 0, 0], &[0, 0, 1, 1], 2),
            0.3333333333333333
        ));
        // f1_score(y_true=[0,1,1,2,0,1], y_pred=[0,0,1,1,2,1], average="macro",
        // zero_division=0) = 0.38888888888888884.
        assert!(close(
            macro_f1(&[0, 0, 1, 1, 2, 1], &[0, 1, 1, 2, 0, 1], 3),
            0.38888888888888884
        ));
    }

    #[test]
    fn perplexity_is_exp() {
        assert_eq!(perplexity(0.0), 1.0);
        assert!(close(perplexity(2.0f64.ln()), 2.0));
    }

    #[test]
    fn mean_accumulates() {
        let mut m = Mean::new();
        assert_eq!(m.mean(), None);
        assert!(m.is_empty());
        m.add(1.0);
        m.add(2.0);
        assert_eq!(m.mean(), Some(1.5));
        m.add_weighted(4.0, 2);
        assert_eq!(m.mean(), Some(11.0 / 4.0));
        assert_eq!(m.count, 4);
        m.reset();
        assert_eq!(m, Mean::default());
    }
}
