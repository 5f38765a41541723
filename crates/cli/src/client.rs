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

    /// The token to present. Without one, the server is tried first: an
    /// operator told to log in to a server that is not running would chase
    /// the wrong problem.
    async fn require_token(&self) -> anyhow::Result<&str> {
        if let Some(token) = self.token.as_deref() {
            return Ok(token);
        }
        let probe = self
            .http
            .get(format!("{}/healthz", self.server))
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await;
        if let Err(e) = probe {
            return Err(self.reach_error(e));
        }
        Err(anyhow!(
            "not logged in to {}: run drover login (or set DROVER_TOKEN)",
            self.server
        ))
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
            req = req.bearer_auth(self.require_token().await?);
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
            .bearer_auth(self.require_token().await?)
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
        let mut req = client.get(&url).bearer_auth(self.require_token().await?);
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
            None => anyhow!(
                "cannot reach the server at {}: {}",
                self.server,
                unreachable_why(&e)
            ),
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
            self.reach_error(e)
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

/// Why a connection failed, in the operator's words: the innermost cause
/// (`connection refused`), with a hint where there is an obvious one.
fn unreachable_why(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "no answer in time (is the address right, and the port open?)".to_owned();
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut innermost = e.to_string();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    return "connection refused (is `drover server` running?)".to_owned()
                }
                std::io::ErrorKind::TimedOut => {
                    return "no answer in time (is the address right, and the port open?)"
                        .to_owned()
                }
                _ => {}
            }
        }
        innermost = s.to_string();
        source = s.source();
    }
    let lower = innermost.to_lowercase();
    if lower.contains("dns") || lower.contains("name or service not known") {
        format!("cannot resolve its host name ({innermost})")
    } else {
        innermost
    }
}

/// The server URL as given by a flag or variable: `http[s]://HOST[:PORT]`
/// as it is, `HOST:PORT` as `http://HOST:PORT`; anything else is refused
/// with the value named (not left to the HTTP client's words).
pub fn server_url(given: &str) -> anyhow::Result<String> {
    let given = given.trim();
    let bad = || {
        anyhow!(
            "'{given}' is not a server URL: give http://HOST:PORT, https://HOST:PORT or HOST:PORT"
        )
    };
    let scheme_less = !given.contains("://");
    // Without a scheme, only HOST or HOST:PORT: no path, no empty port.
    if given.chars().any(char::is_whitespace)
        || (scheme_less && (given.contains('/') || given.ends_with(':')))
    {
        return Err(bad());
    }
    let with_scheme = if scheme_less {
        format!("http://{given}")
    } else {
        given.to_owned()
    };
    let url = reqwest::Url::parse(&with_scheme).map_err(|_| bad())?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none_or(str::is_empty)
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
    {
        return Err(bad());
    }
    Ok(with_scheme.trim_end_matches('/').to_owned())
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
    fn server_urls_take_a_scheme_or_default_to_http() {
        let cases = [
            ("http://127.0.0.1:7070", Some("http://127.0.0.1:7070")),
            (
                "https://drover.example:7070/",
                Some("https://drover.example:7070"),
            ),
            ("127.0.0.1:7070", Some("http://127.0.0.1:7070")),
            ("localhost:7070", Some("http://localhost:7070")),
            ("[::1]:7070", Some("http://[::1]:7070")),
            (" drover.example ", Some("http://drover.example")),
            ("ftp://drover.example", None),
            ("http://", None),
            ("not a url", None),
            ("", None),
            ("http://h:7070/?x=1", None),
            ("127.0.0.1:notaport", None),
            ("htp:/x y", None),
            ("drover.example:", None),
            ("drover.example/api", None),
            (
                "https://drover.example/drover",
                Some("https://drover.example/drover"),
            ),
        ];
        for (given, want) in cases {
            match (server_url(given), want) {
                (Ok(got), Some(want)) => assert_eq!(got, want, "{given:?}"),
                (Err(e), None) => assert!(e.to_string().contains(given.trim()), "{e}"),
                (got, want) => panic!("{given:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn segments_never_change_the_path() {
        assert_eq!(segment("ana.b@x-1_2").unwrap(), "ana.b@x-1_2");
        assert_eq!(segment("a/../b?c#d").unwrap(), "a%2F..%2Fb%3Fc%23d");
        for climbing in ["", ".", ".."] {
            assert!(segment(climbing).is_err(), "{climbing:?}");
        }
    }
}
