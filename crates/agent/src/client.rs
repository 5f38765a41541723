//! The agent's side of the protocol over HTTP. Outbound connections only.

use std::time::Duration;

use drover_proto::agent::{
    Credentials, EnrollRequest, EnrollResponse, HeartbeatRequest, HeartbeatResponse, RefreshRequest,
};
use drover_proto::jobs::{
    AttemptResult, LeaseRequest, LeaseResponse, LogUpload, PollRequest, PollResponse, ResultAck,
    StartRequest,
};
use drover_proto::{ErrorBody, ErrorCode, API_PREFIX};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the server at {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    /// The server's certificate does not match the pin (or the roots).
    #[error("{message} (server {url})")]
    Untrusted { url: String, message: String },
    #[error("server answered {status}: {code}: {message}")]
    Refused {
        status: u16,
        code: ErrorCode,
        message: String,
        /// From a 429/503 Retry-After header.
        retry_after: Option<Duration>,
    },
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
}

impl ClientError {
    /// True when the credentials can never work again.
    pub fn is_terminal(&self) -> bool {
        matches!(self, ClientError::Refused { status: 401, code, .. } if code.is_terminal_for_agent())
    }

    pub fn is_token_expired(&self) -> bool {
        matches!(
            self,
            ClientError::Refused {
                code: ErrorCode::TokenExpired,
                ..
            }
        )
    }

    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A client for one server.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

/// A failed send: an untrusted certificate, or an unreachable server.
fn send_failed(url: &str, source: reqwest::Error) -> ClientError {
    match crate::tls::untrusted(&source) {
        Some(message) => ClientError::Untrusted {
            url: url.to_owned(),
            message,
        },
        None => ClientError::Unreachable {
            url: url.to_owned(),
            source,
        },
    }
}

impl Client {
    /// A client for `server`, trusting only what `pin` says over HTTPS
    /// (the public web roots without one); a pin refuses plain HTTP.
    pub fn new(server: &str, pin: Option<&crate::tls::Pin>) -> Result<Client, ClientError> {
        let builder = crate::tls::apply(reqwest::Client::builder(), server, pin)
            .map_err(ClientError::Protocol)?;
        let http = builder
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            // Idle connections are dropped quickly so that a moved server
            // (new address behind the same name) is found on reconnect.
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("drover-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Protocol(format!("building the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base: server.trim_end_matches('/').to_owned(),
        })
    }

    pub fn server(&self) -> &str {
        &self.base
    }

