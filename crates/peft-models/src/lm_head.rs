//! A causal LM's output head as a value, apart from the hidden states that feed it: a training
//! step can then take the next-token loss over the vocabulary a few hundred tokens at a time
//! (`peft_train::loss::chunked_causal_lm_loss`) instead of holding `[tokens, vocab]` logits,
//! their log-softmax and their gradient at once.

use burn::tensor::Tensor;
use burn::tensor::activation::tanh;
use peft_core::nn::{Embedding, ForwardContext, Linear};

use crate::heads::tied_logits;

/// The head of a causal LM: its own linear layer, or the token embedding table it is tied to,
/// and Gemma's `final_logit_softcapping`.
#[derive(Debug, Clone, Copy)]
pub struct LmHead<'a> {
    /// The head's own layer (`lm_head`); `None` when tied to `embedding`.
    pub linear: Option<&'a Linear>,
    /// The token embedding table (the head's weight when tied).
    pub embedding: &'a Embedding,
    /// `cap * tanh(logits / cap)` when set.
    pub softcap: Option<f64>,
}

impl LmHead<'_> {
    /// Logits `[b, s, vocab]` of hidden states `h` `[b, s, hidden]`, as the model's forward
    /// computes them (a head with per-row adapters needs the batch rows, hence 3-D).
    pub fn logits(&self, h: Tensor<3>, fc: &ForwardContext) -> Tensor<3> {
        let logits = match self.linear {
            Some(head) => head.forward_in(h, fc),
            None => tied_logits(h, self.embedding),
        };
        match self.softcap {
            Some(cap) => tanh(logits.div_scalar(cap)).mul_scalar(cap),
            None => logits,
        }
    }

    /// Whether the head's weight is kept in a block-quantized format (its own layer's, or the
    /// tied table's): chosen to save memory, which the training loss's chunk size follows
    /// (`peft_train::loss::chunk_tokens`).
    pub fn is_quantized(&self) -> bool {
        match self.linear {
            Some(head) => head.quantized.is_some(),
            None => self.embedding.quantized.is_some(),
        }
    }

    /// Whether nothing in the head trains (no adapter, no trainable copy, frozen weights): the
    /// loss's gradient then flows only into the hidden states, which is what taking it in
    /// chunks relies on.
    pub fn is_frozen(&self) -> bool {
        match self.linear {
            Some(head) => {
                head.adapters.is_empty()
                    && head.copies.is_empty()
                    && !head.weight.val().is_require_grad()
                    && head
                        .bias
                        .as_ref()
                        .is_none_or(|b| !b.val().is_require_grad())
            }
            // The tied table's adapters and copies act on the lookup, not on the head.
            None => !self.embedding.weight.val().is_require_grad(),
        }
    }
}
