//! CSRF tokens of the dashboard's forms: an HMAC-SHA256, under the
//! server's signing key, of the session token's hash
//! (`SigningKey::csrf_token`). Nothing is stored; a token is good for
//! exactly one session and dies with it. Every POST but the login checks
//! it before it changes anything; the login (no session yet) relies on
//! the SameSite=Strict cookie and the Origin check (`login`).

use maud::{html, Markup};

use super::error::UiError;
use super::session::{Form, UiUser};
use crate::state::AppState;

/// Name of the form field.
pub const FIELD: &str = "csrf";

/// The hidden field every form of a logged-in page carries.
pub fn field(user: &UiUser) -> Markup {
    html! { input type="hidden" name=(FIELD) value=(user.csrf); }
}

/// Refuses (403) a form whose token is missing or not this session's.
pub fn check(state: &AppState, user: &UiUser, form: &Form) -> Result<(), UiError> {
    let presented = form.get(FIELD).unwrap_or_default();
    if !presented.is_empty() && state.signing_key.csrf_valid(&user.session_hash, presented) {
        return Ok(());
    }
    tracing::warn!(user = %user.auth.username, "dashboard form refused: bad or missing CSRF token");
    Err(UiError::forbidden(
        "this form has expired or did not come from this dashboard: reload the page and try again",
    ))
}