    async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: &Req,
    ) -> Result<Resp, ClientError> {
        let (url, resp) = self.send(path, bearer, body, None).await?;
        resp.json()
            .await
            .map_err(|e| ClientError::Protocol(format!("{url}: {e}")))
    }

    /// For answers whose body carries nothing the agent needs.
    async fn post_ignoring_body<Req: Serialize>(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: &Req,
    ) -> Result<(), ClientError> {
        self.send(path, bearer, body, None).await.map(drop)
    }

    /// Sends one request and turns a non-2xx answer into `Refused`.
    /// `timeout` replaces the client's 30 s for this one request.
    async fn send<Req: Serialize>(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: &Req,
        timeout: Option<Duration>,
    ) -> Result<(String, reqwest::Response), ClientError> {
        let url = format!("{}{API_PREFIX}{path}", self.base);
        let mut req = self.http.post(&url).json(body);
        if let Some(token) = bearer {
            req = req.bearer_auth(token);
        }
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = req.send().await.map_err(|e| send_failed(&url, e))?;
        Self::check(url, resp).await
    }

    /// Turns a non-2xx answer into `Refused`, with the server's code.
    async fn check(
        url: String,
        resp: reqwest::Response,
    ) -> Result<(String, reqwest::Response), ClientError> {
        let status = resp.status();
        if status.is_success() {
            return Ok((url, resp));
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = resp.text().await.unwrap_or_default();
        let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => (b.error.code, b.error.message),
            Err(_) => (ErrorCode::Unknown, text.chars().take(200).collect()),
        };
        Err(ClientError::Refused {
            status: status.as_u16(),
            code,
            message,
            retry_after,
        })
    }

    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, ClientError> {
        self.post("/agent/enroll", None, req).await
    }

    pub async fn refresh(&self, refresh_token: &str) -> Result<Credentials, ClientError> {
        let req = RefreshRequest {
            refresh_token: refresh_token.to_owned(),
        };
        self.post("/agent/refresh", None, &req).await
    }

    pub async fn heartbeat(
        &self,
        access_token: &str,
        req: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ClientError> {
        self.post("/agent/heartbeat", Some(access_token), req).await
    }

    /// Long-polls for work; the server may hold it up to `req.wait_ms`, so
    /// the request may take `timeout`, which must exceed that.
    pub async fn poll(
        &self,
        access_token: &str,
        req: &PollRequest,
        timeout: Duration,
    ) -> Result<PollResponse, ClientError> {
        let (url, resp) = self
            .send("/agent/poll", Some(access_token), req, Some(timeout))
            .await?;
        resp.json()
            .await
            .map_err(|e| ClientError::Protocol(format!("{url}: {e}")))
    }

    /// `attempt_id` must have passed `jobs::valid_attempt_id`: it goes
    /// into the path as is.
    pub async fn start(
        &self,
        access_token: &str,
        attempt_id: &str,
        req: &StartRequest,
    ) -> Result<(), ClientError> {
        let path = format!("/agent/attempts/{attempt_id}/start");
        self.post_ignoring_body(&path, Some(access_token), req)
            .await
    }

    pub async fn logs(
        &self,
        access_token: &str,
        attempt_id: &str,
        req: &LogUpload,
    ) -> Result<(), ClientError> {
        let path = format!("/agent/attempts/{attempt_id}/logs");
        self.post_ignoring_body(&path, Some(access_token), req)
            .await
    }

    pub async fn leases(
        &self,
        access_token: &str,
        req: &LeaseRequest,
    ) -> Result<LeaseResponse, ClientError> {
        self.post("/agent/leases", Some(access_token), req).await
    }

    /// Streams one file of an attempt to the artifact store. `path` is
    /// the declared (relative) path; `sha256` the hex digest of the file.
    pub async fn upload_artifact(
        &self,
        access_token: &str,
        attempt_id: &str,
        path: &str,
        sha256: &str,
        file: &std::fs::File,
    ) -> Result<ResultAck, ClientError> {
        use std::io::Seek;
        let url = format!(
            "{}{API_PREFIX}/agent/attempts/{attempt_id}/artifacts",
            self.base
        );
        // The file was opened (beneath the working dir, as the attempt's
        // user) by the caller; each try reads it from its start.
        let f = file
            .try_clone()
            .and_then(|mut f| f.rewind().map(|()| f))
            .map_err(|e| ClientError::Protocol(format!("cannot read artifact '{path}': {e}")))?;
        let len = f.metadata().map(|m| m.len()).ok();
        let f = tokio::fs::File::from_std(f);
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f));
        let mut req = self
            .http
            .put(&url)
            .query(&[("path", path)])
            .bearer_auth(access_token)
            .header(drover_proto::workflows::SHA256_HEADER, sha256)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            // Large files take longer than the usual 30 s.
            .timeout(Duration::from_secs(3600))
            .body(body);
        if let Some(len) = len {
            req = req.header(reqwest::header::CONTENT_LENGTH, len);
        }
        let resp = req.send().await.map_err(|e| send_failed(&url, e))?;
        let (url, resp) = Self::check(url, resp).await?;
        resp.json()
            .await
            .map_err(|e| ClientError::Protocol(format!("{url}: {e}")))
    }

    pub async fn result(
        &self,
        access_token: &str,
        req: &AttemptResult,
    ) -> Result<ResultAck, ClientError> {
        let path = format!("/agent/attempts/{}/result", req.attempt_id);
        self.post(&path, Some(access_token), req).await
    }
}
