//! The bounds of the agent protocol that the server and the agents must
//! agree on, each defined once.
//!
//! Key design decision: a bound that one side checks and the other must
//! stay within lives here, never as two constants that can drift apart.
//! A value the server prescribes at run time (the lease, the log cap, the
//! heartbeat interval) travels in its answers instead; what is here are
//! the defaults and limits around those values.

use std::time::Duration;

/// Longest the server holds a poll: a longer `PollRequest::wait_ms` is cut
/// down to it, so one request never ties up a connection for long.
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(30);

/// How long an agent asks the server to hold its poll (`wait_ms`). Below
/// `MAX_POLL_WAIT`, so the server holds it for exactly what the agent
/// asked, and the agent's HTTP timeout (this wait plus a margin for the
/// network) is derived from a wait it knows.
pub const POLL_WAIT: Duration = Duration::from_secs(25);

const _: () = assert!(POLL_WAIT.as_millis() <= MAX_POLL_WAIT.as_millis());

/// Most attempts an agent runs at once: the largest `capacity` an agent
/// takes from its configuration and the server takes in a poll, and the
/// most attempt ids of one lease renewal (an agent renews what it runs).
/// Each attempt holds processes, pipes and a log buffer on the agent, so
/// a typo such as 10000 is refused rather than taken at its word.
pub const MAX_CAPACITY: u32 = 256;

/// Most attempt ids an agent lists in `PollRequest::known`. Above
/// `MAX_CAPACITY`, so an agent can list all it runs and then some of the
/// results in its outbox; with more, it sends no list at all.
pub const MAX_KNOWN_ATTEMPTS: usize = 1000;

const _: () = assert!(MAX_KNOWN_ATTEMPTS >= MAX_CAPACITY as usize);

/// Largest `data` of one log upload, in bytes: the server refuses a larger
/// one (413), and the agent cuts its output into chunks of at most this.
pub const MAX_LOG_CHUNK: usize = 64 * 1024;

/// Bytes the server stores per stream beyond an attempt's `log_cap_bytes`:
/// room for the marker the agent appends where it cut the output at the
/// cap (the agent counts its other markers within the cap). Without it
/// the chunk with the marker would be refused as over the cap.
pub const LOG_MARKER_ROOM: u64 = 1024;

/// The lease of a dispatched attempt unless the server is configured
/// otherwise, and the one an agent assumes when an answer gives none
/// (`lease_ms` 0). The agent renews every third of it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Shortest lease: the server refuses a shorter `attempt_lease`, and an
/// agent takes a shorter `lease_ms` as this, since renewing more often than
/// every third of it would only load the server.
pub const MIN_LEASE: Duration = Duration::from_secs(1);

const _: () = assert!(MIN_LEASE.as_millis() <= DEFAULT_LEASE.as_millis());

/// Longest `error` of an attempt's result, in bytes. The server refuses a
/// result with a longer one (400), which the agent would then set aside
/// for good, so the agent cuts its texts to fit before it stores them.
pub const MAX_RESULT_ERROR: usize = 4096;
