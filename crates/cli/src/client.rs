//! A small typed client of the REST API for the CLI.

use anyhow::{anyhow, Context};
use drover_agent::tls::Pin;
use drover_proto::{ErrorBody, API_PREFIX};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The server to talk to and the token to present.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    pub server: String,
    token: Option<String>,
    /// The server's pin as given (kept in the profile by `drover login`).
    pub trust: crate::ops::Trust,
    pin: Option<Pin>,
}

/// A refusal from the server, with its stable code.
#[derive(Debug, thiserror::Error)]
#[error("{message} ({code}, HTTP {status})")]
pub struct ApiFailure {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl Api {
    pub fn new(
        server: &str,
        token: Option<String>,
        mut trust: crate::ops::Trust,
    ) -> anyhow::Result<Api> {
        if let Some(path) = &trust.ca_file {
            trust.ca_file = Some(std::path::absolute(path).unwrap_or_else(|_| path.clone()));
        }
        let pin = Pin::configured(trust.ca_file.as_deref(), trust.ca_fingerprint.as_deref())?;
        let server = server.trim_end_matches('/').to_owned();
        let http = Self::builder(&server, pin.as_ref())?
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            http,
            server,
            token,
            trust,
            pin,
        })
    }

    /// A client builder that trusts what the pin says (the public web
    /// roots without one; with one, never plain HTTP).
    fn builder(server: &str, pin: Option<&Pin>) -> anyhow::Result<reqwest::ClientBuilder> {
        let builder =
            reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(10));
        drover_agent::tls::apply(builder, server, pin).map_err(|e| anyhow!(e))
    }

    fn require_token(&self) -> anyhow::Result<&str> {
        self.token.as_deref().ok_or_else(|| {
            anyhow!(
                "not logged in to {}: run drover login (or set DROVER_TOKEN)",
                self.server
            )
        })
    }

    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Req>,
        authenticated: bool,
    ) -> anyhow::Result<Resp> {
        let url = format!("{}{API_PREFIX}{path}", self.server);
        let mut req = self.http.request(method, &url);
        if authenticated {
            req = req.bearer_auth(self.require_token()?);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| self.send_error(e))?;
        Self::refusal(resp)
            .await?
            .json()
            .await
            .with_context(|| format!("unexpected answer from {url}"))
    }

    pub async fn get<Resp: DeserializeOwned>(&self, path: &str) -> anyhow::Result<Resp> {
        self.call::<(), Resp>(Method::GET, path, None, true).await
    }

    pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
    ) -> anyhow::Result<Resp> {
        self.call(Method::POST, path, Some(body), true).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let url = format!("{}{API_PREFIX}{path}", self.server);
        let resp = self
            .http
            .delete(&url)
            .bearer_auth(self.require_token()?)
            .send()
            .await
            .map_err(|e| self.reach_error(e))?;
        Self::refusal(resp).await.map(drop)
    }

    /// A GET whose answer is read as it comes (downloads, event streams):
    /// no overall timeout, only the connect timeout.
    pub async fn open(
        &self,
        path: &str,
        headers: &[(&str, String)],
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{API_PREFIX}{path}", self.server);
        let client = Self::builder(&self.server, self.pin.as_ref())?
            .build()
            .context("building the HTTP client")?;
        let mut req = client.get(&url).bearer_auth(self.require_token()?);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = req.send().await.map_err(|e| self.reach_error(e))?;
        Self::refusal(resp).await
    }

    /// A request without a body that failed: an untrusted certificate, or
    /// a server out of reach.
    fn reach_error(&self, e: reqwest::Error) -> anyhow::Error {
        match drover_agent::tls::untrusted(&e) {
            Some(why) => anyhow!("{why} (server {})", self.server),
            None => {
                anyhow::Error::new(e).context(format!("cannot reach the server at {}", self.server))
            }
        }
    }

    /// What a failed send means to the user: the server could not be
    /// reached, or it closed the connection while the request was sent
    /// (typically a body over its `max_body_bytes`, refused with 413 before
    /// it was read).
    fn send_error(&self, e: reqwest::Error) -> anyhow::Error {
        if let Some(why) = drover_agent::tls::untrusted(&e) {
            return anyhow!("{why} (server {})", self.server);
        }
        if e.is_connect() || e.is_timeout() {
            anyhow::Error::new(e).context(format!("cannot reach the server at {}", self.server))
        } else {
            anyhow::Error::new(e).context(format!(
                "the server at {} closed the connection while the request was sent \
                 (is it larger than the server accepts? see its max_body_bytes)",
                self.server
            ))
        }
    }

    /// Passes a 2xx answer through; turns any other into an error.
    async fn refusal(resp: reqwest::Response) -> anyhow::Result<reqwest::Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => ApiFailure {
                status: status.as_u16(),
                code: b.error.code.to_string(),
                message: b.error.message,
            }
            .into(),
            Err(_) => anyhow!("server answered {status}: {}", text.trim()),
        })
    }

    pub async fn patch<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
    ) -> anyhow::Result<Resp> {
        self.call(Method::PATCH, path, Some(body), true).await
    }
}

/// A name or id as one path segment: letters, digits and `-_.@` (what ids
/// and user names are made of) as they are, anything else percent-encoded,
/// so a value can never change the path. Empty or only dots (`..` would
/// climb a level) is refused.
pub fn segment(s: &str) -> anyhow::Result<String> {
    if s.bytes().all(|b| b == b'.') {
        anyhow::bail!("'{s}' is not a name or id");
    }
    Ok(s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn segments_never_change_the_path() {
        assert_eq!(segment("ana.b@x-1_2").unwrap(), "ana.b@x-1_2");
        assert_eq!(segment("a/../b?c#d").unwrap(), "a%2F..%2Fb%3Fc%23d");
        for climbing in ["", ".", ".."] {
            assert!(segment(climbing).is_err(), "{climbing:?}");
        }
    }
}
