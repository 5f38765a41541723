//! The server's long-lived background tasks, named in one place and
//! supervised: each runs until shutdown; one that returns or panics before
//! then is logged, and the whole server stops with an error (a non-zero
//! exit), so a service manager restarts it instead of leaving it running
//! half-dead.
//!
//! | task | what it does | on shutdown |
//! |---|---|---|
//! | `reaper` | turns attempts whose lease ran out into `lost`, retries them | stops at once |
//! | `engine` | moves workflow runs forward | stops between passes |
//! | `webhooks` | sends due webhook deliveries | stops between deliveries |
//! | `schedules` | fires the slots of server-side schedules | stops between slots |
//! | `hub` | (PostgreSQL) hears other replicas' commits and wakes local waiters | stops at once |
//!
//! An error inside a task (a failed query, a refused delivery) is the
//! task's to log and retry; only its end is the supervisor's business.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

/// Names of the background tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    Reaper,
    Engine,
    Webhooks,
    Schedules,
    Hub,
}

impl TaskKind {
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Reaper => "reaper",
            TaskKind::Engine => "engine",
            TaskKind::Webhooks => "webhooks",
            TaskKind::Schedules => "schedules",
            TaskKind::Hub => "hub",
        }
    }
}

/// Why a background task ended before shutdown.
#[derive(Debug, thiserror::Error)]
pub enum TaskFailure {
    #[error("background task '{0}' ended unexpectedly")]
    Ended(&'static str),
    #[error("background task '{0}' panicked: {1}")]
    Panicked(&'static str, String),
}

/// Runs the background tasks and watches them.
#[derive(Debug)]
pub struct Supervisor {
    set: JoinSet<TaskKind>,
    names: HashMap<tokio::task::Id, TaskKind>,
    shutdown: CancellationToken,
}

impl Supervisor {
    pub fn new(shutdown: CancellationToken) -> Supervisor {
        Supervisor {
            set: JoinSet::new(),
            names: HashMap::new(),
            shutdown,
        }
    }

    /// Starts a task that should run until `shutdown` is cancelled.
    pub fn spawn<F>(&mut self, kind: TaskKind, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        tracing::debug!(task = kind.name(), "background task started");
        let handle = self.set.spawn(async move {
            task.await;
            kind
        });
        self.names.insert(handle.id(), kind);
    }

    /// Waits until a task ends; an end before shutdown is a failure.
    /// Never returns while every task runs.
    pub async fn watch(&mut self) -> TaskFailure {
        loop {
            let Some(joined) = self.set.join_next().await else {
                return std::future::pending().await;
            };
            let failure = match joined {
                Ok(kind) if self.shutdown.is_cancelled() => {
                    tracing::debug!(task = kind.name(), "background task stopped");
                    continue;
                }
                Ok(kind) => TaskFailure::Ended(kind.name()),
                Err(e) => {
                    let name = self.names.get(&e.id()).map_or("unknown", |k| k.name());
                    TaskFailure::Panicked(name, panic_message(e))
                }
            };
            tracing::error!(error = %failure, "stopping the server: a background task is gone");
            return failure;
        }
    }

    /// Waits for every task to stop after shutdown.
    pub async fn join_all(mut self) {
        while let Some(joined) = self.set.join_next().await {
            if let Err(e) = joined {
                if e.is_panic() {
                    tracing::error!(error = %e, "a background task panicked while stopping");
                }
            }
        }
    }
}

fn panic_message(e: JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-text panic".to_owned()),
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_early_is_a_failure() {
        let shutdown = CancellationToken::new();
        let mut s = Supervisor::new(shutdown.clone());
        let stop = shutdown.clone();
        s.spawn(TaskKind::Engine, async move { stop.cancelled().await });
        s.spawn(TaskKind::Reaper, async {});
        let failure = s.watch().await;
        assert!(matches!(failure, TaskFailure::Ended("reaper")), "{failure}");
    }

    #[tokio::test]
    async fn a_panic_is_a_failure_with_its_message() {
        let shutdown = CancellationToken::new();
        let mut s = Supervisor::new(shutdown.clone());
        s.spawn(TaskKind::Webhooks, async { panic!("boom") });
        let failure = s.watch().await;
        assert!(
            matches!(&failure, TaskFailure::Panicked("webhooks", m) if m == "boom"),
            "{failure}"
        );
    }

    #[tokio::test]
    async fn tasks_that_stop_at_shutdown_are_not_failures() {
        let shutdown = CancellationToken::new();
        let mut s = Supervisor::new(shutdown.clone());
        let stop = shutdown.clone();
        s.spawn(TaskKind::Hub, async move { stop.cancelled().await });
        shutdown.cancel();
        let watched = tokio::time::timeout(std::time::Duration::from_millis(200), s.watch()).await;
        assert!(watched.is_err(), "watch must not report a stop at shutdown");
    }
}
