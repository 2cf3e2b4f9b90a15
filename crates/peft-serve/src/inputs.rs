//! `POST /v1/embeddings` (encoders: mean-pooled, L2-normalised sentence embeddings) and
//! `POST /v1/classify` (sequence classifiers: label and probabilities), answered by one
//! forward in the scheduler, batched with other such requests across adapters.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use peft_core::nn::BASE_ROW;
use tokio::sync::oneshot;

use crate::api::{
    self, Classification, ClassifyResponse, Embedding, EmbeddingResponse, EmbeddingVector, Input,
    InputRequest, Usage, unix_now,
};
use crate::error::ApiError;
use crate::job::{Command, OneShotJob, OneShotKind};
use crate::state::AppState;
use peft_models::Task;

/// Check, tokenize and run `kind` over the request's inputs; the vectors and the token count.
async fn run(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    body: Body,
    kind: OneShotKind,
) -> Result<(InputRequest, Vec<Vec<f32>>, usize), ApiError> {
    let body = state.read_body(headers, body).await?;
    let mut request: InputRequest = api::parse(&body)?;
    let (model_kind, endpoint) = match kind {
        OneShotKind::Embed => (Task::Encoder, "/v1/embeddings"),
        OneShotKind::Classify => (
            Task::SequenceClassification { num_labels: 0 },
            "/v1/classify",
        ),
    };
    if let Some(format) = &request.encoding_format
        && !(format == "float" || format == "base64" && kind == OneShotKind::Embed)
    {
        let allowed = match kind {
            OneShotKind::Embed => "`float` or `base64`",
            OneShotKind::Classify => "`float`",
        };
        return Err(ApiError::bad_field(
            "encoding_format",
            format!("encoding_format must be {allowed}, found `{format}`"),
        ));
    }
    state.require(model_kind, endpoint)?;
    let adapter = state.registry.resolve_model(&request.model)?;
    let input = std::mem::replace(&mut request.input, Input::Tokens(Vec::new()));
    let inputs = state.encode(input, "input", state.max_inputs).await?;
    let prefix = adapter.as_ref().map_or(0, |a| a.prefix_len);
    let many = inputs.len() > 1;
    for (i, input) in inputs.iter().enumerate() {
        let field = if many {
            format!("input[{i}]")
        } else {
            "input".into()
        };
        state.check_length(&field, input.ids.len(), prefix, 0)?;
    }
    let tokens = inputs.iter().map(|e| e.ids.len()).sum();
    let (reply, rx) = oneshot::channel();
    let deadline = state.deadline();
    state.scheduler.submit(Command::OneShot(OneShotJob {
        kind,
        adapter: adapter.map_or(BASE_ROW.to_string(), |a| a.name),
        inputs,
        reply,
        deadline,
    }))?;
    let vectors = match tokio::time::timeout_at(deadline.into(), rx).await {
        Ok(Ok(result)) => result?,
        Ok(Err(_)) if Instant::now() >= deadline => return Err(ApiError::timeout(state.timeout)),
        Ok(Err(_)) => return Err(ApiError::unavailable()),
        Err(_) => return Err(ApiError::timeout(state.timeout)),
    };
    Ok((request, vectors, tokens))
}

fn usage(tokens: usize) -> Usage {
    Usage {
        prompt_tokens: tokens,
        completion_tokens: 0,
        total_tokens: tokens,
    }
}

/// The embeddings handler.
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (request, vectors, tokens) = run(&state, &headers, body, OneShotKind::Embed).await?;
    let base64 = request.encoding_format.as_deref() == Some("base64");
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| Embedding {
            object: "embedding".into(),
            index,
            embedding: EmbeddingVector::encode(embedding, base64),
        })
        .collect();
    Ok(axum::Json(EmbeddingResponse {
        object: "list".into(),
        data,
        model: request.model,
        usage: usage(tokens),
    })
    .into_response())
}

/// Softmax of `logits`.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f32 = exp.iter().sum();
    exp.iter().map(|e| e / total).collect()
}

/// The classification handler.
pub async fn classify(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (request, vectors, tokens) = run(&state, &headers, body, OneShotKind::Classify).await?;
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, logits)| {
            let probs = softmax(&logits);
            let best = probs
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &p)| if p > b.1 { (i, p) } else { b },
                )
                .0;
            let label = state
                .info
                .labels
                .get(best)
                .cloned()
                .unwrap_or_else(|| format!("LABEL_{best}"));
            Classification {
                index,
                label,
                num_classes: probs.len(),
                probs,
            }
        })
        .collect();
    Ok(axum::Json(ClassifyResponse {
        id: state.next_id("classify"),
        object: "list".into(),
        created: unix_now(),
        model: request.model,
        data,
        usage: usage(tokens),
    })
    .into_response())
}
