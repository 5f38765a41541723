//! The transaction as a value: `Store::begin()` hands back a [`Tx`] over
//! either engine; domain steps are `Tx` methods that compose, and
//! [`Tx::commit`] makes them durable at once and says what changed.
//!
//! Key design decision: on SQLite every write goes through one writer
//! connection (SQLite has one writer anyway; queueing in tokio beats
//! sleeping in its busy handler) with group commit: a `Tx` is a savepoint
//! inside an outer transaction. When a `Tx` commits while others wait for
//! the writer, it hands the writer on and queues behind them; whoever finds
//! nobody waiting commits the outer transaction, so transactions arriving
//! together share one fsync. Each is acknowledged only once that commit
//! succeeded (`synchronous=FULL` stays). A failed statement rolls back to
//! its savepoint; a failed commit rolls the group back, fails every member
//! and drops the connection, which is opened again on the next write.
//! PostgreSQL transactions are plain pool transactions.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection, SqliteConnection};

use crate::{Error, Result, Store};

/// What a committed transaction changed: drives every wake-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Jobs whose state or attempts changed.
    pub jobs: BTreeSet<String>,
    /// Jobs that reached a final state (also in `jobs`).
    pub ended: BTreeSet<String>,
    /// Jobs whose output grew.
    pub logs: BTreeSet<String>,
    /// Agents that may have work or a cancel to pick up.
    pub agents: BTreeSet<String>,
    /// Every agent may have something to pick up (fleet stop, resume).
    pub all_agents: bool,
    /// Runs that need the engine's attention.
    pub runs: BTreeSet<String>,
    /// Runs whose event stream grew.
    pub run_events: BTreeSet<String>,
    /// Webhook deliveries were queued.
    pub deliveries: bool,
    /// Too much changed to list (heard from another replica): look at
    /// everything.
    pub everything: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self == &Changes::default()
    }

    /// Adds what another transaction changed.
    pub fn merge(&mut self, other: Changes) {
        self.jobs.extend(other.jobs);
        self.ended.extend(other.ended);
        self.logs.extend(other.logs);
        self.agents.extend(other.agents);
        self.all_agents |= other.all_agents;
        self.runs.extend(other.runs);
        self.run_events.extend(other.run_events);
        self.deliveries |= other.deliveries;
        self.everything |= other.everything;
    }
}

/// Called with what every commit changed, after it is durable.
pub type CommitHook = Arc<dyn Fn(&Changes) + Send + Sync>;

/// Counters of the store's work, for metrics and the benchmark.
#[derive(Debug, Default)]
pub struct Stats {
    /// SQL statements sent (reads and writes).
    pub statements: AtomicU64,
    /// Transactions committed (`Tx::commit` that succeeded).
    pub commits: AtomicU64,
    /// Durable commits of the database: on SQLite one per group, so
    /// `commits - syncs` transactions shared another's fsync.
    pub syncs: AtomicU64,
    /// Commits that failed (nothing of them was acknowledged).
    pub commit_failures: AtomicU64,
    /// Set while the store cannot write (the last write failed on a full
    /// disk, an I/O error, a failed commit); cleared by the next commit.
    write_failing: AtomicBool,
    pub(crate) write_error: std::sync::Mutex<Option<String>>,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub statements: u64,
    pub commits: u64,
    pub syncs: u64,
    pub commit_failures: u64,
    /// The store cannot write now (see [`Store::write_failure`]).
    pub write_failing: bool,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            statements: self.statements.load(Ordering::Relaxed),
            commits: self.commits.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
            commit_failures: self.commit_failures.load(Ordering::Relaxed),
            write_failing: self.write_failing.load(Ordering::Relaxed),
        }
    }

    fn write_error(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.write_error.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes that a write failed in a way that says the database cannot
    /// write now; logged once when it starts.
    pub(crate) fn write_failed(&self, why: &str) {
        let mut error = self.write_error();
        if error.is_none() {
            tracing::error!(error = %why, "the store cannot write: requests that change anything fail and /readyz reports unavailable until a write succeeds");
        }
        *error = Some(why.to_owned());
        self.write_failing.store(true, Ordering::Relaxed);
    }

    /// Notes a successful commit: the store writes again.
    fn write_succeeded(&self) {
        if self.write_failing.load(Ordering::Relaxed) {
            let mut error = self.write_error();
            if let Some(was) = error.take() {
                tracing::info!(was = %was, "the store writes again");
            }
            self.write_failing.store(false, Ordering::Relaxed);
        }
    }

    /// Notes a failed statement when its error says the database cannot
    /// write (a full disk, an I/O error, a read-only or unopenable file),
    /// rather than that this statement was refused.
    pub(crate) fn statement_failed(&self, e: &sqlx::Error) {
        if cannot_write(e) {
            self.write_failed(&e.to_string());
        }
    }

    pub(crate) fn statement(&self) {
        self.statements.fetch_add(1, Ordering::Relaxed);
    }
}

