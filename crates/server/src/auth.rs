//! Secrets and identities: random tokens stored only as hashes, argon2
//! passwords, agent access JWTs, and the extractors that authenticate users
//! and agents on each request.

use std::path::Path;

use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, Block, Params, Version};
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::Engine;
use chrono::{DateTime, Utc};
use drover_proto::api::Role;
use drover_proto::ErrorCode;
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

/// What a token is for; its prefix makes leaked tokens recognisable.
#[derive(Debug, Clone, Copy)]
pub enum TokenPrefix {
    Bootstrap,
    Session,
    Api,
    Refresh,
}

impl TokenPrefix {
    fn as_str(self) -> &'static str {
        match self {
            TokenPrefix::Bootstrap => "drv_b_",
            TokenPrefix::Session => "drv_s_",
            TokenPrefix::Api => "drv_a_",
            TokenPrefix::Refresh => "drv_r_",
        }
    }
}

/// Errors while setting up or using secrets.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the operating system's random source failed: {0}")]
    Random(String),
    #[error("signing key file {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("signing key file {path} is corrupt: expected 64 hex characters")]
    KeyCorrupt { path: String },
    #[error("hashing a password failed: {0}")]
    Hash(String),
    #[error("the signing key cannot key an HMAC: {0}")]
    KeyUnusable(String),
}

fn random_bytes<const N: usize>() -> Result<[u8; N], SecretError> {
    let mut buf = [0u8; N];
    getrandom::getrandom(&mut buf).map_err(|e| SecretError::Random(e.to_string()))?;
    Ok(buf)
}

/// A new random token (256 bits) with its kind's prefix.
pub fn new_token(prefix: TokenPrefix) -> Result<String, SecretError> {
    let bytes = random_bytes::<32>()?;
    Ok(format!(
        "{}{}",
        prefix.as_str(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// A random password for the first admin, easy to copy.
pub fn new_password() -> Result<String, SecretError> {
    let bytes = random_bytes::<18>()?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The form in which tokens are stored and looked up.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Hashes a password with argon2id and a random salt.
pub fn hash_password(password: &str) -> Result<String, SecretError> {
    let salt_bytes = random_bytes::<16>()?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| SecretError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| SecretError::Hash(e.to_string()))
}

/// Checks a password against a stored hash; a corrupt hash never matches.
pub fn verify_password(password: &str, hash: &str) -> bool {
    verify_password_in(password, hash, &mut Vec::new())
}

/// The most memory a stored hash may ask for (1 GiB, in 1 KiB blocks);
/// ours ask for 19 MiB.
const MAX_HASH_BLOCKS: usize = 1 << 20;

/// Checks a password against a stored hash like `verify_password`, but
/// works in `memory`, grown to the hash's cost and kept by the caller for
/// the next check: argon2 needs megabytes per check, and memory freed by
/// one thread and allocated by another is not always handed back to the
/// system, so a flood of checks made the process grow by gigabytes.
pub fn verify_password_in(password: &str, hash: &str, memory: &mut Vec<Block>) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let Ok(algorithm) = argon2::Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    let (Some(expected), Some(salt)) = (parsed.hash, parsed.salt) else {
        return false;
    };
    let blocks = params.block_count();
    if blocks > MAX_HASH_BLOCKS {
        return false;
    }
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let argon2 = Argon2::new(algorithm, version, params);
    let computed = Output::init_with(expected.len(), |out| {
        argon2
            .hash_password_into_with_memory(password.as_bytes(), salt, out, &mut memory[..blocks])
            .map_err(|_| argon2::password_hash::Error::Password)
    });
    // `Output` compares in constant time.
    matches!(computed, Ok(c) if c == expected)
}

/// The HMAC key that signs agent access tokens and derives the successors
/// of agent refresh tokens.
#[derive(Clone)]
pub struct SigningKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    successor: Hmac<Sha256>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// Reads the key file, or creates it (mode 0600) with a new random key.
    pub fn load_or_create(path: &Path) -> Result<SigningKey, SecretError> {
        let io_err = |source| SecretError::KeyFile {
            path: path.display().to_string(),
            source,
        };
        let key = match std::fs::read_to_string(path) {
            Ok(text) => hex::decode(text.trim())
                .ok()
                .filter(|k| k.len() == 32)
                .ok_or_else(|| SecretError::KeyCorrupt {
                    path: path.display().to_string(),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = random_bytes::<32>()?.to_vec();
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io_err)?;
                }
                crate::private::create_file(path, hex::encode(&key).as_bytes()).map_err(io_err)?;
                tracing::info!(path = %path.display(), "created a new signing key");
                key
            }
            Err(e) => return Err(io_err(e)),
        };
        SigningKey::from_bytes(&key)
    }

    pub fn from_bytes(key: &[u8]) -> Result<SigningKey, SecretError> {
        Ok(SigningKey {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            successor: Hmac::new_from_slice(key)
                .map_err(|e| SecretError::KeyUnusable(e.to_string()))?,
        })
    }

    /// The dashboard's CSRF token for a session: an HMAC of the session
    /// token's hash, so it needs no storage and dies with the session. The
    /// message is prefixed apart from every other use of the key.
    pub fn csrf_token(&self, session_hash: &str) -> String {
        hex::encode(self.csrf_mac(session_hash).finalize().into_bytes())
    }

    /// Whether `presented` is the CSRF token of this session (compared in
    /// constant time).
    pub fn csrf_valid(&self, session_hash: &str, presented: &str) -> bool {
        match hex::decode(presented) {
            Ok(bytes) => self.csrf_mac(session_hash).verify_slice(&bytes).is_ok(),
            Err(_) => false,
        }
    }

    fn csrf_mac(&self, session_hash: &str) -> Hmac<Sha256> {
        let mut mac = self.successor.clone();
        mac.update(b"drover/ui-csrf/v1\0");
        mac.update(session_hash.as_bytes());
        mac
    }

    /// The refresh token that succeeds `token` when it is rotated. Derived
    /// rather than random so that a token presented again, because the
    /// answer to its rotation was lost, gets the same successor on any
    /// replica; without the key it is as unpredictable as a random token.
    /// The message is prefixed, so it can never be a JWT's signing input
    /// (base64url, which has no '/').
    pub fn successor_refresh_token(&self, token: &str) -> String {
        let mut mac = self.successor.clone();
        mac.update(b"drover/refresh-successor/v1\0");
        mac.update(token.as_bytes());
        format!(
            "{}{}",
            TokenPrefix::Refresh.as_str(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }
}

/// Claims of an agent access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentClaims {
    /// The agent id.
    pub sub: String,
    /// The session (refresh-token family) this token belongs to.
    pub sid: String,
    pub iat: i64,
    pub exp: i64,
    /// Always "agent": keeps other kinds of JWT from being accepted here.
    pub typ: String,
}

/// Signs an access token for an agent session.
pub fn issue_agent_token(
    key: &SigningKey,
    agent_id: &str,
    session_id: &str,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<String, ApiError> {
    let claims = AgentClaims {
        sub: agent_id.to_owned(),
        sid: session_id.to_owned(),
        iat: now.timestamp(),
        exp: expires_at.timestamp(),
        typ: "agent".to_owned(),
    };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key.encoding)
        .map_err(|e| ApiError::internal("signing an access token", &e))
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized(ErrorCode::Unauthorized, "missing Authorization header")
    })?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized(
                ErrorCode::Unauthorized,
                "Authorization header must be 'Bearer TOKEN'",
            )
        })
}

