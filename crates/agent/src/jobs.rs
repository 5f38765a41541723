//! Pulling and running jobs: the long-running tasks of the agent besides
//! the heartbeat, and the shared state they work on.
//!
//! - **poller**: keeps one long poll in flight at all times (also at full
//!   capacity, so cancels arrive within one round trip) and starts what it
//!   gets, never more than `capacity` at once; cancels and forced stops
//!   (`kill`: SIGKILL at once, even during a grace) reach running attempts
//!   at once. On stop: returns.
//! - **lease renewer**: renews the leases of running attempts every
//!   `lease_ms / 3` — and of finished ones until their result is
//!   acknowledged — and cancels (or kills) those the server gives up. On
//!   stop: returns.
//! - **attempt tasks**: one per attempt: runs it (`executor`), ships its
//!   output (a log shipper task), writes the result to the outbox on a
//!   blocking thread while it reports it once, and removes it when both
//!   are done. On stop: the attempt is cancelled and its result still
//!   written.
//! - **reporter**: drains the outbox at start and whenever a result was
//!   not reported at once, with jittered backoff while the server is
//!   away. On stop:
//!   returns; `run` then tries one last drain with a short deadline.
//!
//! Every task stops on a terminal refusal (the session is rejected).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use drover_proto::jobs::{
    Assignment, AttemptResult, LeaseRequest, LogUpload, Outcome, PollRequest, PollResponse,
    StartRequest,
};
use drover_proto::limits::{
    DEFAULT_LEASE, MAX_KNOWN_ATTEMPTS, MAX_RESULT_ERROR, MIN_LEASE, POLL_WAIT,
};
use drover_proto::signing::{self, VerifyingKey};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::allow::action_allowed;
use crate::artifacts;
use crate::client::ClientError;
use crate::executor::{self, ExecOptions, Refusal, Stop};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::runner::Backoff;
use crate::session::{retry_after_jittered, Session};
use crate::state::StateError;

/// The HTTP timeout of a poll: the wait plus room for a slow network.
const POLL_TIMEOUT: Duration = POLL_WAIT.saturating_add(Duration::from_secs(15));
/// Retry a failed lease renewal at least this soon.
const LEASE_RETRY: Duration = Duration::from_secs(2);
/// Log chunks queued per attempt for the shipper (≤ 64 KiB each).
const LOG_QUEUE: usize = 16;
/// How long a finished attempt still waits for its output to reach the
/// server once the agent is stopping (the result is in the outbox anyway).
const LOG_FLUSH_STOPPING: Duration = Duration::from_secs(1);
/// Outbox files listed per round: memory does not grow with the backlog.
const OUTBOX_BATCH: usize = 64;

/// What the job tasks need to know, from the agent's config.
#[derive(Debug, Clone)]
pub(crate) struct JobsConfig {
    pub capacity: u32,
    pub allow_actions: Vec<String>,
    pub exec: ExecOptions,
    pub max_backoff: Duration,
    /// The server's key that signs assignments, if the agent knows it yet.
    pub assignment_key: Option<VerifyingKey>,
}

struct Running {
    stop: Stop,
    lease: Duration,
}