/// Shared parts of a store beside its pools.
pub(crate) struct Shared {
    pub(crate) stats: Stats,
    pub(crate) hook: OnceLock<CommitHook>,
    /// Signs the spec of every job inserted (`Tx::insert_job`).
    pub(crate) signer: OnceLock<Arc<drover_proto::signing::Signer>>,
    /// Names this process in its notifications, to skip its own.
    pub(crate) origin: String,
}

impl Shared {
    pub(crate) fn new() -> Shared {
        Shared {
            stats: Stats::default(),
            hook: OnceLock::new(),
            signer: OnceLock::new(),
            origin: crate::new_id(),
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

// ---- the SQLite writer ----

/// One outer SQLite transaction shared by the `Tx`s that arrive together.
#[derive(Debug, Default)]
struct Group {
    /// Set once the group's COMMIT (or its failure) is known.
    result: OnceLock<std::result::Result<(), String>>,
}

struct WriterState {
    conn: Option<SqliteConnection>,
    /// The open outer transaction, if any, and how many of its members
    /// released their savepoint and wait for its commit.
    group: Option<(Arc<Group>, usize)>,
}

/// The one connection that writes to a SQLite database.
pub(crate) struct Writer {
    state: Arc<tokio::sync::Mutex<WriterState>>,
    /// Callers waiting for the writer right now.
    waiting: AtomicUsize,
    options: SqliteConnectOptions,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Counts a caller waiting for the writer while it waits (also when its
/// future is dropped while waiting).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicUsize) -> Waiting<'a> {
        n.fetch_add(1, Ordering::SeqCst);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type WriterGuard = tokio::sync::OwnedMutexGuard<WriterState>;

impl Writer {
    pub(crate) async fn open(options: SqliteConnectOptions) -> Result<Writer> {
        let conn = options.connect().await?;
        Ok(Writer {
            state: Arc::new(tokio::sync::Mutex::new(WriterState {
                conn: Some(conn),
                group: None,
            })),
            waiting: AtomicUsize::new(0),
            options,
        })
    }

    /// Commits what waits and closes the connection.
    pub(crate) async fn close(&self) {
        let mut guard = self.lock().await;
        finish_group(&mut guard, None).await;
        if let Some(conn) = guard.conn.take() {
            let _ = conn.close().await;
        }
    }

    async fn lock(&self) -> WriterGuard {
        let _waiting = Waiting::new(&self.waiting);
        self.state.clone().lock_owned().await
    }

    async fn conn<'g>(&self, guard: &'g mut WriterGuard) -> Result<&'g mut SqliteConnection> {
        if guard.conn.is_none() {
            tracing::info!("opening the SQLite writer connection again");
            guard.conn = Some(self.options.connect().await?);
        }
        guard
            .conn
            .as_mut()
            .ok_or_else(|| Error::Unavailable("the SQLite writer has no connection".into()))
    }

    /// Takes the writer and opens a savepoint in the current group (or a
    /// new one).
    async fn begin(&self, stats: &Stats) -> Result<(WriterGuard, Arc<Group>)> {
        let mut guard = self.lock().await;
        if guard.group.is_none() {
            let conn = match self.conn(&mut guard).await {
                Ok(c) => c,
                Err(e) => {
                    stats.write_failed(&e.to_string());
                    return Err(e);
                }
            };
            stats.statement();
            if let Err(e) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await {
                guard.conn = None;
                stats.write_failed(&e.to_string());
                return Err(e.into());
            }
            guard.group = Some((Arc::new(Group::default()), 0));
        }
        let group = guard
            .group
            .as_ref()
            .map(|(g, _)| g.clone())
            .ok_or_else(|| Error::Unavailable("the SQLite writer lost its group".into()))?;
        let conn = self.conn(&mut guard).await?;
        stats.statement();
        if let Err(e) = sqlx::query("SAVEPOINT tx").execute(&mut *conn).await {
            abort_group(&mut guard, e.to_string()).await;
            stats.write_failed(&e.to_string());
            return Err(e.into());
        }
        Ok((guard, group))
    }
}

/// Ends the open group with COMMIT (or with the given failure), tells its
/// members and leaves the writer without a group.
async fn finish_group(guard: &mut WriterGuard, stats: Option<&Stats>) {
    let Some((group, members)) = guard.group.take() else {
        return;
    };
    let Some(conn) = guard.conn.as_mut() else {
        let _ = group
            .result
            .set(Err("the SQLite writer lost its connection".into()));
        return;
    };
    let sql = if members == 0 { "ROLLBACK" } else { "COMMIT" };
    if let Some(s) = stats {
        s.statement();
    }
    match sqlx::query(sql).execute(&mut *conn).await {
        Ok(_) => {
            if members > 0 {
                if let Some(s) = stats {
                    s.syncs.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = group.result.set(Ok(()));
        }
        Err(e) => {
            tracing::error!(error = %e, "SQLite commit failed; rolling back and reopening the writer");
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            guard.conn = None;
            let _ = group.result.set(Err(e.to_string()));
        }
    }
}

/// Fails the open group after an error that may have ended SQLite's
/// transaction on its own (a full disk, an I/O error): rolls back what is
/// left and drops the connection.
async fn abort_group(guard: &mut WriterGuard, why: String) {
    if let Some((group, _)) = guard.group.take() {
        let _ = group.result.set(Err(why));
    }
    if let Some(conn) = guard.conn.as_mut() {
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
    }
    guard.conn = None;
}

/// True for errors that say the database cannot write at all now, as
/// opposed to this statement being refused: SQLite's FULL, IOERR (any
/// extended code), CANTOPEN, READONLY; PostgreSQL's insufficient
/// resources (class 53: disk full, out of memory) and system errors
/// (class 58: I/O).
fn cannot_write(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return matches!(e, sqlx::Error::Io(_));
    };
    let Some(code) = db.code() else {
        return false;
    };
    // PostgreSQL's SQLSTATE has five characters; SQLite's extended result
    // codes have at most four digits, the primary code in the low byte.
    if code.len() == 5 {
        return code.starts_with("53") || code.starts_with("58");
    }
    code.parse::<i64>()
        .is_ok_and(|n| matches!(n & 0xff, 8 | 10 | 13 | 14))
}

// ---- the transaction ----

enum Conn {
    Sqlite {
        guard: WriterGuard,
        group: Arc<Group>,
    },
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

/// A transaction the caller holds. Dropped without `commit`, it rolls
/// back. Hold it only for database work: on SQLite it holds the writer.
pub struct Tx {
    conn: Option<Conn>,
    pub(crate) changes: Changes,
    /// Runs whose next look the engine set in this transaction.
    settled: BTreeSet<String>,
    store: Store,
}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("changes", &self.changes)
            .finish_non_exhaustive()
    }
}

/// The connection of a transaction, per engine.
pub(crate) enum TxConn<'a> {
    Sqlite(&'a mut SqliteConnection),
    Postgres(&'a mut PgConnection),
}

/// Runs the same body on the transaction's connection, whichever engine
/// it is; the body is compiled once per engine. Counts one statement.
macro_rules! on_tx {
    ($tx:expr, $c:ident => $body:expr) => {{
        let tx: &mut $crate::tx::Tx = $tx;
        tx.count_statement();
        let result = match tx.conn()? {
            $crate::tx::TxConn::Sqlite($c) => $body,
            $crate::tx::TxConn::Postgres($c) => $body,
        };
        if let Err(e) = &result {
            tx.statement_failed(e);
        }
        result
    }};
}
pub(crate) use on_tx;

impl Store {
    /// Starts a transaction. On SQLite this waits for the writer.
    pub async fn begin(&self) -> Result<Tx> {
        let conn = match &self.pool {
            crate::Pool::Sqlite { writer, .. } => {
                let (guard, group) = writer.begin(&self.shared.stats).await?;
                Conn::Sqlite { guard, group }
            }
            crate::Pool::Postgres(p) => {
                self.shared.stats.statement();
                Conn::Postgres(p.begin().await?)
            }
        };
        Ok(Tx {
            conn: Some(conn),
            changes: Changes::default(),
            settled: BTreeSet::new(),
            store: self.clone(),
        })
    }

    /// Counters of statements and commits since the store was opened.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Sets the function told about every commit's changes (once; later
    /// calls are ignored). The server's wake-ups hang off it.
    pub fn on_commit(&self, hook: CommitHook) {
        let _ = self.shared.hook.set(hook);
    }

    /// Sets the key that signs the spec of every job inserted from now on
    /// (once; later calls are ignored). The store never sees the key
    /// itself, only this signer; without one, jobs are stored unsigned.
    pub fn sign_jobs_with(&self, signer: Arc<drover_proto::signing::Signer>) {
        let _ = self.shared.signer.set(signer);
    }

    /// Tells the hook about changes made outside a local commit (another
    /// replica's, heard through PostgreSQL notifications).
    pub fn announce(&self, changes: &Changes) {
        if let Some(hook) = self.shared.hook.get() {
            hook(changes);
        }
    }
}

impl Tx {
    /// The signer of job specs the server set, if any.
    pub(crate) fn job_signer(&self) -> Option<&drover_proto::signing::Signer> {
        self.store.shared.signer.get().map(|s| s.as_ref())
    }
}

impl Tx {
    pub(crate) fn statement_failed(&self, e: &sqlx::Error) {
        self.store.shared.stats.statement_failed(e);
    }

    pub(crate) fn count_statement(&self) {
        self.store.shared.stats.statement();
    }

    pub(crate) fn conn(&mut self) -> Result<TxConn<'_>> {
        match self.conn.as_mut() {
            Some(Conn::Sqlite { guard, .. }) => {
                guard.conn.as_mut().map(TxConn::Sqlite).ok_or_else(|| {
                    Error::Unavailable("the SQLite writer lost its connection".into())
                })
            }
            Some(Conn::Postgres(t)) => Ok(TxConn::Postgres(&mut *t)),
            None => Err(Error::Unavailable("transaction already ended".into())),
        }
    }

    /// The engine this transaction runs on.
    pub fn backend(&self) -> crate::Backend {
        self.store.backend()
    }

    /// What this transaction changed so far.
    pub fn changes(&self) -> &Changes {
        &self.changes
    }

    /// Notes a change made by the caller's own statements.
    pub fn note(&mut self, changes: Changes) {
        self.changes.merge(changes);
    }

    /// Notes that the engine has just looked at this run and set its next
    /// look itself: its own changes to the run call for no other.
    pub fn settled(&mut self, run_id: &str) {
        self.settled.insert(run_id.to_owned());
    }

    /// Marks the runs this transaction changed as due for the engine's
    /// look, in the transaction itself: a wake-up that cannot be lost.
    async fn mark_runs_due(&mut self) -> Result<()> {
        if self.changes.runs.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "UPDATE workflow_runs SET next_check_at = $1 WHERE id {} \
             AND (state = 'running' OR workspace_state = 'removing')",
            crate::jobs::in_json(self.backend(), 2)
        );
        let ids = crate::jobs::to_json(&self.changes.runs);
        let now = chrono::Utc::now().timestamp_millis();
        on_tx!(self, c => sqlx::query(&sql)
            .bind(now)
            .bind(&ids)
            .execute(&mut *c)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Makes every step durable at once; returns what changed once it is.
    /// Wake-ups are sent from here, after the commit.
    pub async fn commit(mut self) -> Result<Changes> {
        for run in std::mem::take(&mut self.settled) {
            self.changes.runs.remove(&run);
        }
        self.mark_runs_due().await?;
        let conn = self
            .conn
            .take()
            .ok_or_else(|| Error::Unavailable("transaction already ended".into()))?;
        let stats = &self.store.shared.stats;
        match conn {
            Conn::Postgres(mut t) => {
                if !self.changes.is_empty() {
                    if let Some(payload) =
                        crate::notify::payload(&self.store.shared.origin, &self.changes)
                    {
                        stats.statement();
                        sqlx::query("SELECT pg_notify($1, $2)")
                            .bind(crate::notify::CHANNEL)
                            .bind(payload)
                            .execute(&mut *t)
                            .await?;
                    }
                }
                stats.statement();
                if let Err(e) = t.commit().await {
                    stats.commit_failures.fetch_add(1, Ordering::Relaxed);
                    stats.write_failed(&e.to_string());
                    return Err(e.into());
                }
                stats.syncs.fetch_add(1, Ordering::Relaxed);
            }
            Conn::Sqlite { mut guard, group } => {
                let writer = match &self.store.pool {
                    crate::Pool::Sqlite { writer, .. } => writer.clone(),
                    crate::Pool::Postgres(_) => {
                        return Err(Error::Unavailable(
                            "engine changed under a transaction".into(),
                        ))
                    }
                };
                let released = match guard.conn.as_mut() {
                    Some(c) => {
                        stats.statement();
                        sqlx::query("RELEASE tx").execute(&mut *c).await
                    }
                    None => Err(sqlx::Error::PoolClosed),
                };
                if let Err(e) = released {
                    abort_group(&mut guard, e.to_string()).await;
                    stats.commit_failures.fetch_add(1, Ordering::Relaxed);
                    stats.write_failed(&e.to_string());
                    return Err(e.into());
                }
                if let Some((_, members)) = guard.group.as_mut() {
                    *members += 1;
                }
                // Finished in a task of its own, so that a caller that goes
                // away now cannot leave the group open.
                let shared = self.store.shared.clone();
                let pending = group.clone();
                let finish = tokio::spawn(async move {
                    let stats = Some(&shared.stats);
                    if writer.waiting.load(Ordering::SeqCst) == 0 {
                        finish_group(&mut guard, stats).await;
                        return;
                    }
                    // Others wait for the writer: let them join this group,
                    // then come back and commit it if none of them did.
                    drop(guard);
                    let mut again = writer.lock().await;
                    let same = again
                        .group
                        .as_ref()
                        .is_some_and(|(g, _)| Arc::ptr_eq(g, &pending));
                    if pending.result.get().is_none() && same {
                        finish_group(&mut again, stats).await;
                    }
                });
                if let Err(e) = finish.await {
                    tracing::error!(error = %e, "the commit task failed");
                }
                match group.result.get() {
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        stats.commit_failures.fetch_add(1, Ordering::Relaxed);
                        stats.write_failed(e);
                        return Err(Error::CommitFailed(e.clone()));
                    }
                    None => {
                        stats.commit_failures.fetch_add(1, Ordering::Relaxed);
                        stats.write_failed("the commit group was lost");
                        return Err(Error::CommitFailed("the commit group was lost".into()));
                    }
                }
            }
        }
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.write_succeeded();
        let changes = std::mem::take(&mut self.changes);
        if !changes.is_empty() {
            if let Some(hook) = self.store.shared.hook.get() {
                hook(&changes);
            }
        }
        Ok(changes)
    }

    /// Undoes every step of this transaction.
    pub async fn rollback(mut self) -> Result<()> {
        match self.conn.take() {
            Some(Conn::Postgres(t)) => {
                self.count_statement();
                t.rollback().await?;
            }
            Some(Conn::Sqlite { mut guard, .. }) => {
                rollback_savepoint(&mut guard, &self.store.shared.stats).await;
            }
            None => {}
        }
        Ok(())
    }
}

/// Undoes a savepoint; when nobody else committed into the group, ends
/// the group too.
async fn rollback_savepoint(guard: &mut WriterGuard, stats: &Stats) {
    let Some(conn) = guard.conn.as_mut() else {
        abort_group(guard, "the SQLite writer lost its connection".into()).await;
        return;
    };
    stats.statement();
    let undone = sqlx::query("ROLLBACK TO tx").execute(&mut *conn).await;
    let released = match undone {
        Ok(_) => sqlx::query("RELEASE tx").execute(&mut *conn).await,
        Err(e) => Err(e),
    };
    match released {
        // Members of the group that wait will commit it; an empty one
        // is closed now so that no write transaction stays open.
        Ok(_) => {
            if guard.group.as_ref().is_some_and(|(_, n)| *n == 0) {
                finish_group(guard, Some(stats)).await;
            }
        }
        // SQLite ended the transaction itself (e.g. a full disk): the
        // whole group is gone.
        Err(e) => abort_group(guard, e.to_string()).await,
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        match self.conn.take() {
            // sqlx rolls a dropped transaction back on the connection's
            // next use.
            Some(Conn::Postgres(t)) => drop(t),
            Some(Conn::Sqlite { mut guard, .. }) => {
                let store = self.store.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(async move {
                            rollback_savepoint(&mut guard, &store.shared.stats).await;
                        });
                    }
                    // No runtime (the process is ending): drop the
                    // connection; SQLite rolls back what was not committed.
                    Err(_) => {
                        if let Some((group, _)) = guard.group.take() {
                            let _ = group.result.set(Err("the runtime ended".into()));
                        }
                        guard.conn = None;
                    }
                }
            }
            None => {}
        }
    }
}
