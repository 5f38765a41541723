//! The supervision loop every attempt runs through: a `Workload` (a
//! process, a container or an exec) is followed until it exits, its
//! output taken in, the timeout, cancel, forced stop and drain applied,
//! and the result decided from how it ended.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use drover_proto::jobs::{Assignment, AttemptResult, LogUpload, Outcome, Stream};
use drover_proto::sandbox::LimitExceeded;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::error::{Error, Failure};
use super::output::{read_outputs_file, OutputScanner, StreamLog};

/// Partial output is sent at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(150);
/// After the main process exits, how long its output is still read (a
/// background child may hold the pipes open).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);
/// Bytes of stdout a step may keep for the agent itself (a commit id).
const CAPTURE_LIMIT: usize = 4096;

/// How an attempt is to be stopped: `cancel` asks gracefully (SIGTERM,
/// then SIGKILL after the kill grace), `kill` at once (a forced stop).
#[derive(Debug, Clone, Default)]
pub struct Stop {
    cancel: CancellationToken,
    kill: CancellationToken,
}

impl Stop {
    pub fn new() -> Stop {
        Stop::default()
    }

    /// A stop that is also cancelled (gracefully) when `parent` is.
    pub fn child_of(parent: &CancellationToken) -> Stop {
        Stop {
            cancel: parent.child_token(),
            kill: CancellationToken::new(),
        }
    }

    /// Stops the attempt gracefully.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Stops the attempt at once, even while a graceful stop waits out
    /// its grace.
    pub fn kill(&self) {
        self.kill.cancel();
        self.cancel.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    pub fn is_killed(&self) -> bool {
        self.kill.is_cancelled()
    }

    /// Resolves once the attempt is to stop, gracefully or not.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// Resolves once the attempt is to be killed at once.
    pub async fn killed(&self) {
        self.kill.cancelled().await
    }
}

/// A signal the agent sends to a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    Term,
    Kill,
}

impl Signal {
    pub(crate) fn number(self) -> i32 {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
        }
    }
}

/// How a workload's main process ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The engine killed it for going beyond its memory limit.
    pub oom_killed: bool,
}

impl Exit {
    pub(crate) fn success(&self) -> bool {
        self.code == Some(0) && self.signal.is_none()
    }

    /// An exit status of a container or an exec: `128 + n` stands for
    /// signal `n` when the agent or the engine killed it (a program may
    /// also exit with such a status on its own, so it is read as a signal
    /// only then).
    pub(crate) fn from_status(status: Option<i64>, signalled: bool, oom_killed: bool) -> Exit {
        let code = status.and_then(|s| i32::try_from(s).ok());
        match code {
            Some(c) if (signalled || oom_killed) && (129..=128 + 64).contains(&c) => Exit {
                code: None,
                signal: Some(c - 128),
                oom_killed,
            },
            _ => Exit {
                code,
                signal: None,
                oom_killed,
            },
        }
    }
}

/// What a workload reports to the supervision loop.
#[derive(Debug)]
pub(crate) enum Event {
    Output(Stream, Bytes),
    /// An output stream ended (the loop then checks whether all is done).
    OutputClosed,
    Exited(Exit),
}

/// A process, a container or an exec under supervision.
pub(crate) trait Workload {
    /// The next output, the end of an output stream, or the end of the
    /// main process (each reported once).
    /// Must be cancel-safe: the loop drops it to handle timers. An error
    /// means the workload cannot be followed any more.
    async fn next(&mut self) -> Result<Event, Error>;
    /// Whether output may still come.
    fn output_open(&self) -> bool;
    /// Sends `sig` to everything the workload runs. An error means it
    /// cannot be stopped from here, which ends the supervision.
    async fn signal(&mut self, sig: Signal) -> Result<(), Error>;
    /// After the loop: whatever the main process left behind is killed.
    async fn finish(&mut self);
}

