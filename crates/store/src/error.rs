use thiserror::Error;

/// Everything that can go wrong in the store.
#[derive(Debug, Error)]
pub enum Error {
    #[error("invalid database URL {0}")]
    InvalidUrl(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored {what} is corrupt: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("{what} '{id}' not found")]
    NotFound { what: &'static str, id: String },
    #[error("{what} id prefix '{prefix}' is ambiguous")]
    Ambiguous { what: &'static str, prefix: String },
    #[error("{what} already exists")]
    Conflict { what: &'static str },
    /// The store cannot write right now (its writer lost its connection);
    /// nothing was changed.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The commit did not reach the disk; nothing of the transaction
    /// was kept.
    #[error("commit failed: {0}")]
    CommitFailed(String),
}

impl Error {
    /// True when a unique or primary-key constraint refused a write.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            Error::Database(sqlx::Error::Database(db)) => db.is_unique_violation(),
            Error::Conflict { .. } => true,
            _ => false,
        }
    }
}
