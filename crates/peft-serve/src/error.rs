//! Errors: [`ApiError`] is what one request gets back (an HTTP status and an OpenAI-style JSON
//! body `{"error": {"message", "type", "param", "code"}}`); [`ServeError`] is what stops the
//! server from starting.

use std::path::PathBuf;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A request that failed, with the status it answers and a message that says what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong and what to do instead.
    pub message: String,
    /// The request field at fault (a JSON path such as `prompt` or `stop[1]`), if one is.
    pub param: Option<String>,
    /// Seconds after which a retry may succeed (`Retry-After`, for 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// 400: the request cannot work as given.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 400 naming the field at fault.
    pub fn bad_field(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::bad_request(message)
        }
    }

    /// The same error about field `to` where it said `from` (a request field known by two
    /// names, as `max_tokens` / `max_completion_tokens`).
    pub fn renamed(mut self, from: &str, to: &str) -> Self {
        if from != to && self.param.as_deref() == Some(from) {
            self.param = Some(to.to_string());
            self.message = self.message.replace(from, to);
        }
        self
    }

    /// 401: a missing or wrong API key.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "missing or invalid API key: send `Authorization: Bearer <key>`",
        )
    }

    /// 403: something this server is not allowed to do.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    /// 404: an adapter (the request's `model`) that is not loaded; lists the loaded ones.
    pub fn unknown_adapter(name: &str, loaded: &[String]) -> Self {
        let mut names = vec![crate::BASE_MODEL.to_string()];
        names.extend(loaded.iter().cloned());
        Self {
            param: Some("model".into()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                format!(
                    "the model `{name}` does not exist: loaded are {} (`{}` is the base model \
                     without adapter)",
                    names.join(", "),
                    crate::BASE_MODEL
                ),
            )
        }
    }

    /// 404 with a message.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 408: the request ran past its time limit.
    pub fn timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request did not finish within the server's limit of {:.1} s \
                 (--request-timeout); ask for fewer tokens or retry later",
                limit.as_secs_f64()
            ),
        )
    }

    /// 408: the body of the request did not arrive in time (a client trickling its body
    /// would otherwise hold its connection and a handler forever).
    pub fn timeout_reading_body(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within the server's limit of {:.1} s; send \
                 the whole body at once",
                limit.as_secs_f64()
            ),
        )
    }

    /// 409: a name already in use.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    /// 413: a body over the size limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than the server's limit of {limit} bytes"),
        )
    }

    /// 503 with `Retry-After`: the queue is full.
    pub fn queue_full(capacity: usize) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the server is busy: its queue of {capacity} requests is full; retry later"
                ),
            )
        }
    }

    /// 503: the scheduler is gone (the server is shutting down or failed).
    pub fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model scheduler is not running",
        )
    }

    /// 500: a failure inside this request; other requests are not affected.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// The OpenAI error `type` of the status.
    pub fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::REQUEST_TIMEOUT => "timeout_error",
            StatusCode::CONFLICT => "conflict_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: u16,
        }
        serde_json::json!({ "error": Inner {
            message: &self.message,
            kind: self.kind(),
            param: self.param.as_deref(),
            code: self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<peft_models::ModelError> for ApiError {
    /// Input the model refused is the request's fault (400); anything else is a failure of
    /// this request (500).
    fn from(e: peft_models::ModelError) -> Self {
        match e {
            peft_models::ModelError::InputOutOfRange { .. }
            | peft_models::ModelError::InvalidInput(_) => ApiError::bad_request(e.to_string()),
            other => ApiError::internal(other.to_string()),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model or its tokenizer could not be used.
    #[error("model: {0}")]
    Model(#[from] peft_models::ModelError),
    /// An adapter given at start could not be loaded.
    #[error("adapter `{name}` from {}: {source}", dir.display())]
    Adapter {
        /// Its name.
        name: String,
        /// Its folder.
        dir: PathBuf,
        /// Why (boxed: it is large).
        source: Box<peft_core::PeftError>,
    },
    /// A setting that cannot work.
    #[error("{0}")]
    Config(String),
    /// Binding or serving failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