/// An agent that presented a valid, unexpired access token. Whether the
/// agent is still allowed (not revoked, session alive) is checked against
/// the store by the handler, in the same query that does its work.
#[derive(Debug, Clone)]
pub struct AgentToken(pub AgentClaims);

impl FromRequestParts<AppState> for AgentToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data =
            jsonwebtoken::decode::<AgentClaims>(token, &state.signing_key.decoding, &validation)
                .map_err(|e| match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => ApiError::unauthorized(
                        ErrorCode::TokenExpired,
                        "access token expired: refresh it",
                    ),
                    _ => ApiError::unauthorized(
                        ErrorCode::Unauthorized,
                        "invalid agent access token",
                    ),
                })?;
        if data.claims.typ != "agent" {
            return Err(ApiError::unauthorized(
                ErrorCode::Unauthorized,
                "invalid agent access token",
            ));
        }
        Ok(AgentToken(data.claims))
    }
}

/// Why a store refused an agent whose token was otherwise valid.
pub async fn explain_agent_refusal(state: &AppState, claims: &AgentClaims) -> ApiError {
    match state.store.agent(&claims.sub).await {
        Ok(Some(a)) if a.revoked_at.is_some() => ApiError::unauthorized(
            ErrorCode::AgentRevoked,
            format!(
                "agent {} was revoked: {}",
                a.id,
                a.revoked_reason
                    .unwrap_or_else(|| "no reason given".to_owned())
            ),
        ),
        Ok(Some(a)) => ApiError::unauthorized(
            ErrorCode::SessionRevoked,
            format!(
                "the session of agent {} was ended: {}",
                a.id,
                a.session_ended_reason
                    .unwrap_or_else(|| "superseded".to_owned())
            ),
        ),
        Ok(None) => ApiError::unauthorized(ErrorCode::AgentRevoked, "agent no longer exists"),
        Err(e) => e.into(),
    }
}

/// A logged-in user (session token) or a user's API token, with the role
/// and limits it acts under: never more than the user's own at the time
/// of the request, so a role change or a revocation counts at once.
#[derive(Debug, Clone)]
pub struct UserAuth {
    pub user_id: String,
    pub username: String,
    /// The role this request acts with: the token's, capped by the user's.
    pub role: Role,
    /// The user's scope and, on top, the token's.
    pub limits: crate::access::Limits,
    /// The token presented.
    pub token_id: String,
    /// The token's own scope (everywhere for sessions).
    pub token_scope: drover_proto::access::Scope,
}

