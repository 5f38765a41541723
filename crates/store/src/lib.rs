//! Drover's durable state: one `Store` over SQLite (embedded default, WAL)
//! or PostgreSQL (production, several server replicas).
//!
//! Key design decision: the SQL is written once, in the portable subset both
//! engines share (`$N` parameters, `RETURNING`, `ON CONFLICT`, integer
//! millisecond timestamps, text ids and JSON-as-text), and every method
//! dispatches it to whichever pool is open through `on_pool!`. Where the
//! engines differ (locking, notifications) a method says so in a `match`.
//! Every state change happens in one transaction that starts with its write,
//! so SQLite never has to upgrade a read lock.
//!
//! This is the only crate that knows SQL; callers see plain Rust types.

mod agents;
pub mod approvals;
pub mod audit;
mod auth;
mod error;
pub mod fleet;
pub mod jobs;
pub mod notify;
pub mod policies;
pub mod schedules;
pub mod scripts;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tx;
pub mod vault;
pub mod workflows;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, PgPool, SqlitePool};

pub use agents::{
    AgentCounts, AgentHealth, AgentRecord, EnrollOutcome, HealthCut, NewAgent, RefreshOutcome,
    RefreshRotation,
};
pub use auth::{
    BootstrapToken, NewBootstrapToken, NewUserToken, TokenListing, User, UserChange, UserToken,
};
pub use error::Error;
pub use sqlx::Error as SqlxError;
pub use tx::{Changes, CommitHook, StatsSnapshot, Tx};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which database engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        })
    }
}

#[derive(Debug, Clone)]
enum Pool {
    /// Readers share a pool of read-only connections; every write goes
    /// through the one writer (see `tx`).
    Sqlite {
        read: SqlitePool,
        writer: Arc<tx::Writer>,
    },
    Postgres(PgPool),
}

/// Runs the same read against whichever pool is open. The body is compiled
/// once per engine, so sqlx checks the types for both. Counts one
/// statement. Writes go through a `Tx` (`on_tx!`).
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {{
        $store.shared.stats.statement();
        match &$store.pool {
            $crate::Pool::Sqlite { read: $pool, .. } => $body,
            $crate::Pool::Postgres($pool) => $body,
        }
    }};
}
pub(crate) use on_pool;

/// Runs one write in a transaction of its own and commits it; evaluates
/// to the body's value.
macro_rules! on_write {
    ($store:expr, $c:ident => $body:expr) => {{
        let mut tx = $store.begin().await?;
        let out = $crate::tx::on_tx!(&mut tx, $c => $body)?;
        tx.commit().await?;
        Ok::<_, $crate::Error>(out)
    }};
}
pub(crate) use on_write;

/// Handle to the database. Cheap to clone; all clones share one pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    shared: Arc<tx::Shared>,
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct Options {
    /// `sqlite://path/to/file.db` or `postgres://user:pass@host:port/db`.
    pub url: String,
    /// Upper bound of open connections.
    pub max_connections: u32,
}

impl Store {
    /// Opens the database named by the URL, creating a SQLite file when it
    /// is missing, and applies the embedded migrations.
    pub async fn open(options: &Options) -> Result<Store> {
        let url = options.url.as_str();
        let pool = if url.starts_with("sqlite:") {
            let connect = SqliteConnectOptions::from_str(url)
                .map_err(|e| Error::InvalidUrl(format!("{url}: {e}")))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // FULL: a commit is on disk before it is acknowledged, also
                // across power loss, not only across a process crash.
                .synchronous(SqliteSynchronous::Full)
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(10));
            // Migrations first, on a connection of their own, so that the
            // readers open a database that has its tables.
            {
                let mut conn = connect.connect().await?;
                sqlx::migrate!("./migrations/sqlite").run(&mut conn).await?;
                conn.close().await?;
            }
            let writer = tx::Writer::open(connect.clone()).await?;
            let read = SqlitePoolOptions::new()
                .max_connections(options.max_connections.max(1))
                // A file on this machine does not go away like a network
                // peer: no round trip to the connection's thread to ping
                // it before every read (half the thread hand-offs of a
                // read, measured in docs/BENCHMARKS.md).
                .test_before_acquire(false)
                .connect_with(connect.read_only(true))
                .await?;
            Pool::Sqlite {
                read,
                writer: Arc::new(writer),
            }
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let connect = PgConnectOptions::from_str(url)
                .map_err(|e| Error::InvalidUrl(format!("{}: {e}", redact(url))))?;
            let pool = PgPoolOptions::new()
                .max_connections(options.max_connections.max(1))
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(connect)
                .await?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            Pool::Postgres(pool)
        } else {
            return Err(Error::InvalidUrl(format!(
                "'{}' is neither a sqlite: nor a postgres: URL",
                redact(url)
            )));
        };
        let store = Store {
            pool,
            shared: Arc::new(tx::Shared::new()),
        };
        store.chain_audit_backlog().await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite { .. } => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// Why the store cannot write, while the last write failed in a way
    /// that says so (a full disk, an I/O error, a failed commit); `None`
    /// once a commit succeeded again.
    pub fn write_failure(&self) -> Option<String> {
        if !self.shared.stats.snapshot().write_failing {
            return None;
        }
        self.shared
            .stats
            .write_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Writes and commits a no-op change, to find out whether the store can
    /// write again (its success clears [`Store::write_failure`]).
    pub async fn probe_write(&self) -> Result<()> {
        let mut tx = self.begin().await?;
        crate::tx::on_tx!(&mut tx, c => sqlx::query("UPDATE fleet SET id = id WHERE id = 1")
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        tx.commit().await?;
        Ok(())
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<()> {
        on_pool!(self, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// Closes every connection, waiting for running queries.
    pub async fn close(&self) {
        if let Pool::Sqlite { writer, .. } = &self.pool {
            writer.close().await;
        }
        on_pool!(self, p => p.close().await)
    }
}

/// Hides the password of a database URL for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

pub(crate) fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn from_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://u:secret@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod store_tests;

/// Milliseconds since the epoch as a time, for raw columns callers read.
pub fn time_from_ms(ms: i64) -> DateTime<Utc> {
    from_ms(ms)
}
