//! What a dashboard request that fails answers: a redirect to the login
//! page (no session, or an expired one), or an error page with the status
//! and a message for people. Internal details stay in the log.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::html;

use crate::error::ApiError;

/// A failed dashboard request.
#[derive(Debug)]
pub enum UiError {
    /// Not logged in (or the session ended): to the login page, clearing
    /// the cookie when one was sent.
    Login { clear_cookie: bool, secure: bool },
    /// An error page.
    Page { status: StatusCode, message: String },
}

impl UiError {
    pub fn page(status: StatusCode, message: impl Into<String>) -> UiError {
        UiError::Page {
            status,
            message: message.into(),
        }
    }

    pub fn forbidden(message: impl Into<String>) -> UiError {
        UiError::page(StatusCode::FORBIDDEN, message)
    }

    pub fn not_found(message: impl Into<String>) -> UiError {
        UiError::page(StatusCode::NOT_FOUND, message)
    }
}

impl From<ApiError> for UiError {
    fn from(e: ApiError) -> UiError {
        UiError::page(e.status, e.message)
    }
}

impl From<drover_store::Error> for UiError {
    fn from(e: drover_store::Error) -> UiError {
        ApiError::from(e).into()
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        match self {
            UiError::Login {
                clear_cookie,
                secure,
            } => {
                let mut resp = (
                    StatusCode::SEE_OTHER,
                    [(header::LOCATION, HeaderValue::from_static("/ui/login"))],
                )
                    .into_response();
                if clear_cookie {
                    if let Ok(v) = HeaderValue::from_str(&super::session::clear_cookie(secure)) {
                        resp.headers_mut().insert(header::SET_COOKIE, v);
                    }
                }
                resp
            }
            UiError::Page { status, message } => {
                let title = status.canonical_reason().unwrap_or("Error");
                let body = super::layout::bare(
                    title,
                    html! {
                        h1 { (status.as_u16()) " " (title) }
                        p.error role="alert" { (message) }
                        p { a href="/ui/" { "Back to the overview" } }
                    },
                );
                (status, body).into_response()
            }
        }
    }
}