/// The state the job tasks share.
pub(crate) struct Jobs {
    session: Arc<Session>,
    config: JobsConfig,
    outbox: Outbox,
    metrics: Arc<Metrics>,
    running: Mutex<HashMap<String, Running>>,
    /// Results in the outbox whose output is still being shipped: the
    /// reporter leaves them for later so output arrives before the result.
    flushing: Mutex<HashSet<String>>,
    /// Attempt tasks alive (running or flushing output).
    alive: watch::Sender<usize>,
    slot_freed: Notify,
    attempt_started: Notify,
    result_ready: Notify,
    /// The lease the server last granted (ms; 0: none yet).
    lease_ms: AtomicU64,
    /// Results that could not be written to the outbox and were not
    /// acknowledged yet: kept here while the process lives, and retried
    /// (written or reported) by the reporter.
    unsaved: Mutex<BTreeMap<String, AttemptResult>>,
    /// Why the agent takes no new work: it cannot write its results.
    problem: Mutex<Option<String>>,
    /// The server's key that signs assignments: once known, every
    /// assignment must verify with it (see `verify`).
    assignment_key: Mutex<Option<VerifyingKey>>,
    /// Stops the poller, lease renewer and reporter.
    stop: CancellationToken,
    /// Parent of every attempt's cancel token: cancelling it stops them all.
    attempts_stop: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// True for ids the agent accepts: they become a URL path segment and a
/// file name, so nothing but letters, digits, '-' and '_' (and '.' inside).
pub fn valid_attempt_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Whether the server will ever take a result it refused.
fn refusal_is_final(e: &ClientError) -> bool {
    matches!(e.status(), Some(400 | 403 | 404 | 422))
}

/// Worth trying the same request again soon.
fn is_transient(e: &ClientError) -> bool {
    match e {
        ClientError::Unreachable { .. } | ClientError::Untrusted { .. } => true,
        ClientError::Refused { status, .. } => *status >= 500 || matches!(status, 408 | 429),
        ClientError::Protocol(_) => false,
    }
}

impl Jobs {
    pub(crate) fn new(
        session: Arc<Session>,
        config: JobsConfig,
        outbox: Outbox,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Jobs {
        metrics.set_outbox(outbox.len());
        Jobs {
            session,
            assignment_key: Mutex::new(config.assignment_key),
            config,
            outbox,
            metrics,
            running: Mutex::new(HashMap::new()),
            flushing: Mutex::new(HashSet::new()),
            alive: watch::Sender::new(0),
            slot_freed: Notify::new(),
            attempt_started: Notify::new(),
            result_ready: Notify::new(),
            lease_ms: AtomicU64::new(0),
            unsaved: Mutex::new(BTreeMap::new()),
            problem: Mutex::new(None),
            stop,
            attempts_stop: CancellationToken::new(),
        }
    }

    fn stopping(&self) -> bool {
        self.stop.is_cancelled() || self.session.rejected().is_cancelled()
    }

    /// Resolves when the job tasks must stop.
    async fn stopped(&self) {
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = self.session.rejected().cancelled() => {}
        }
    }

    // ---- poller ----

