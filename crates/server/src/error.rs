//! The one error type of the HTTP layer. Clients get a stable code and a
//! message naming what is wrong; internal detail is logged, never returned.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use drover_proto::{ErrorBody, ErrorCode, ErrorDetail};
use serde::de::DeserializeOwned;

/// An API failure: what the client is told.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// Seconds for a `Retry-After` header (429 and 503 answers).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A request over a rate limit: 429 with `Retry-After` (whole seconds,
    /// rounded up, at least 1).
    pub fn rate_limited(message: impl Into<String>, wait: std::time::Duration) -> ApiError {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        ApiError {
            retry_after: Some(secs.max(1)),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
                message,
            )
        }
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InvalidRequest,
            message,
        )
    }

    pub fn unauthorized(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }

    /// A failure the client cannot fix: logged in full, reported vaguely.
    pub fn internal(context: &str, err: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(error = %err, "{context}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            format!("internal error while {context}"),
        )
    }
}

impl From<drover_store::Error> for ApiError {
    fn from(e: drover_store::Error) -> ApiError {
        use drover_store::Error as E;
        match &e {
            E::NotFound { .. } => ApiError::not_found(e.to_string()),
            E::Ambiguous { .. } => ApiError::invalid(e.to_string()),
            _ if e.is_unique_violation() => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::Conflict, "already exists")
            }
            E::Unavailable(_) | E::CommitFailed(_) => {
                tracing::warn!(error = %e, "the store could not write");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Unavailable,
                    "the database could not write, try again",
                )
            }
            E::Database(sqlx_err) if is_unavailable(sqlx_err) => {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Unavailable,
                    "the database is unavailable, try again",
                )
            }
            _ => ApiError::internal("accessing the database", &e),
        }
    }
}

impl From<crate::domain::Error> for ApiError {
    fn from(e: crate::domain::Error) -> ApiError {
        use crate::domain::Error as E;
        match e {
            E::Store(e) => e.into(),
            E::Corrupt { .. } => ApiError::internal("reading the catalog", &e),
            E::OutOfScope(why) => ApiError::forbidden(why),
            input => ApiError::invalid(input.to_string()),
        }
    }
}

fn is_unavailable(e: &drover_store::SqlxError) -> bool {
    matches!(
        e,
        drover_store::SqlxError::PoolTimedOut
            | drover_store::SqlxError::PoolClosed
            | drover_store::SqlxError::Io(_)
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        resp
    }
}

/// A JSON body whose rejections are API errors naming the field at fault
/// (unknown field, wrong type, missing field) or the size limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            status,
            ErrorCode::PayloadTooLarge,
            "request body is larger than the server accepts",
        );
    }
    let message = match &r {
        JsonRejection::JsonDataError(e) => {
            // "Failed to deserialize the JSON body into the target type: kind: unknown field ..."
            let text = e.body_text();
            text.split_once(": ")
                .map(|(_, rest)| rest.to_owned())
                .unwrap_or(text)
        }
        _ => r.body_text(),
    };
    ApiError::new(status, ErrorCode::InvalidRequest, message)
}

impl<S, T> axum::extract::OptionalFromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    /// No body (no Content-Type) or a JSON `null` is `None`; a body must
    /// be a JSON object (serde would also take a struct from an array).
    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        if req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .is_none()
        {
            return Ok(None);
        }
        let ApiJson(value) =
            <ApiJson<Option<serde_json::Value>> as FromRequest<S>>::from_request(req, state)
                .await?;
        match value {
            None => Ok(None),
            Some(v @ serde_json::Value::Object(_)) => serde_json::from_value(v)
                .map(|v| Some(ApiJson(v)))
                .map_err(|e| ApiError::invalid(e.to_string())),
            Some(_) => Err(ApiError::invalid(
                "the request body must be a JSON object or null",
            )),
        }
    }
}

/// A query string whose rejections are API errors (the JSON envelope, 400)
/// naming the parameter at fault, instead of axum's plain-text answer.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(r) => {
                // "Failed to deserialize query string: unknown variant ..."
                let text = r.body_text();
                let message = text
                    .split_once(": ")
                    .map(|(_, rest)| format!("query string: {rest}"))
                    .unwrap_or(text);
                Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::InvalidRequest,
                    message,
                ))
            }
        }
    }
}

/// Path parameters whose rejections are API errors (the JSON envelope).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(r) if r.status().is_server_error() => {
                Err(ApiError::internal("reading the path", &r.body_text()))
            }
            Err(r) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRequest,
                format!("path: {}", r.body_text()),
            )),
        }
    }
}
