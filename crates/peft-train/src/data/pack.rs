//! Packing (TRL's `packing=True`, best-fit decreasing): short causal-LM examples placed one
//! after another in rows of at most `max_length` tokens, so a batch spends its compute on
//! tokens rather than padding. The forward keeps the sequences apart (no attention across them,
//! positions restarting: `peft_core::nn::PackedRows`), so packing changes the speed, not what a
//! token sees.

use super::{Example, IGNORE_INDEX};

/// Pack `examples` (causal LM: each has `labels`) into rows of at most `max_length` tokens by
/// best-fit decreasing, TRL's default `bfd` strategy: longest first, each into the fullest row
/// it still fits, a new row when none has room. Deterministic (ties keep file order); an example
/// longer than `max_length` gets a row of its own, untruncated.
///
/// The first label of every sequence after the first in a row becomes [`IGNORE_INDEX`]: the
/// loss shifts labels left, so that label would be predicted from the previous sequence's last
/// token (transformers' `DataCollatorWithFlattening` does the same with its `separator_id`).
///
/// ```
/// use peft_train::data::{Example, pack};
///
/// let lm = |ids: Vec<i64>| Example {
///     labels: Some(ids.clone()),
///     token_type_ids: vec![0; ids.len()],
///     input_ids: ids,
///     label: None,
///     line: 0,
///     segments: Vec::new(),
///     image: None,
/// };
/// let rows = pack(&[lm(vec![1, 2, 3]), lm(vec![4, 5]), lm(vec![6, 7, 8, 9])], 6);
/// assert_eq!(rows.len(), 2);
/// assert_eq!(rows[0].input_ids, [6, 7, 8, 9, 4, 5]);
/// assert_eq!(rows[0].segments, [4, 2]);
/// assert_eq!(rows[0].labels.as_deref(), Some(&[6, 7, 8, 9, -100, 5][..]));
/// assert_eq!(rows[1].input_ids, [1, 2, 3]);
/// ```
pub fn pack(examples: &[Example], max_length: usize) -> Vec<Example> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].input_ids.len()));
    // Each row: the examples in it and the room left.
    let mut rows: Vec<(Vec<usize>, usize)> = Vec::new();
    for i in order {
        let n = examples[i].input_ids.len();
        let best = rows
            .iter_mut()
            .filter(|(_, room)| *room >= n)
            .min_by_key(|(_, room)| *room);
        match best {
            Some((members, room)) => {
                members.push(i);
                *room -= n;
            }
            None => rows.push((vec![i], max_length.saturating_sub(n))),
        }
    }
    rows.into_iter()
        .map(|(members, _)| join(members.iter().map(|&i| &examples[i])))
        .collect()
}

fn join<'a>(parts: impl Iterator<Item = &'a Example>) -> Example {
    let mut row = Example {
        input_ids: Vec::new(),
        token_type_ids: Vec::new(),
        label: None,
        labels: Some(Vec::new()),
        line: 0,
        segments: Vec::new(),
        image: None,
    };
    for (k, e) in parts.enumerate() {
        if k == 0 {
            row.line = e.line;
        }
        let n = e.input_ids.len();
        row.input_ids.extend(&e.input_ids);
        row.token_type_ids.extend(std::iter::repeat_n(0, n));
        let mut labels = e.labels.clone().unwrap_or_else(|| vec![IGNORE_INDEX; n]);
        labels.resize(n, IGNORE_INDEX);
        if k > 0 && n > 0 {
            labels[0] = IGNORE_INDEX;
        }
        if let Some(all) = row.labels.as_mut() {
            all.extend(labels);
        }
        row.segments.push(n);
    }
    row
}