    pub(crate) async fn poll_loop(self: Arc<Self>) {
        let mut backoff = Backoff::new(self.config.max_backoff);
        let capacity = self.config.capacity;
        while !self.stopping() {
            let running = lock(&self.running).len() as u32;
            // An agent that cannot keep its results takes no new work.
            let free = if self.problem().is_some() {
                0
            } else {
                capacity.saturating_sub(running)
            };
            let req = PollRequest {
                free_slots: free,
                wait_ms: POLL_WAIT.as_millis() as u64,
                capacity,
                known: self.known_attempts(),
            };
            let started = Instant::now();
            let req = &req;
            let call = self
                .session
                .call(|client, token| async move { client.poll(&token, req, POLL_TIMEOUT).await });
            let outcome = tokio::select! {
                _ = self.stopped() => return,
                // At full capacity the poll can only bring cancels: drop it
                // and poll again to announce a freed slot at once.
                _ = self.slot_freed.notified(), if req.free_slots == 0 => continue,
                r = call => r,
            };
            self.metrics.poll_took(started.elapsed());
            match outcome {
                Ok(resp) => {
                    if backoff.failures > 0 {
                        tracing::info!(failures = backoff.failures, "polling again");
                    }
                    backoff.reset();
                    self.accept(resp);
                }
                Err(e) if e.is_terminal() => return,
                Err(e) => {
                    let wait = e
                        .retry_after()
                        .map(retry_after_jittered)
                        .unwrap_or_else(|| backoff.next());
                    tracing::warn!(
                        error = %e,
                        failures = backoff.failures,
                        retry_in_ms = wait.as_millis() as u64,
                        "poll failed"
                    );
                    tokio::select! {
                        _ = self.stopped() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Every attempt this agent holds: running, shipping output, or with a
    /// result in the outbox. `None` when there are too many to list.
    fn known_attempts(&self) -> Option<Vec<String>> {
        let mut known: HashSet<String> = lock(&self.running).keys().cloned().collect();
        known.extend(lock(&self.flushing).iter().cloned());
        known.extend(lock(&self.unsaved).keys().cloned());
        let stored = self.outbox.list(MAX_KNOWN_ATTEMPTS + 1, |_| false).ok()?;
        known.extend(stored);
        (known.len() <= MAX_KNOWN_ATTEMPTS).then(|| known.into_iter().collect())
    }

    fn accept(self: &Arc<Self>, resp: PollResponse) {
        for a in resp.assignments {
            self.start_attempt(a);
        }
        stop_listed(self, &resp.cancel, &resp.kill, "poll");
    }

    fn start_attempt(self: &Arc<Self>, a: Assignment) {
        if !valid_attempt_id(&a.attempt_id) {
            tracing::error!(attempt = %a.attempt_id, "ignoring an assignment with an invalid attempt id");
            return;
        }
        if lock(&self.running).contains_key(&a.attempt_id)
            || lock(&self.flushing).contains(&a.attempt_id)
            || self.outbox.contains(&a.attempt_id)
        {
            tracing::debug!(attempt = %a.attempt_id, "ignoring a repeated assignment");
            return;
        }
        // Before anything else is believed: an assignment the server did
        // not sign as it is is refused and never runs.
        if let Err(why) = self.verify(&a) {
            tracing::error!(attempt = %a.attempt_id, job = %a.job_id, error = %why, "refusing an assignment");
            self.store_result(executor::rejected(&a, &why));
            self.result_ready.notify_one();
            return;
        }
        if !action_allowed(&self.config.allow_actions, &a.action) {
            tracing::warn!(attempt = %a.attempt_id, action = %a.action, "refusing an action not in allow_actions");
            let why = Refusal::ActionNotAllowed {
                action: a.action.clone(),
            };
            self.store_result(executor::rejected(&a, &why));
            self.result_ready.notify_one();
            return;
        }
        let stop = Stop::child_of(&self.attempts_stop);
        {
            let mut running = lock(&self.running);
            if running.len() >= self.config.capacity as usize {
                drop(running);
                let why = Refusal::AtCapacity {
                    capacity: self.config.capacity,
                };
                self.store_result(executor::rejected(&a, &why));
                self.result_ready.notify_one();
                return;
            }
            if a.lease_ms > 0 {
                self.lease_ms.store(a.lease_ms, Ordering::Relaxed);
            }
            running.insert(
                a.attempt_id.clone(),
                Running {
                    stop: stop.clone(),
                    lease: lease_of(a.lease_ms),
                },
            );
            self.metrics.set_running(running.len());
        }
        lock(&self.flushing).insert(a.attempt_id.clone());
        self.alive.send_modify(|n| *n += 1);
        self.attempt_started.notify_one();
        tracing::info!(attempt = %a.attempt_id, job = %a.job_id, action = %a.action, "starting attempt");
        let jobs = self.clone();
        tokio::spawn(async move {
            // Counted down even if the attempt task panics.
            let _alive = AliveGuard(jobs.clone());
            jobs.run_attempt(a, stop).await;
        });
    }

    /// Checks an assignment's signatures and expiry with the server's key.
    /// Before the agent knows a key (enrolled before the server signed,
    /// and no heartbeat answer has told it yet), every assignment passes.
    fn verify(&self, a: &Assignment) -> Result<(), Refusal> {
        let Some(key) = *lock(&self.assignment_key) else {
            return Ok(());
        };
        signing::verify(a, &key, Utc::now().timestamp_millis()).map_err(Refusal::Signature)
    }

    /// The key assignments are checked with, if known.
    pub(crate) fn assignment_key(&self) -> Option<VerifyingKey> {
        *lock(&self.assignment_key)
    }

    /// Starts checking assignments with `key` (learned from a heartbeat).
    pub(crate) fn trust_assignment_key(&self, key: VerifyingKey) {
        *lock(&self.assignment_key) = Some(key);
    }

    /// Stops a running attempt: gracefully, or at once when `force`d
    /// (also while a graceful stop waits out its grace).
    fn cancel_local(&self, attempt_id: &str, source: &str, force: bool) {
        if let Some(r) = lock(&self.running).get(attempt_id) {
            if force && !r.stop.is_killed() {
                tracing::info!(attempt = %attempt_id, source, "the server killed the attempt (forced stop)");
                r.stop.kill();
            } else if !r.stop.is_cancelled() {
                tracing::info!(attempt = %attempt_id, source, "the server cancelled the attempt");
                r.stop.cancel();
            }
        }
    }

    /// Attempts running now.
    pub(crate) fn running_count(&self) -> u32 {
        lock(&self.running).len() as u32
    }

    // ---- attempts ----

    async fn run_attempt(self: &Arc<Self>, a: Assignment, stop: Stop) {
        let started_at = Utc::now();
        let (tx, rx) = mpsc::channel(LOG_QUEUE);
        let shipper = tokio::spawn(ship_logs(
            self.session.clone(),
            a.attempt_id.clone(),
            StartRequest { started_at },
            rx,
            self.config.max_backoff,
        ));
        let mut result = executor::execute(&a, &self.config.exec, &stop, &tx).await;
        drop(tx);
        if !a.artifacts.is_empty() {
            // Uploaded while the attempt still counts as running (its lease
            // is renewed), so the result is recorded only once they are in.
            if result.outcome != Outcome::Rejected {
                if let Err(why) = self.collect_artifacts(&a, &stop).await {
                    tracing::warn!(attempt = %a.attempt_id, error = %why, "collecting artifacts failed");
                    if result.outcome == Outcome::Succeeded {
                        result.outcome = Outcome::Failed;
                        result.error = Some(why.to_string());
                    }
                }
            }
            executor::remove_work_dir(&self.config.exec, &a);
        }
        tracing::info!(
            attempt = %a.attempt_id,
            outcome = ?result.outcome,
            exit_code = result.exit_code,
            duration_ms = result.duration_ms,
            "attempt ended"
        );
        // The result goes to the outbox on a blocking thread while the
        // output finishes shipping and the result is reported: it is
        // durable in at least one place (the server's database or this
        // disk) before the agent forgets it, without both fsyncs standing
        // in front of the report.
        let result = self.ended(result);
        let outbox = self.outbox.clone();
        let durable = tokio::task::spawn_blocking({
            let result = result.clone();
            move || outbox.put(&result)
        });
        {
            let mut running = lock(&self.running);
            running.remove(&a.attempt_id);
            self.metrics.set_running(running.len());
        }
        self.slot_freed.notify_one();
        // Let the output reach the server before the result does. The
        // shipper retries while the server is away, so this waits as long
        // as it takes, except when the agent stops (the result is in the
        // outbox either way).
        let mut shipper = shipper;
        let abort = shipper.abort_handle();
        let shipped = tokio::select! {
            r = &mut shipper => r.is_ok(),
            _ = self.stop.cancelled() => {
                matches!(tokio::time::timeout(LOG_FLUSH_STOPPING, &mut shipper).await, Ok(Ok(())))
            }
            _ = self.session.rejected().cancelled() => false,
        };
        if !shipped {
            abort.abort();
            tracing::warn!(attempt = %a.attempt_id, "output not fully shipped; reporting the result anyway");
        }
        // Reported at once unless the agent stops (the final drain then
        // reports it) or the output could not be shipped (the reporter
        // retries with its backoff).
        let delivered = shipped && !self.stop.is_cancelled() && self.report_now(&result).await;
        let written = match durable.await {
            Ok(written) => written,
            Err(e) => Err(StateError::Io {
                path: self.outbox.path().to_owned(),
                source: std::io::Error::other(e.to_string()),
            }),
        };
        match written {
            Ok(()) if delivered => {
                if let Err(e) = self.outbox.remove(&result.attempt_id) {
                    // Reported again at the next drain; the server keeps
                    // the first.
                    tracing::error!(error = %e, "cannot remove a delivered result");
                }
            }
            Ok(()) => {}
            Err(e) if delivered => {
                tracing::warn!(error = %e, attempt = %a.attempt_id, "could not write a result to the outbox (it was delivered)");
                self.set_problem(&e);
            }
            Err(e) => self.keep_unsaved(result, &e),
        }
        self.metrics.set_outbox(self.outbox.len());
        lock(&self.flushing).remove(&a.attempt_id);
        if !delivered {
            self.result_ready.notify_one();
        }
    }

    /// Reports a fresh result once; false when that failed (the result is
    /// then in the outbox, where the reporter takes it up).
    async fn report_now(&self, result: &AttemptResult) -> bool {
        let req = result;
        match self
            .session
            .call(|client, token| async move { client.result(&token, req).await })
            .await
        {
            Ok(ack) => {
                tracing::debug!(attempt = %result.attempt_id, recorded = ack.recorded, "result delivered");
                true
            }
            Err(e) => {
                tracing::debug!(attempt = %result.attempt_id, error = %e, "reporting a result failed; the reporter retries");
                false
            }
        }
    }

    /// Uploads every declared path of the attempt's working dir (files, or
    /// every regular file under a directory). A declared path that is
    /// missing, a symlink or behind one, or that the attempt's user could
    /// not read, is an error; so is a refusal by the server. Files are
    /// listed and opened by an `artifacts::Reader` (beneath the working
    /// dir, as the attempt's user); this task only hashes and sends them.
    async fn collect_artifacts(&self, a: &Assignment, stop: &Stop) -> Result<(), ArtifactError> {
        let root = executor::work_dir(&self.config.exec, a);
        let user = artifacts::reader_user(a, &self.config.exec);
        let reader = artifacts::Reader::start(root, user).await?;
        let files = reader.list(a.artifacts.clone()).await?;
        for rel in files {
            let mut file = reader.open(rel.clone()).await?;
            let (file, sha) = tokio::task::spawn_blocking(move || {
                let sha = sha256_file(&mut file);
                (file, sha)
            })
            .await
            .map_err(|source| ArtifactError::Hashing {
                path: rel.clone(),
                source,
            })?;
            let sha = sha.map_err(|source| ArtifactError::Read {
                path: rel.clone(),
                source,
            })?;
            let mut backoff = Backoff::new(self.config.max_backoff);
            loop {
                let (id, rel_ref, sha_ref, file_ref) = (&a.attempt_id, &rel, &sha, &file);
                let r = self
                    .session
                    .call(|client, token| async move {
                        client
                            .upload_artifact(&token, id, rel_ref, sha_ref, file_ref)
                            .await
                    })
                    .await;
                match r {
                    Ok(_) => {
                        tracing::info!(attempt = %a.attempt_id, path = %rel, sha256 = %sha, "artifact uploaded");
                        break;
                    }
                    Err(e) if is_transient(&e) && !e.is_terminal() => {
                        let wait = backoff.next().max(e.retry_after().unwrap_or_default());
                        if backoff.failures == 1 || backoff.failures % 10 == 0 {
                            tracing::warn!(attempt = %a.attempt_id, path = %rel, error = %e, "uploading an artifact failed; retrying");
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = stop.cancelled() => return Err(ArtifactError::Stopped { path: rel }),
                            _ = self.session.rejected().cancelled() => return Err(ArtifactError::SessionEnded),
                        }
                    }
                    Err(source) => return Err(ArtifactError::Refused { path: rel, source }),
                }
            }
        }
        Ok(())
    }

    /// A result as reported: its error capped, counted in the metrics.
    fn ended(&self, mut result: AttemptResult) -> AttemptResult {
        if let Some(error) = &mut result.error {
            cap_error(error);
        }
        self.metrics.attempt_ended(result.outcome);
        result
    }

    /// Writes a refusal's result to the outbox (the reporter reports it).
    fn store_result(&self, result: AttemptResult) {
        let result = self.ended(result);
        if let Err(e) = self.outbox.put(&result) {
            self.keep_unsaved(result, &e);
        }
        self.metrics.set_outbox(self.outbox.len());
    }

    /// Why the agent takes no new work now, if it does not.
    pub(crate) fn problem(&self) -> Option<String> {
        lock(&self.problem).clone()
    }

    /// The state dir cannot be written: take no new work until it can.
    fn set_problem(&self, e: &StateError) {
        let why = format!("cannot write results to the state dir: {e}");
        let mut problem = lock(&self.problem);
        if problem.is_none() {
            tracing::error!(error = %e, "cannot write results to the state dir; taking no new work until it can be written again");
        }
        *problem = Some(why);
    }

    /// Keeps a result that could not be written in memory; the reporter
    /// writes or reports it as soon as it can.
    fn keep_unsaved(&self, result: AttemptResult, e: &StateError) {
        tracing::error!(
            error = %e,
            attempt = %result.attempt_id,
            "could not write a result to the outbox; keeping it in memory until it is written or reported"
        );
        self.set_problem(e);
        lock(&self.unsaved).insert(result.attempt_id.clone(), result);
        self.result_ready.notify_one();
    }

    /// Writes or reports the results kept in memory; then, if the agent
    /// took no work because of the disk, checks that it can write again.
    async fn retry_unsaved(&self, backoff: &mut Backoff) -> Result<(), Duration> {
        let waiting: Vec<AttemptResult> = lock(&self.unsaved).values().cloned().collect();
        for result in waiting {
            let saved = self.outbox.put(&result).is_ok() || self.report_now(&result).await;
            if !saved {
                return Err(backoff.next());
            }
            lock(&self.unsaved).remove(&result.attempt_id);
        }
        if lock(&self.problem).is_none() {
            return Ok(());
        }
        match self.outbox.probe() {
            Ok(()) => {
                lock(&self.problem).take();
                tracing::info!("the state dir can be written again; taking work");
                self.slot_freed.notify_one();
                Ok(())
            }
            Err(_) => Err(backoff.next()),
        }
    }

    /// Cancels every running attempt and waits until all attempt tasks
    /// have written their results.
    pub(crate) async fn stop_attempts(&self) {
        self.attempts_stop.cancel();
        let mut alive = self.alive.subscribe();
        let _ = alive.wait_for(|n| *n == 0).await;
    }

    // ---- leases ----

    /// How often to renew: a third of the shortest lease running; while
    /// only results wait for the server, a third of the last lease it
    /// granted.
    fn lease_interval(&self) -> Option<Duration> {
        let running = lock(&self.running).values().map(|r| r.lease / 3).min();
        running.or_else(|| {
            self.results_waiting()
                .then(|| lease_of(self.lease_ms.load(Ordering::Relaxed)) / 3)
        })
    }

    fn results_waiting(&self) -> bool {
        !lock(&self.flushing).is_empty()
            || !lock(&self.unsaved).is_empty()
            || !self.outbox.is_empty()
    }

    /// The attempts whose leases to hold: those running, and those whose
    /// result has not been acknowledged yet (in flight or in the outbox), so
    /// that finished work is not declared lost while its report waits for
    /// the link or its artifacts upload.
    fn leased_attempts(&self) -> Vec<String> {
        // Running ones first: past the server's bound, results waiting in
        // the outbox are the ones left to their lease.
        let mut ids: Vec<String> = lock(&self.running).keys().cloned().collect();
        ids.extend(lock(&self.flushing).iter().cloned());
        ids.extend(lock(&self.unsaved).keys().cloned());
        if let Ok(waiting) = self.outbox.list(MAX_KNOWN_ATTEMPTS, |_| false) {
            ids.extend(waiting);
        }
        let mut seen = HashSet::new();
        ids.retain(|id| seen.insert(id.clone()));
        ids.truncate(MAX_KNOWN_ATTEMPTS);
        ids
    }

    pub(crate) async fn lease_loop(self: Arc<Self>) {
        let mut last = tokio::time::Instant::now();
        loop {
            let interval = self.lease_interval();
            let due = interval.map(|i| last + i);
            tokio::select! {
                _ = self.stopped() => return,
                _ = self.attempt_started.notified() => {
                    if interval.is_none() {
                        // Leases were just granted with the assignment.
                        last = tokio::time::Instant::now();
                    }
                    continue;
                }
                _ = sleep_until_opt(due) => {}
            }
            let ids = self.leased_attempts();
            last = tokio::time::Instant::now();
            if ids.is_empty() {
                continue;
            }
            let req = &LeaseRequest { attempt_ids: ids };
            let call = self
                .session
                .call(|client, token| async move { client.leases(&token, req).await });
            let resp = tokio::select! {
                _ = self.stopped() => return,
                r = call => r,
            };
            match resp {
                Ok(resp) => {
                    if resp.lease_ms > 0 {
                        self.lease_ms.store(resp.lease_ms, Ordering::Relaxed);
                        let mut running = lock(&self.running);
                        for id in &resp.renewed {
                            if let Some(r) = running.get_mut(id) {
                                r.lease = lease_of(resp.lease_ms);
                            }
                        }
                    }
                    stop_listed(&self, &resp.cancel, &resp.kill, "lease");
                }
                Err(e) if e.is_terminal() => return,
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    // Try again soon rather than a whole interval later.
                    if let Some(i) = interval {
                        let now = tokio::time::Instant::now();
                        last = now
                            .checked_sub(i.saturating_sub(LEASE_RETRY))
                            .unwrap_or(now);
                    }
                }
            }
        }
    }

    // ---- reporter ----

    pub(crate) async fn report_loop(self: Arc<Self>) {
        let mut backoff = Backoff::new(self.config.max_backoff);
        loop {
            let wait = self.drain(&mut backoff, false).await.err();
            if self.session.rejected().is_cancelled() {
                return;
            }
            tokio::select! {
                _ = self.stopped() => return,
                _ = self.result_ready.notified(), if wait.is_none() => {}
                _ = sleep_until_opt(wait.map(|w| tokio::time::Instant::now() + w)) => {}
            }
        }
    }

    /// One last drain when the agent stops: no backoff, results still
    /// waiting stay for the next start.
    pub(crate) async fn final_drain(&self, deadline: Duration) {
        let nothing_unsaved = lock(&self.unsaved).is_empty();
        if (self.outbox.is_empty() && nothing_unsaved) || self.session.rejected().is_cancelled() {
            return;
        }
        let mut backoff = Backoff::new(self.config.max_backoff);
        let _ = tokio::time::timeout(deadline, self.drain(&mut backoff, true)).await;
        let left = self.outbox.len();
        if left > 0 {
            tracing::info!(
                results = left,
                "undelivered results stay in the outbox for the next start"
            );
        }
        for result in lock(&self.unsaved).values() {
            // Neither written nor reported, and the process ends: the last
            // place it can be kept is the log.
            tracing::error!(
                attempt = %result.attempt_id,
                result = %serde_json::to_string(result).unwrap_or_default(),
                "stopping with a result that could not be written or reported; it is lost"
            );
        }
    }

    /// Reports everything in the outbox; `Err(wait)` on a failure worth
    /// retrying after `wait`. `all` includes results whose output is still
    /// being shipped.
    async fn drain(&self, backoff: &mut Backoff, all: bool) -> Result<(), Duration> {
        self.retry_unsaved(backoff).await?;
        loop {
            let ids = {
                let skip = |id: &str| !all && lock(&self.flushing).contains(id);
                self.outbox.list(OUTBOX_BATCH, skip)
            };
            let ids = match ids {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbox");
                    return Err(backoff.next());
                }
            };
            if ids.is_empty() {
                backoff.reset();
                return Ok(());
            }
            for id in ids {
                if self.session.rejected().is_cancelled() {
                    return Err(backoff.next());
                }
                self.deliver(&id, backoff).await?;
                self.metrics.set_outbox(self.outbox.len());
            }
        }
    }

    /// Reports one result and removes it once acknowledged.
    async fn deliver(&self, id: &str, backoff: &mut Backoff) -> Result<(), Duration> {
        let result = match self.outbox.get(id) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e @ StateError::Corrupt { .. }) => {
                tracing::error!(error = %e, "unreadable result in the outbox; moving it aside");
                return self.set_aside(id, backoff);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read a result from the outbox");
                return Err(backoff.next());
            }
        };
        let req = &result;
        let sent = self
            .session
            .call(|client, token| async move { client.result(&token, req).await })
            .await;
        match sent {
            Ok(ack) => {
                tracing::debug!(attempt = %id, recorded = ack.recorded, "result delivered");
                if let Err(e) = self.outbox.remove(id) {
                    tracing::error!(error = %e, "cannot remove a delivered result");
                    return Err(backoff.next());
                }
                Ok(())
            }
            Err(e) if refusal_is_final(&e) => {
                tracing::error!(attempt = %id, error = %e, "the server will never accept this result; moving it aside");
                self.set_aside(id, backoff)
            }
            Err(e) => {
                let wait = e
                    .retry_after()
                    .map(retry_after_jittered)
                    .unwrap_or_else(|| backoff.next());
                tracing::warn!(
                    attempt = %id,
                    error = %e,
                    retry_in_ms = wait.as_millis() as u64,
                    "reporting a result failed"
                );
                Err(wait)
            }
        }
    }

    fn set_aside(&self, id: &str, backoff: &mut Backoff) -> Result<(), Duration> {
        match self.outbox.set_aside(id) {
            Ok(to) => {
                tracing::error!(attempt = %id, file = %to.display(), "result moved aside");
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot move a result aside");
                Err(backoff.next())
            }
        }
    }
}

/// Stops the attempts the server listed: those in `kill` at once, the
/// others in `cancel` gracefully (`kill` is meant to be a subset of
/// `cancel`; an id only in `kill` is killed all the same).
fn stop_listed(jobs: &Jobs, cancel: &[String], kill: &[String], source: &str) {
    for id in kill {
        jobs.cancel_local(id, source, true);
    }
    for id in cancel.iter().filter(|id| !kill.contains(id)) {
        jobs.cancel_local(id, source, false);
    }
}

/// Counts an attempt task down when it ends, however it ends.
struct AliveGuard(Arc<Jobs>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.send_modify(|n| *n = n.saturating_sub(1));
    }
}

fn lease_of(lease_ms: u64) -> Duration {
    if lease_ms == 0 {
        DEFAULT_LEASE
    } else {
        Duration::from_millis(lease_ms).max(MIN_LEASE)
    }
}

/// Cuts an error text to what the server accepts, at a character
/// boundary, with an ellipsis where it was cut.
fn cap_error(error: &mut String) {
    if error.len() <= MAX_RESULT_ERROR {
        return;
    }
    let mut cut = MAX_RESULT_ERROR - '…'.len_utf8();
    while !error.is_char_boundary(cut) {
        cut -= 1;
    }
    error.truncate(cut);
    error.push('…');
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Why the artifacts of an attempt were not all uploaded; `path` is the
/// declared path (or one under a declared directory).
#[derive(Debug, thiserror::Error)]
enum ArtifactError {
    #[error(transparent)]
    Collect(#[from] artifacts::Error),
    #[error("cannot read artifact '{path}': {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("hashing {path} failed: {source}")]
    Hashing {
        path: String,
        source: tokio::task::JoinError,
    },
    #[error("artifact '{path}' not uploaded: the attempt was stopped")]
    Stopped { path: String },
    #[error("the agent's session ended")]
    SessionEnded,
    #[error("artifact '{path}' refused: {source}")]
    Refused { path: String, source: ClientError },
}

/// The sha256 of an open file, read from its start.
fn sha256_file(f: &mut std::fs::File) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::{Read, Seek};
    f.rewind()?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex_lower(&hasher.finalize()))
}

fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// How long an attempt runs quietly before its start is reported.
const START_REPORT_DELAY: Duration = Duration::from_millis(50);

/// Sends the start notice, then the output chunks in order. A chunk the
/// server refuses (over the cap, …) is dropped; one that cannot reach it is
/// retried with backoff until it arrives or the agent stops. Nothing is
/// queued without bound (the executor's channel is bounded).
async fn ship_logs(
    session: Arc<Session>,
    attempt_id: String,
    start: StartRequest,
    mut rx: mpsc::Receiver<LogUpload>,
    max_backoff: Duration,
) {
    let id = attempt_id.as_str();
    let start = &start;
    // The start is reported only once the attempt has output or is still
    // going after a moment: a short, quiet one ends first, and its result
    // carries its start time, which saves a request and a commit.
    let first = tokio::select! {
        chunk = rx.recv() => match chunk {
            Some(chunk) => Some(chunk),
            None => return,
        },
        _ = tokio::time::sleep(START_REPORT_DELAY) => None,
    };
    let r = session
        .call(|client, token| async move { client.start(&token, id, start).await })
        .await;
    if let Err(e) = r {
        tracing::warn!(attempt = %id, error = %e, "could not report the start; running anyway");
    }
    let mut first = first;
    loop {
        let chunk = match first.take() {
            Some(chunk) => chunk,
            None => match rx.recv().await {
                Some(chunk) => chunk,
                None => break,
            },
        };
        let chunk = &chunk;
        let mut backoff = Backoff::new(max_backoff);
        loop {
            let r = session
                .call(|client, token| async move { client.logs(&token, id, chunk).await })
                .await;
            match r {
                Ok(()) => break,
                Err(e) if e.is_terminal() => return,
                // The server is away: keep the chunk and try again. Memory
                // stays bounded: the executor coalesces, then drops, output
                // while this channel is full.
                Err(e) if is_transient(&e) => {
                    let wait = backoff.next().max(e.retry_after().unwrap_or_default());
                    if backoff.failures == 1 || backoff.failures % 10 == 0 {
                        tracing::warn!(attempt = %id, seq = chunk.seq, error = %e, "shipping output failed; retrying");
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    tracing::warn!(attempt = %id, seq = chunk.seq, error = %e, "dropping a log chunk");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_ids_table() {
        let cases = [
            ("0192f0c3-7a1e-7d2b-9f00-1234567890ab", true),
            ("att_1.2", true),
            ("", false),
            (".hidden", false),
            ("..", false),
            ("../etc/passwd", false),
            ("a/b", false),
            ("a b", false),
            ("é", false),
        ];
        for (id, want) in cases {
            assert_eq!(valid_attempt_id(id), want, "{id:?}");
        }
        assert!(!valid_attempt_id(&"a".repeat(129)));
    }

    #[test]
    fn long_errors_are_cut_to_what_the_server_accepts() {
        // (text, its length after the cut)
        let cases = [
            ("x".repeat(MAX_RESULT_ERROR), MAX_RESULT_ERROR),
            ("x".repeat(MAX_RESULT_ERROR + 1), MAX_RESULT_ERROR),
            // Cut at a character boundary: 'é' is two bytes.
            ("é".repeat(MAX_RESULT_ERROR), MAX_RESULT_ERROR - 1),
            ("short".to_owned(), 5),
        ];
        for (text, want) in cases {
            let mut error = text.clone();
            cap_error(&mut error);
            assert_eq!(error.len(), want, "{}", &text[..10.min(text.len())]);
            assert_eq!(error.ends_with('…'), text.len() > MAX_RESULT_ERROR);
        }
    }

    #[test]
    fn leases_table() {
        let cases = [
            (0, DEFAULT_LEASE),
            (1, MIN_LEASE),
            (999, MIN_LEASE),
            (30_000, Duration::from_secs(30)),
        ];
        for (lease_ms, want) in cases {
            assert_eq!(lease_of(lease_ms), want, "{lease_ms}");
        }
    }

    #[test]
    fn final_refusals_table() {
        let refused = |status| ClientError::Refused {
            status,
            code: drover_proto::ErrorCode::Unknown,
            message: String::new(),
            retry_after: None,
        };
        for (status, is_final, transient) in [
            (400, true, false),
            (403, true, false),
            (404, true, false),
            (422, true, false),
            (401, false, false),
            (409, false, false),
            (429, false, true),
            (500, false, true),
            (503, false, true),
        ] {
            assert_eq!(refusal_is_final(&refused(status)), is_final, "{status}");
            assert_eq!(is_transient(&refused(status)), transient, "{status}");
        }
    }
}