/// How a supervised step ended.
#[derive(Debug, Default)]
pub(crate) struct Ended {
    pub exit: Option<Exit>,
    /// The agent sent SIGKILL (after the grace, or at once).
    pub killed: bool,
}

/// Supervises the workloads of one attempt: one or several steps (a git
/// checkout runs a few processes) share its logs, its deadline and its
/// stop, and the outcome is decided from all of them.
pub(crate) struct Supervisor<'a> {
    attempt: &'a Assignment,
    stop: &'a Stop,
    logs: &'a mpsc::Sender<LogUpload>,
    out: StreamLog,
    err: StreamLog,
    scan: OutputScanner,
    /// Stdout kept for the agent, when a step asks for it.
    capture: Option<Vec<u8>>,
    started_at: DateTime<Utc>,
    clock: Instant,
    timeout: Duration,
    grace: Duration,
    deadline: tokio::time::Instant,
    /// Set once the agent decided to end the attempt.
    stopped_by: Option<Outcome>,
    /// The stop was a forced one.
    forced: bool,
}

impl<'a> Supervisor<'a> {
    pub(crate) fn new(
        attempt: &'a Assignment,
        stop: &'a Stop,
        logs: &'a mpsc::Sender<LogUpload>,
    ) -> Supervisor<'a> {
        let timeout = Duration::from_millis(attempt.timeout_ms);
        Supervisor {
            attempt,
            stop,
            logs,
            out: StreamLog::new(Stream::Stdout, attempt.log_cap_bytes).with_masks(&attempt.mask),
            err: StreamLog::new(Stream::Stderr, attempt.log_cap_bytes).with_masks(&attempt.mask),
            scan: OutputScanner::default(),
            capture: None,
            started_at: Utc::now(),
            clock: Instant::now(),
            timeout,
            grace: Duration::from_millis(attempt.kill_grace_ms),
            deadline: tokio::time::Instant::now() + timeout,
            stopped_by: None,
            forced: false,
        }
    }

    /// Whether the attempt was stopped (timed out or cancelled).
    pub(crate) fn stopped(&self) -> bool {
        self.stopped_by.is_some()
    }

    /// A line of the agent's own on the attempt's stderr, e.g. which image
    /// it pulls.
    pub(crate) fn note(&mut self, text: &str) {
        self.err.push(format!("[drover] {text}\n").as_bytes());
        self.err.send_full(self.logs);
    }

    /// Keeps the stdout of the next steps (up to a small bound) for the
    /// agent, besides logging it.
    pub(crate) fn capture_stdout(&mut self) {
        self.capture = Some(Vec::new());
    }

    /// What was kept since `capture_stdout`, which it ends.
    pub(crate) fn take_capture(&mut self) -> Vec<u8> {
        self.capture.take().unwrap_or_default()
    }

    /// Runs a step that is not supervised (a pull, a create) unless the
    /// attempt times out or is stopped first, in which case the step is
    /// dropped and `Failure::Stopped` returned.
    pub(crate) async fn bounded<F: Future>(&mut self, step: F) -> Result<F::Output, Failure> {
        if self.stopped_by.is_some() {
            return Err(Failure::Stopped);
        }
        let stop = self.stop;
        tokio::select! {
            v = step => Ok(v),
            _ = tokio::time::sleep_until(self.deadline) => {
                self.stopped_by = Some(Outcome::TimedOut);
                Err(Failure::Stopped)
            }
            _ = stop.cancelled() => {
                self.stopped_by = Some(Outcome::Cancelled);
                self.forced = stop.is_killed();
                Err(Failure::Stopped)
            }
        }
    }

    fn take_output(&mut self, stream: Stream, bytes: &[u8]) {
        match stream {
            Stream::Stdout => {
                self.scan.push(bytes);
                if let Some(c) = &mut self.capture {
                    let room = CAPTURE_LIMIT.saturating_sub(c.len());
                    c.extend_from_slice(&bytes[..room.min(bytes.len())]);
                }
                self.out.push(bytes);
                self.out.send_full(self.logs);
            }
            Stream::Stderr => {
                self.err.push(bytes);
                self.err.send_full(self.logs);
            }
        }
    }

    /// Ends a workload gracefully (SIGTERM, SIGKILL after the grace) or,
    /// on a forced stop, at once.
    async fn terminate<W: Workload>(
        &mut self,
        w: &mut W,
        ended: &mut Ended,
        kill_at: &mut Option<tokio::time::Instant>,
    ) -> Result<(), Error> {
        if self.stop.is_killed() {
            self.forced = true;
            ended.killed = true;
            *kill_at = None;
            return w.signal(Signal::Kill).await;
        }
        *kill_at = Some(tokio::time::Instant::now() + self.grace);
        w.signal(Signal::Term).await
    }

    /// Follows `w` until it has exited and its output is drained (or the
    /// drain time is over), applying the timeout and stops on the way.
    /// An error means the workload could not be followed or stopped.
    pub(crate) async fn supervise<W: Workload>(&mut self, w: &mut W) -> Result<Ended, Error> {
        let id = &self.attempt.attempt_id;
        let stop = self.stop;
        let mut ended = Ended::default();
        let mut kill_at: Option<tokio::time::Instant> = None;
        let mut drain_until: Option<tokio::time::Instant> = None;
        let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A stop decided during an earlier step applies at once.
        if self.stopped_by.is_some() {
            if let Err(why) = self.terminate(w, &mut ended, &mut kill_at).await {
                w.finish().await;
                return Err(why);
            }
        }
        let failure = loop {
            if ended.exit.is_some() && !w.output_open() {
                break None;
            }
            let running = ended.exit.is_none();
            tokio::select! {
                ev = w.next() => match ev {
                    Ok(Event::Output(stream, bytes)) => self.take_output(stream, &bytes),
                    Ok(Event::OutputClosed) => {}
                    Ok(Event::Exited(exit)) => {
                        ended.exit = Some(exit);
                        kill_at = None;
                        drain_until = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
                    }
                    Err(why) => break Some(why),
                },
                _ = tokio::time::sleep_until(self.deadline), if running && self.stopped_by.is_none() => {
                    tracing::info!(attempt = %id, "timed out; terminating");
                    self.stopped_by = Some(Outcome::TimedOut);
                    if let Err(why) = self.terminate(w, &mut ended, &mut kill_at).await {
                        break Some(why);
                    }
                }
                _ = stop.cancelled(), if running && self.stopped_by.is_none() => {
                    tracing::info!(attempt = %id, "cancelled; terminating");
                    self.stopped_by = Some(Outcome::Cancelled);
                    if let Err(why) = self.terminate(w, &mut ended, &mut kill_at).await {
                        break Some(why);
                    }
                }
                _ = stop.killed(), if running && !ended.killed => {
                    tracing::info!(attempt = %id, "killed at once (forced stop)");
                    self.stopped_by.get_or_insert(Outcome::Cancelled);
                    self.forced = true;
                    ended.killed = true;
                    kill_at = None;
                    if let Err(why) = w.signal(Signal::Kill).await {
                        break Some(why);
                    }
                }
                _ = tokio::time::sleep_until(kill_at.unwrap_or(far)), if running && kill_at.is_some() => {
                    tracing::warn!(attempt = %id, "still running after the grace period; killing");
                    ended.killed = true;
                    kill_at = None;
                    if let Err(why) = w.signal(Signal::Kill).await {
                        break Some(why);
                    }
                }
                _ = tokio::time::sleep_until(drain_until.unwrap_or(far)), if drain_until.is_some() => break None,
                _ = tick.tick() => {
                    self.out.send_pending(self.logs, false);
                    self.err.send_pending(self.logs, false);
                }
            }
        };
        w.finish().await;
        match failure {
            Some(why) => {
                tracing::warn!(attempt = %id, error = %why, "lost track of the workload");
                Err(why)
            }
            None => Ok(ended),
        }
    }

    /// The result of an attempt whose workload ran: the agent's stop wins,
    /// then a `limit` the caller found exceeded, then the exit status and
    /// the outputs (`::set-output` lines and the outputs file).
    pub(crate) fn finish(
        &mut self,
        ended: &Ended,
        outputs_file: Option<&Path>,
        limit: Option<(LimitExceeded, String)>,
    ) -> AttemptResult {
        let exit = ended.exit.unwrap_or_default();
        self.scan.end_line();
        let mut outputs = std::mem::take(&mut self.scan.outputs);
        let outputs_error = outputs_file.and_then(|p| read_outputs_file(p, &mut outputs).err());
        let (outcome, error, limit) = match (self.stop_outcome(), limit) {
            (Some((outcome, why)), _) => (outcome, Some(why), None),
            (None, Some((limit, why))) => (Outcome::Failed, Some(why), Some(limit)),
            (None, None) if exit.success() => match outputs_error {
                None => (Outcome::Succeeded, None, None),
                Some(e) => (Outcome::Failed, Some(e.to_string()), None),
            },
            (None, None) => (
                Outcome::Failed,
                exit.signal.map(|s| format!("killed by signal {s}")),
                None,
            ),
        };
        let mut result = self.result(outcome, error);
        result.exit_code = exit.code;
        result.signal = exit.signal;
        result.outputs = outputs;
        result.limit_exceeded = limit;
        result
    }

    /// The result of a built-in that did its work.
    pub(crate) fn succeed(&mut self) -> AttemptResult {
        match self.stop_outcome() {
            Some((outcome, why)) => self.result(outcome, Some(why)),
            None => self.result(Outcome::Succeeded, None),
        }
    }

    /// The result of an attempt that did not get to run to its end.
    pub(crate) fn fail(&mut self, failure: Failure) -> AttemptResult {
        let (outcome, why) = match (failure, self.stop_outcome()) {
            (Failure::Rejected(why), _) => {
                let mut r = self.result(Outcome::Rejected, Some(why.to_string()));
                r.started_at = None;
                return r;
            }
            (_, Some(stopped)) => stopped,
            (Failure::Failed(e), None) => (Outcome::Failed, e.to_string()),
            (Failure::Stopped, None) => (Outcome::Failed, "stopped".to_owned()),
        };
        self.result(outcome, Some(why))
    }

    fn stop_outcome(&self) -> Option<(Outcome, String)> {
        match self.stopped_by? {
            Outcome::TimedOut => Some((
                Outcome::TimedOut,
                format!(
                    "timed out after {}",
                    humantime::format_duration(self.timeout)
                ),
            )),
            o if self.forced => Some((o, "cancelled: killed at once (forced stop)".to_owned())),
            o => Some((o, "cancelled".to_owned())),
        }
    }

    fn result(&mut self, outcome: Outcome, error: Option<String>) -> AttemptResult {
        self.out.finish(self.logs);
        self.err.finish(self.logs);
        AttemptResult {
            attempt_id: self.attempt.attempt_id.clone(),
            outcome,
            exit_code: None,
            signal: None,
            started_at: Some(self.started_at),
            finished_at: Utc::now(),
            duration_ms: self.clock.elapsed().as_millis() as u64,
            error,
            stdout_truncated: self.out.truncated,
            stderr_truncated: self.err.truncated,
            outputs: BTreeMap::new(),
            limit_exceeded: None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::test_support::{assignment, rt, run};

    #[test]
    fn an_exit_is_reported_without_waiting_for_the_drain() {
        // The drain is for pipes a background child holds open; a process
        // that closed them is done at once.
        for _ in 0..3 {
            let r = rt().block_on(run(&assignment(&["true"]), &Stop::new()));
            assert_eq!(r.result.outcome, Outcome::Succeeded);
            assert!(r.elapsed < DRAIN_AFTER_EXIT, "{:?}", r.elapsed);
        }
        // One that left a child holding them is ended after the drain,
        // and the child with it.
        let r = rt().block_on(run(&assignment(&["sh", "-c", "sleep 30 &"]), &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::Succeeded);
        assert!(r.elapsed >= DRAIN_AFTER_EXIT, "{:?}", r.elapsed);
        assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
    }

    /// True while any process of group `pgid` exists.
    fn group_alive(pgid: i32) -> bool {
        #[allow(unsafe_code)]
        // SAFETY: signal 0 only checks that the group exists.
        let rc = unsafe { libc::kill(-pgid, 0) };
        rc == 0
    }

    fn wait_group_gone(pgid: i32) -> bool {
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            if !group_alive(pgid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn timeout_kills_the_whole_process_group() {
        let mut a = assignment(&["sh", "-c", "echo $$; sleep 100 & sleep 100"]);
        a.timeout_ms = 300;
        a.kill_grace_ms = 5_000;
        let r = rt().block_on(run(&a, &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::TimedOut, "{:?}", r.result);
        assert!(r.result.error.unwrap_or_default().contains("timed out"));
        // SIGTERM sufficed: no need to wait for the grace period.
        assert!(r.elapsed < Duration::from_secs(3), "{:?}", r.elapsed);
        let pgid: i32 = r.stdout.trim().parse().unwrap();
        assert!(wait_group_gone(pgid), "group {pgid} survived");
    }

    #[test]
    fn sigterm_ignoring_process_gets_sigkill_after_grace() {
        let mut a = assignment(&["sh", "-c", "trap '' TERM; echo $$; sleep 100; sleep 100"]);
        a.timeout_ms = 200;
        a.kill_grace_ms = 700;
        let r = rt().block_on(run(&a, &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::TimedOut, "{:?}", r.result);
        assert_eq!(r.result.signal, Some(libc::SIGKILL));
        assert!(r.elapsed >= Duration::from_millis(850), "{:?}", r.elapsed);
        assert!(r.elapsed < Duration::from_secs(4), "{:?}", r.elapsed);
        let pgid: i32 = r.stdout.trim().parse().unwrap();
        assert!(wait_group_gone(pgid), "group {pgid} survived");
    }

    #[test]
    fn cancel_terminates() {
        let a = assignment(&["sleep", "100"]);
        let stop = Stop::new();
        let r = rt().block_on(async {
            crate::test_support::stop_later(&stop, Duration::from_millis(200), false);
            run(&a, &stop).await
        });
        assert_eq!(r.result.outcome, Outcome::Cancelled);
        assert_eq!(r.result.signal, Some(libc::SIGTERM));
        assert!(r.elapsed < Duration::from_secs(3), "{:?}", r.elapsed);
    }

    #[test]
    fn exit_statuses_table() {
        let exit = |code, signal, oom| Exit {
            code,
            signal,
            oom_killed: oom,
        };
        let cases = [
            ((Some(0), false, false), exit(Some(0), None, false)),
            // A program may exit 137 on its own: a signal only when the
            // agent or the engine sent one.
            ((Some(137), false, false), exit(Some(137), None, false)),
            ((Some(137), true, false), exit(None, Some(9), false)),
            ((Some(143), true, false), exit(None, Some(15), false)),
            ((Some(137), false, true), exit(None, Some(9), true)),
            ((Some(1), true, false), exit(Some(1), None, false)),
            ((None, true, false), exit(None, None, false)),
        ];
        for ((status, signalled, oom), want) in cases {
            assert_eq!(
                Exit::from_status(status.map(i64::from), signalled, oom),
                want,
                "{status:?} {signalled} {oom}"
            );
        }
    }
}
