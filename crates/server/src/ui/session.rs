//! Who is looking: the `drover_session` cookie (a session token from a
//! login, the same kind `drover login` gets) checked exactly like a bearer
//! token on the API (`auth::authenticate_user`: revocation, expiry, rate
//! limits, disabled users), giving the same `UserAuth`. Only dashboard
//! routes read the cookie. Also: the cookie itself, and form bodies.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};

use super::error::UiError;
use crate::auth::{authenticate_user, hash_token, UserAuth};
use crate::state::AppState;

/// The session cookie's name.
pub const COOKIE: &str = "drover_session";

/// A logged-in dashboard user.
#[derive(Debug, Clone)]
pub struct UiUser {
    pub auth: UserAuth,
    /// The CSRF token of this session, for the forms of its pages.
    pub csrf: String,
    /// The session token's hash, which the CSRF token is derived from.
    pub session_hash: String,
}

/// Whether the server serves HTTPS (cookies are then `Secure`).
pub fn tls(state: &AppState) -> bool {
    state.config.tls.is_some()
}

/// The value of cookie `name` in the request, if sent.
pub fn cookie(parts: &Parts, name: &str) -> Option<String> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_owned())
}

/// The `Set-Cookie` value that holds a session for `max_age_secs`.
pub fn session_cookie(token: &str, max_age_secs: i64, secure: bool) -> String {
    format!(
        "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        max_age_secs.max(0),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    session_cookie("", 0, secure)
}

impl FromRequestParts<AppState> for UiUser {
    type Rejection = UiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, UiError> {
        let secure = tls(state);
        let Some(token) = cookie(parts, COOKIE).filter(|t| !t.is_empty()) else {
            return Err(UiError::Login {
                clear_cookie: false,
                secure,
            });
        };
        let auth = authenticate_user(parts, state, &token).await.map_err(|e| {
            if e.status == StatusCode::UNAUTHORIZED {
                UiError::Login {
                    clear_cookie: true,
                    secure,
                }
            } else {
                e.into()
            }
        })?;
        let session_hash = hash_token(&token);
        Ok(UiUser {
            csrf: state.signing_key.csrf_token(&session_hash),
            session_hash,
            auth,
        })
    }
}

/// Largest form body the dashboard reads.
const MAX_FORM_BYTES: usize = 16 * 1024;

/// A form body (`application/x-www-form-urlencoded`), field by field; a
/// field given twice keeps its first value.
#[derive(Debug, Default)]
pub struct Form(HashMap<String, String>);

impl Form {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A field that is absent or blank is `None`.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.get(name).map(str::trim).filter(|v| !v.is_empty())
    }

    /// A checkbox: present and not "off".
    pub fn checked(&self, name: &str) -> bool {
        self.get(name).is_some_and(|v| v != "off" && !v.is_empty())
    }
}

impl<S: Send + Sync> FromRequest<S> for Form {
    type Rejection = UiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, UiError> {
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| UiError::page(e.status(), "the form could not be read"))?;
        if body.len() > MAX_FORM_BYTES {
            return Err(UiError::page(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the form is too large",
            ));
        }
        let mut fields = HashMap::new();
        for (k, v) in url::form_urlencoded::parse(&body) {
            fields
                .entry(k.into_owned())
                .or_insert_with(|| v.into_owned());
        }
        Ok(Form(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_under_tls() {
        let c = session_cookie("drv_s_x", 60, true);
        assert_eq!(
            c,
            "drover_session=drv_s_x; HttpOnly; SameSite=Strict; Path=/; Max-Age=60; Secure"
        );
        assert!(!session_cookie("t", 60, false).contains("Secure"));
        assert!(clear_cookie(false).contains("Max-Age=0"));
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let req = axum::http::Request::builder()
            .header(
                header::COOKIE,
                "x_drover_session=no; drover_session=yes; a=b",
            )
            .body(())
            .map(|r| r.into_parts().0);
        let Ok(parts) = req else { panic!("request") };
        assert_eq!(cookie(&parts, COOKIE).as_deref(), Some("yes"));
        assert_eq!(cookie(&parts, "nope"), None);
    }
}