impl FromRequestParts<AppState> for UserAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(user) = parts.extensions.get::<UserAuth>() {
            return Ok(user.clone());
        }
        let token = bearer(parts)?.to_owned();
        authenticate_user(parts, state, &token).await
    }
}

/// Checks a user's token (a session or an API token) the way every
/// request is checked — known, not revoked, not expired, rate limits, the
/// user not disabled — and notes the user for the audit entry. The API
/// presents it as a bearer token, the dashboard as its session cookie.
pub async fn authenticate_user(
    parts: &mut Parts,
    state: &AppState,
    token: &str,
) -> Result<UserAuth, ApiError> {
    let found = state.store.user_token_by_hash(&hash_token(token)).await?;
    let Some((t, user)) = found else {
        return Err(ApiError::unauthorized(
            ErrorCode::Unauthorized,
            "unknown token: log in again",
        ));
    };
    if t.revoked_at.is_some() {
        return Err(ApiError::unauthorized(
            ErrorCode::Unauthorized,
            "token was revoked",
        ));
    }
    if t.expires_at.is_some_and(|e| e <= Utc::now()) {
        return Err(ApiError::unauthorized(
            ErrorCode::TokenExpired,
            "token expired: run drover login again",
        ));
    }
    crate::routes::audit::Audit::set_actor(parts, &user.username);
    if let Err(limited) = state.limiter.check(&user.id, &t.id) {
        state.metrics.rate_limited(limited.limit);
        crate::routes::audit::Audit::skip_call(parts, axum::http::StatusCode::TOO_MANY_REQUESTS);
        return Err(ApiError::rate_limited(
            format!(
                "too many requests for this {}: retry after the Retry-After header",
                limited.limit
            ),
            limited.retry_after,
        ));
    }
    if user.disabled_at.is_some() {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            ErrorCode::UserDisabled,
            format!("user '{}' is disabled", user.username),
        ));
    }
    let role = match t.role {
        Some(r) if !r.at_least(user.role) => r,
        _ => user.role,
    };
    let auth = UserAuth {
        limits: crate::access::Limits::of(&user.scope, &t.scope),
        user_id: user.id,
        username: user.username,
        role,
        token_id: t.id,
        token_scope: t.scope,
    };
    parts.extensions.insert(auth.clone());
    Ok(auth)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_random_and_hashed() {
        let a = new_token(TokenPrefix::Bootstrap).unwrap();
        let b = new_token(TokenPrefix::Bootstrap).unwrap();
        assert!(a.starts_with("drv_b_"));
        assert_ne!(a, b);
        assert_eq!(a.len(), 6 + 43);
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), hash_token(&b));
    }

    #[test]
    fn csrf_tokens_belong_to_one_session_and_one_key() {
        let key = SigningKey::from_bytes(&[7; 32]).unwrap();
        let other_key = SigningKey::from_bytes(&[8; 32]).unwrap();
        let (a, b) = (hash_token("drv_s_a"), hash_token("drv_s_b"));
        let t = key.csrf_token(&a);
        assert_eq!(t.len(), 64);
        assert!(key.csrf_valid(&a, &t));
        assert!(!key.csrf_valid(&b, &t), "another session's token");
        assert!(!other_key.csrf_valid(&a, &t), "another server key");
        assert!(!key.csrf_valid(&a, ""));
        assert!(!key.csrf_valid(&a, "zz"));
        assert!(!key.csrf_valid(&a, &t[..62]));
        // Not the refresh-token successor of the same input.
        assert!(!key.successor_refresh_token(&a).contains(&t));
    }

    #[test]
    fn passwords_verify_only_themselves() {
        let h = hash_password("correct horse").unwrap();
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("correct horse", "not a hash"));
    }

    #[test]
    fn reused_memory_checks_like_a_fresh_one() {
        let h = hash_password("correct horse").unwrap();
        let mut memory = Vec::new();
        assert!(verify_password_in("correct horse", &h, &mut memory));
        let grown = memory.len();
        assert_eq!(grown, Params::DEFAULT_M_COST as usize);
        assert!(!verify_password_in("wrong", &h, &mut memory));
        assert!(verify_password_in("correct horse", &h, &mut memory));
        assert_eq!(memory.len(), grown);
        // A hash made by the library's own verifier path still matches.
        let parsed = PasswordHash::new(&h).unwrap();
        assert!(argon2::PasswordVerifier::verify_password(
            &Argon2::default(),
            b"correct horse",
            &parsed
        )
        .is_ok());
    }

    #[test]
    fn signing_key_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/signing.key");
        let k1 = SigningKey::load_or_create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let k2 = SigningKey::load_or_create(&path).unwrap();
        let now = Utc::now();
        let t = issue_agent_token(&k1, "a", "s", now, now + chrono::Duration::minutes(1)).unwrap();
        let v = Validation::new(Algorithm::HS256);
        assert!(jsonwebtoken::decode::<AgentClaims>(&t, &k2.decoding, &v).is_ok());
        std::fs::write(&path, "zz").unwrap();
        assert!(matches!(
            SigningKey::load_or_create(&path),
            Err(SecretError::KeyCorrupt { .. })
        ));
    }
}
