//! Logging in and out of the dashboard with the same accounts, throttle,
//! lockouts, audit and session tokens as `drover login`
//! (`routes::users::password_login`); the session token is kept in the
//! `drover_session` cookie.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use drover_proto::api::LoginRequest;
use maud::{html, Markup};

use super::error::UiError;
use super::session::{self, Form, UiUser};
use crate::connections::Peer;
use crate::routes::audit::Audit;
use crate::state::AppState;

fn login_page(message: Option<&str>, username: &str) -> Markup {
    super::layout::bare(
        "Log in",
        html! {
            h1 { "Log in to Drover" }
            @if let Some(m) = message {
                p.error role="alert" { (m) }
            }
            form.login method="post" action="/ui/login" {
                p {
                    label for="username" { "User name" }
                    input #username name="username" type="text" autocomplete="username" required value=(username);
                }
                p {
                    label for="password" { "Password" }
                    input #password name="password" type="password" autocomplete="current-password" required;
                }
                p { button type="submit" { "Log in" } }
            }
        },
    )
}

/// `GET /ui/login`.
pub async fn form() -> Markup {
    login_page(None, "")
}

/// A cross-site login attempt: the Origin, when the browser sends one,
/// must be this server (scheme, host and port as the Host header says).
fn same_origin(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let scheme = if session::tls(state) { "https" } else { "http" };
    match (origin.to_str().ok(), host) {
        (Some(o), Some(h)) => o.strip_prefix(scheme).and_then(|r| r.strip_prefix("://")) == Some(h),
        _ => false,
    }
}

/// `POST /ui/login`: sets the session cookie and goes to the overview;
/// a refused login shows the form again with why.
pub async fn submit(
    State(state): State<AppState>,
    Peer(peer): Peer,
    audit: Audit,
    headers: HeaderMap,
    form: Form,
) -> Result<Response, UiError> {
    if !same_origin(&state, &headers) {
        return Err(UiError::forbidden("cross-site login refused"));
    }
    let username = form.get("username").unwrap_or_default().to_owned();
    let req = LoginRequest {
        username: username.clone(),
        password: form.get("password").unwrap_or_default().to_owned(),
    };
    match crate::routes::users::password_login(&state, peer, &audit, req).await {
        Ok(session) => {
            let max_age = (session.expires_at - Utc::now()).num_seconds();
            let cookie = session::session_cookie(&session.token, max_age, session::tls(&state));
            let mut resp = (
                StatusCode::SEE_OTHER,
                [(header::LOCATION, HeaderValue::from_static("/ui/"))],
            )
                .into_response();
            let cookie = HeaderValue::from_str(&cookie)
                .map_err(|e| crate::error::ApiError::internal("setting the cookie", &e))?;
            resp.headers_mut().insert(header::SET_COOKIE, cookie);
            Ok(resp)
        }
        Err(e) => Ok((e.status(), login_page(Some(&e.message()), &username)).into_response()),
    }
}

/// `POST /ui/logout`: revokes the session server-side (as the API's
/// logout does) and clears the cookie.
pub async fn logout(
    State(state): State<AppState>,
    user: UiUser,
    form: Form,
) -> Result<Response, UiError> {
    super::csrf::check(&state, &user, &form)?;
    crate::routes::users::end_session(&state, &user.auth).await?;
    Err(UiError::Login {
        clear_cookie: true,
        secure: session::tls(&state),
    })
}
