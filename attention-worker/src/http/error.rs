//! OpenAI's error body, and the one mapping of this crate's errors to HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tonic::Code;

use crate::AttentionWorkerError;

/// An error as OpenAI's API returns it: `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What was wrong, for a person.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, `authentication_error`, ...).
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `resource_exhausted`, ...).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error` about `param`.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// The 401 of a missing or wrong API key.
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or incorrect API key: send `Authorization: Bearer <key>`".into(),
            kind: "authentication_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// The 404 of a model this server does not serve.
    pub fn model_not_found(asked: &str, served: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("the model `{asked}` does not exist: this server serves `{served}`"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// The error a client sees for `error`. The status follows the gRPC code of [`AttentionWorkerError::to_status`],
    /// so both APIs classify an error the same way. `prompt_param` names the prompt field of the endpoint
    /// (`prompt` or `messages`).
    pub fn from_engine(error: &AttentionWorkerError, prompt_param: &str) -> Self {
        let (status, kind, code) = match error.to_status().code() {
            Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            Code::ResourceExhausted => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", Some("resource_exhausted"))
            }
            Code::Unavailable | Code::FailedPrecondition => {
                (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", Some("unavailable"))
            }
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout", Some("deadline_exceeded")),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error", None),
        };
        let param = match error {
            AttentionWorkerError::InvalidRequest { field, .. } => Some(match field.as_str() {
                "max_new_tokens" => "max_tokens".to_string(),
                f if f == "prompt" || f.starts_with("prompt.") => prompt_param.to_string(),
                f => f.to_string(),
            }),
            _ => None,
        };
        let message = match error {
            // The engine speaks of max_new_tokens; this API's field is max_tokens.
            AttentionWorkerError::InvalidRequest { field, reason } => {
                format!(
                    "invalid {}: {}",
                    param.as_deref().unwrap_or(field),
                    reason.replace("max_new_tokens", "max_tokens")
                )
            }
            other => other.to_string(),
        };
        Self { status, message, kind, param, code }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}
