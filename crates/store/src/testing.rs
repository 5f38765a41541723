//! Throwaway databases for tests, on both engines.
//!
//! PostgreSQL comes from the cluster named by `DROVER_TEST_POSTGRES_URL`,
//! which `scripts/test` starts. A test that needs it fails loudly when the
//! variable is missing: it never skips.

use sqlx::Connection;

use crate::{Backend, Options, Store};

/// Names the variable that holds the admin URL of the test PostgreSQL cluster.
pub const POSTGRES_URL_VAR: &str = "DROVER_TEST_POSTGRES_URL";

/// A fresh, empty database that lives as long as this value.
#[derive(Debug)]
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A SQLite file in a new temp dir.
    pub fn sqlite() -> TestDb {
        #[allow(clippy::expect_used)]
        let dir = tempfile::tempdir().expect("create temp dir");
        let url = format!("sqlite://{}", dir.path().join("drover.db").display());
        TestDb {
            backend: Backend::Sqlite,
            url,
            _dir: Some(dir),
        }
    }

    /// A new database on the test PostgreSQL cluster.
    #[allow(clippy::expect_used, clippy::panic)]
    pub async fn postgres() -> TestDb {
        let admin = std::env::var(POSTGRES_URL_VAR).unwrap_or_else(|_| {
            panic!("{POSTGRES_URL_VAR} is not set: run the tests through scripts/test, which starts PostgreSQL")
        });
        let name = format!("drover_t_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", crate::redact(&admin)));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let _ = conn.close().await;
        TestDb {
            backend: Backend::Postgres,
            url: with_database(&admin, &name),
            _dir: None,
        }
    }

    /// A fresh database on the given engine.
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => TestDb::sqlite(),
            Backend::Postgres => TestDb::postgres().await,
        }
    }

    /// Opens the store (and applies migrations).
    #[allow(clippy::expect_used)]
    pub async fn open(&self) -> Store {
        Store::open(&Options {
            url: self.url.clone(),
            max_connections: 4,
        })
        .await
        .expect("open test store")
    }
}

/// Both engines, for tests that must pass on each.
pub const BACKENDS: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

/// Replaces the database name in a PostgreSQL URL.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{host_part}/{name}?{q}"),
        None => format!("{host_part}/{name}"),
    }
}

/// Runs one statement on a database behind the server's back, as someone
/// with access to the database file or server could: for tests that
/// tamper with rows. Returns the rows it changed.
#[allow(clippy::expect_used, clippy::panic)]
pub async fn tamper(url: &str, sql: &str) -> u64 {
    if url.starts_with("postgres") {
        let mut conn = sqlx::PgConnection::connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", crate::redact(url)));
        let n = sqlx::query(sql)
            .execute(&mut conn)
            .await
            .expect("tamper")
            .rows_affected();
        let _ = conn.close().await;
        n
    } else {
        let mut conn = sqlx::SqliteConnection::connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        let n = sqlx::query(sql)
            .execute(&mut conn)
            .await
            .expect("tamper")
            .rows_affected();
        let _ = conn.close().await;
        n
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_database_name() {
        use super::with_database;
        assert_eq!(
            with_database("postgres://u@h:1/postgres", "x"),
            "postgres://u@h:1/x"
        );
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
        assert_eq!(
            with_database("postgres://u@h:1/p?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
    }
}
