//! The accept loop, with the limits `axum::serve` lacks: it waits for a
//! request forever, so a client that connects and sends nothing, half a
//! header or half a body holds its connection (and a file descriptor) for
//! good; about a thousand such sockets used up a 1,024-file limit and the
//! probes stopped answering. Here:
//!
//! - a connection waiting for a request is closed after `idle_timeout`
//!   (hyper's header-read timer, which runs whenever the connection waits
//!   for a request); once a request's first bytes came, its headers must be
//!   complete within `header_read_timeout`; a request body that sends
//!   nothing for `body_timeout` fails, which ends its connection. A request
//!   being answered (a long poll, an event stream) is never idle.
//! - at most `max_connections` are served, lowered to fit the open-file
//!   limit (whose soft value is raised towards the hard one at start) with
//!   `RESERVED_FDS` left for the server's own files. `HEADROOM` more are
//!   served one request each, with `HEADROOM_TIMEOUT`, so `/healthz` and
//!   `/readyz` still answer at the limit; beyond that a new connection is
//!   closed at once rather than left waiting in the kernel's queue.
//! - with TLS, the handshake runs on the connection's own task, holding its
//!   slot, and must be over within the header timeout: a client that starts
//!   one and stalls gives the slot back as one that stalls in its headers.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::Router;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Connections beyond `max_connections` kept for health checks.
pub const HEADROOM: usize = 64;

/// File descriptors left for everything but client connections: the
/// database pool, artifact files, outgoing webhooks and S3 calls.
pub const RESERVED_FDS: usize = 128;

/// Header and idle timeout of a connection in the headroom (which also
/// serves only one request).
const HEADROOM_TIMEOUT: Duration = Duration::from_secs(2);

/// The limits of client connections, from the server's configuration.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections served at once (before the headroom).
    pub max_connections: usize,
    /// Time for a request's headers, from their first byte.
    pub header_read_timeout: Duration,
    /// Time a connection may wait for a request.
    pub idle_timeout: Duration,
    /// Longest wait for the next part of a request body.
    pub body_timeout: Duration,
}

/// The client's address, for handlers; `None` when the router is driven
/// without a socket (tests).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

/// The connections that fit an open-file limit of `nofile`.
pub fn fit_to_fd_limit(wanted: usize, nofile: u64) -> usize {
    let room = nofile.saturating_sub((RESERVED_FDS + HEADROOM) as u64);
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    wanted.min(room).max(1)
}

/// Raises the soft open-file limit to `wanted`, never above the hard
/// limit (and not higher than needed: processes `drover up` starts inherit
/// it); returns the soft limit in force.
#[allow(unsafe_code)]
fn raise_fd_limit(wanted: u64) -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes into a struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur >= wanted || limit.rlim_cur >= limit.rlim_max {
        return Some(limit.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: wanted.min(limit.rlim_max),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit(2) reads a struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Some(limit.rlim_cur);
    }
    Some(raised.rlim_cur)
}

/// Serves `app` on `listener` (over TLS when given an acceptor) until
/// `shutdown` is cancelled, then lets the connections finish their
/// requests (long polls end on the same token).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &ConnectionLimits,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let wanted = (limits.max_connections + HEADROOM + RESERVED_FDS) as u64;
    let max = match raise_fd_limit(wanted) {
        Some(nofile) => {
            let fitted = fit_to_fd_limit(limits.max_connections, nofile);
            if fitted < limits.max_connections {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    open_file_limit = nofile,
                    serving = fitted,
                    "the open-file limit lowers the connection limit; raise it (ulimit -n, LimitNOFILE=)"
                );
            }
            fitted
        }
        None => limits.max_connections,
    };
    tracing::info!(
        max_connections = max,
        headroom = HEADROOM,
        "serving connections"
    );
    let regular = Arc::new(Semaphore::new(max));
    let spare = Arc::new(Semaphore::new(HEADROOM));
    // Every connection task holds a receiver; all gone means all done.
    let (all_closed, open) = watch::channel(());
    let mut last_refusal_logged: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors or the like: wait a little
                // rather than spin.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
        };
        let (slot, headroom) = match regular.clone().try_acquire_owned() {
            Ok(slot) => (slot, false),
            Err(_) => match spare.clone().try_acquire_owned() {
                Ok(slot) => (slot, true),
                Err(_) => {
                    if last_refusal_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(
                            max_connections = max,
                            headroom = HEADROOM,
                            "at the connection limit: closing new connections"
                        );
                        last_refusal_logged = Some(Instant::now());
                    }
                    drop(stream);
                    continue;
                }
            },
        };
        tokio::spawn(serve_connection(Connection {
            stream,
            peer,
            slot,
            headroom,
            tls: tls.clone(),
            app: app.clone(),
            limits: limits.clone(),
            shutdown: shutdown.clone(),
            _open: open.clone(),
        }));
    }
    drop(open);
    drop(listener);
    all_closed.closed().await;
}

fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// One accepted connection and what serving it needs.
struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
    headroom: bool,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    _open: watch::Receiver<()>,
}

async fn serve_connection(c: Connection) {
    let _ = c.stream.set_nodelay(true);
    let peer = c.peer;
    let (header_timeout, idle_timeout) = if c.headroom {
        (
            c.limits.header_read_timeout.min(HEADROOM_TIMEOUT),
            c.limits.idle_timeout.min(HEADROOM_TIMEOUT),
        )
    } else {
        (c.limits.header_read_timeout, c.limits.idle_timeout)
    };
    let stream = match &c.tls {
        None => Stream::Plain(c.stream),
        Some(acceptor) => {
            let handshake = tokio::time::timeout(header_timeout, acceptor.accept(c.stream));
            tokio::select! {
                done = handshake => match done {
                    Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "closing a connection whose TLS handshake came too slowly");
                        return;
                    }
                },
                _ = c.shutdown.cancelled() => return,
            }
        }
    };
    let activity = Arc::new(Activity::default());
    // The slot travels with the socket: a connection upgraded to a
    // WebSocket keeps it until the socket closes.
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
        _slot: c.slot,
    });
    let body_timeout = c.limits.body_timeout;
    let app = c.app;
    let requests = activity.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let busy = Busy::start(&requests);
        let mut req = req.map(|body| Body::new(TimedBody::new(body, body_timeout)));
        req.extensions_mut().insert(ConnectInfo(peer));
        let app = app.clone();
        async move {
            let response = app.oneshot(req).await?;
            Ok::<_, std::convert::Infallible>(response.map(|inner| Guarded { inner, _busy: busy }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout)
        .keep_alive(!c.headroom);
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let late_headers = header_deadline(activity, header_timeout);
    tokio::pin!(late_headers);
    let mut draining = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
                return;
            }
            _ = late_headers.as_mut() => {
                tracing::debug!(%peer, "closing a connection whose request headers came too slowly");
                return;
            }
            _ = c.shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Ends once a request's headers have been arriving for `timeout`.
async fn header_deadline(activity: Arc<Activity>, timeout: Duration) {
    loop {
        match activity.head_started() {
            None => activity.head_begun.notified().await,
            Some(started) => {
                tokio::time::sleep_until((started + timeout).into()).await;
                if activity.head_started() == Some(started) {
                    return;
                }
            }
        }
    }
}

/// What a connection is doing: requests being answered, and when the
/// headers of the next one began to arrive.
#[derive(Debug, Default)]
struct Activity {
    in_flight: AtomicUsize,
    head_started: Mutex<Option<Instant>>,
    head_begun: Notify,
}

impl Activity {
    fn head(&self) -> MutexGuard<'_, Option<Instant>> {
        self.head_started.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn head_started(&self) -> Option<Instant> {
        *self.head()
    }

    /// Bytes came in: with no request in progress, they begin headers.
    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Acquire) != 0 {
            return;
        }
        let mut head = self.head();
        if head.is_none() {
            *head = Some(Instant::now());
            drop(head);
            self.head_begun.notify_one();
        }
    }
}

/// A request in progress, from its complete headers until its response
/// body is dropped (sent, or the connection closed).
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: &Arc<Activity>) -> Busy {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        *activity.head() = None;
        Busy(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's byte stream: the socket, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The socket, noting reads for the header deadline and holding the
/// connection's slot.
struct Tracked {
    inner: Stream,
    activity: Arc<Activity>,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The request body has sent nothing for the body timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body sent nothing for {0:?}")]
pub struct BodyTimeout(Duration);

/// A request body that fails when its next part takes longer than the
/// timeout (between parts, so a long upload that keeps coming is fine).
struct TimedBody {
    inner: Incoming,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl TimedBody {
    fn new(inner: Incoming, timeout: Duration) -> TimedBody {
        TimedBody {
            inner,
            timeout,
            sleep: None,
        }
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        let e: Self::Error = Box::new(BodyTimeout(timeout));
                        Poll::Ready(Some(Err(e)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request counted as in progress.
struct Guarded {
    inner: Body,
    _busy: Busy,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_fits_the_open_file_limit() {
        let reserved = (RESERVED_FDS + HEADROOM) as u64;
        let cases = [
            (30_000, 1_048_576, 30_000),
            (30_000, 1024, 1024 - reserved as usize),
            (100, 1024, 100),
            (30_000, 10, 1),
        ];
        for (wanted, nofile, served) in cases {
            assert_eq!(fit_to_fd_limit(wanted, nofile), served, "{wanted} {nofile}");
        }
    }
}
