//! RFC 9457 problem details: the one error shape of the HTTP API.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::write::enqueue::EnqueueError;

/// An error answer. `code` names the problem for programs (it is the last
/// part of the `type` URN); `detail` explains this occurrence to people.
#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub retry_after_secs: Option<u64>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            retry_after_secs: None,
        }
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this endpoint does not take that method",
        )
    }

    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", detail)
    }

    /// The database cannot be reached (or a stream is held): nothing was
    /// stored, try again.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self {
            retry_after_secs: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
        }
    }

    /// COMMIT was sent and its answer lost: the message may be stored (G8).
    /// 504, not 503: a 503 always means "nothing was stored".
    pub fn outcome_unknown(detail: impl Into<String>) -> Self {
        Self {
            retry_after_secs: Some(1),
            ..Self::new(StatusCode::GATEWAY_TIMEOUT, "outcome-unknown", detail)
        }
    }

    /// An unexpected failure: logged in full, answered in general terms.
    pub fn internal(error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an unexpected error occurred; the node's log has the details",
        )
    }

    /// A database error while reading: 503 when it is an outage.
    pub fn from_db(error: sqlx::Error) -> Self {
        metrics::counter!(crate::metrics::DB_ERRORS, "operation" => "http").increment(1);
        if crate::db::is_unavailable(&error) {
            Self::unavailable(format!("the database is unavailable: {error}"))
        } else {
            Self::internal(&error)
        }
    }

    fn title(&self) -> &'static str {
        self.status.canonical_reason().unwrap_or("Error")
    }
}

impl From<EnqueueError> for Problem {
    fn from(error: EnqueueError) -> Self {
        match error {
            EnqueueError::ConnectionNotFound(detail) => {
                Problem::new(StatusCode::NOT_FOUND, "connection_not_found", detail)
            }
            EnqueueError::Unsupported(detail) => {
                Problem::new(StatusCode::NOT_IMPLEMENTED, "unsupported", detail)
            }
            EnqueueError::Invalid(detail) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", detail)
            }
            EnqueueError::Busy => Problem::unavailable(
                "a recipient's stream is held by another transaction; nothing was stored, try again",
            ),
            EnqueueError::Unavailable(error) => {
                metrics::counter!(crate::metrics::DB_ERRORS, "operation" => "submit").increment(1);
                Problem::unavailable(format!(
                    "the database is unavailable; nothing was stored ({error})"
                ))
            }
            EnqueueError::Conflict(error) => Problem::unavailable(format!(
                "the transaction conflicted with another; nothing was stored, try again ({error})"
            )),
            EnqueueError::OutcomeUnknown(error) => {
                metrics::counter!(crate::metrics::DB_ERRORS, "operation" => "submit").increment(1);
                Problem::outcome_unknown(format!(
                    "the message may or may not have been stored: the database's answer to COMMIT \
                     was lost ({error}); retry with the same Idempotency-Key to store it exactly once"
                ))
            }
            EnqueueError::Database(error) => Problem::internal(&error),
        }
    }
}

/// The body of every error answer (RFC 9457), served as
/// `application/problem+json`.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({
    "type": "urn:pgrelay:problem:bad_target",
    "title": "Bad Request",
    "status": 400,
    "detail": "`to` must be one of {\"user\"}, {\"users\"}, {\"connection\"}, {\"topic\"}, {\"broadcast\"}"
}))]
pub struct ProblemDetails {
    /// `urn:pgrelay:problem:<code>`: the problem's kind, for programs.
    #[serde(rename = "type")]
    pub kind: String,
    /// The HTTP status's reason phrase.
    pub title: &'static str,
    pub status: u16,
    /// What was wrong this time, for people.
    pub detail: String,
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = ProblemDetails {
            kind: format!("urn:pgrelay:problem:{}", self.code),
            title: self.title(),
            status: self.status.as_u16(),
            detail: self.detail,
        };
        let body = serde_json::to_string(&body).expect("a problem serializes");
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
