//! The HTTP routes, the API-key check and the request metrics; `/v1/models`, `/v1/adapters`,
//! `/health` and `/metrics` are answered here, the model endpoints in [`crate::completions`]
//! and [`crate::inputs`].

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use crate::api::{self, LoadAdapterRequest, ModelCard, ModelList};
use crate::error::ApiError;
use crate::job::Command;
use crate::registry::{AdapterInfo, Registry};
use crate::state::AppState;

/// The router of every endpoint, over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/completions", post(crate::completions::completions))
        .route("/v1/chat/completions", post(crate::chat::chat_completions))
        .route("/v1/embeddings", post(crate::inputs::embeddings))
        .route("/v1/classify", post(crate::inputs::classify))
        .route("/v1/models", get(models))
        .route("/v1/adapters", post(load_adapter).get(models))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/health", get(health))
        .merge(protected)
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .with_state(state)
}

/// The metrics label of a path.
fn endpoint(path: &str) -> &'static str {
    match path {
        "/v1/completions" => "completions",
        "/v1/chat/completions" => "chat_completions",
        "/v1/embeddings" => "embeddings",
        "/v1/classify" => "classify",
        "/v1/models" => "models",
        "/health" => "health",
        "/metrics" => "metrics",
        p if p.starts_with("/v1/adapters") => "adapters",
        _ => "other",
    }
}

/// The header that carries a request's id, both ways.
pub const REQUEST_ID: &str = "x-request-id";

/// The client's `X-Request-Id` if it is a usable one (1 to 128 visible ASCII characters, so it
/// can go back in a header and into logs as it is), else a fresh random id.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(REQUEST_ID)
        .filter(|v| {
            let bytes = v.as_bytes();
            !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&crate::state::random_id())
                .unwrap_or(HeaderValue::from_static("unknown"))
        })
}

/// Count every request by endpoint and status, with its time to the response head, and give
/// every response its request's `X-Request-Id`.
async fn record(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let label = endpoint(request.uri().path());
    let id = request_id(request.headers());
    let start = Instant::now();
    let mut response = next.run(request).await;
    state.metrics.record_request(
        label,
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

/// Whether `given` is the key, in time that depends on the key's length only.
pub fn key_matches(key: &[u8], given: &[u8]) -> bool {
    // Compare as many bytes as the key has, whatever was sent, so timing says nothing about
    // how much of a guess was right; the length check is folded in without a branch.
    let mut padded = vec![0u8; key.len()];
    let n = given.len().min(key.len());
    padded[..n].copy_from_slice(&given[..n]);
    let same_bytes = padded.ct_eq(key);
    let same_len = (given.len() as u64).ct_eq(&(key.len() as u64));
    (same_bytes & same_len).into()
}

async fn authorize(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !key_matches(key, given.as_bytes()) {
            return Err(ApiError::unauthorized());
        }
    }
    Ok(next.run(request).await)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no endpoint {} {}; see /v1/completions, /v1/embeddings, /v1/classify, /v1/models, \
         /v1/adapters, /health, /metrics",
        request.method(),
        request.uri().path()
    ))
}

/// `ok` while the scheduler runs; 503 `unavailable` once it is gone (every model request
/// would get 503 then), so an orchestrator's liveness check restarts the server.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let alive = state.scheduler.is_alive();
    let body = axum::Json(json!({
        "status": if alive { "ok" } else { "unavailable" },
        "model": state.info.name,
        "adapters": state.registry.serving_names().len(),
        "scheduler": if alive { "running" } else { "stopped" },
    }));
    if alive {
        body.into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

fn card(info: &AdapterInfo) -> ModelCard {
    ModelCard {
        id: info.name.clone(),
        object: "model".into(),
        created: info.loaded_at,
        owned_by: "burn-peft".into(),
        parent: Some(crate::BASE_MODEL.into()),
        root: info.shown_path.clone(),
        peft_type: Some(info.peft_type.clone()),
    }
}

async fn models(State(state): State<Arc<AppState>>) -> axum::Json<ModelList> {
    let mut data = vec![ModelCard {
        id: crate::BASE_MODEL.into(),
        object: "model".into(),
        created: state.info.created,
        owned_by: "burn-peft".into(),
        parent: None,
        root: state.info.name.clone(),
        peft_type: None,
    }];
    data.extend(
        state
            .registry
            .list()
            .iter()
            .filter(|a| !a.draining)
            .map(card),
    );
    axum::Json(ModelList {
        object: "list".into(),
        data,
    })
}

/// Wait for the scheduler's answer, at most the request timeout.
async fn answer<T>(
    state: &AppState,
    reply: oneshot::Receiver<Result<T, ApiError>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(state.timeout, reply).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(ApiError::unavailable()),
        Err(_) => Err(ApiError::timeout(state.timeout)),
    }
}

async fn load_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = state.read_body(&headers, body).await?;
    let request: LoadAdapterRequest = api::parse(&body)?;
    Registry::check_name(&request.name)?;
    if state.registry.contains(&request.name) {
        return Err(ApiError::conflict(format!(
            "an adapter named `{}` is loaded already; unload it first or pick another name",
            request.name
        )));
    }
    crate::scheduler::check_room(&state.registry, state.max_adapters)?;
    let dir = state.registry.resolve_path(&request.path)?;
    // Reading the bundle to check it is file work: off the runtime and off the scheduler.
    let checked = dir.clone();
    let shared = tokio::task::spawn_blocking(move || crate::adapters::check_shared_base(&checked))
        .await
        .unwrap_or(Ok(()));
    if let Err(why) = shared {
        return Err(ApiError::bad_field(
            "path",
            state.registry.scrub(&format!(
                "`{}` cannot be served next to other adapters: {why}",
                request.path
            )),
        ));
    }
    let (reply, rx) = oneshot::channel();
    state.scheduler.control(Command::Load {
        name: request.name,
        dir,
        reply,
    })?;
    let info = answer(&state, rx).await?;
    Ok((StatusCode::CREATED, axum::Json(card(&info))).into_response())
}

async fn unload_adapter(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    if name == crate::BASE_MODEL {
        return Err(ApiError::bad_request("the base model cannot be unloaded"));
    }
    if !state.registry.contains(&name) {
        return Err(ApiError::unknown_adapter(
            &name,
            &state.registry.serving_names(),
        ));
    }
    let (reply, rx) = oneshot::channel();
    state.scheduler.control(Command::Unload {
        name: name.clone(),
        reply,
    })?;
    answer(&state, rx).await?;
    Ok(axum::Json(json!({"id": name, "object": "adapter", "deleted": true})).into_response())
}

#[cfg(test)]
mod tests {
    use super::key_matches;

    #[test]
    fn keys() {
        assert!(key_matches(b"secret", b"secret"));
        assert!(!key_matches(b"secret", b"secreT"));
        assert!(!key_matches(b"secret", b"secret2"));
        assert!(!key_matches(b"secret", b"sec"));
        assert!(!key_matches(b"secret", b""));
    }
}
