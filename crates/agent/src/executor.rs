//! Runs one attempt: its argv as a process (never through a shell), in its
//! own process group and working dir, with a clean environment, a timeout,
//! cancellation, and its output cut into log chunks.
//!
//! Key design decision: the executor knows nothing about the server. Output
//! goes to a bounded channel of `LogUpload`s and the result is returned, so
//! it is tested without one. It never waits on that channel: when the
//! uploader falls behind, output is coalesced up to a bound and then
//! dropped with a marker, so a chatty process is never slowed down.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use drover_proto::jobs::{
    Assignment, AttemptResult, LogUpload, Outcome, Stream, BUILTIN_NOOP, MAX_LOG_CHUNK,
};
use drover_proto::workflows::{
    parse_set_output, valid_output_name, MAX_OUTPUTS, MAX_OUTPUT_VALUE, OUTPUT_FILE_ENV,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Partial output is sent at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(150);
/// Output waiting for the uploader, per stream, beyond which it is dropped.
const PENDING_LIMIT: usize = 4 * MAX_LOG_CHUNK;
/// After the main process exits, how long its pipes are still read (a
/// background child may hold them open).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);
/// PATH when the agent itself has none.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Where and how attempts run.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Each attempt runs in a fresh `<work_root>/<attempt_id>`, removed after.
    pub work_root: PathBuf,
    /// The PATH processes get; nothing else of the agent's environment is
    /// passed on.
    pub path: String,
}

/// A result for an attempt that was not run.
pub fn rejected(a: &Assignment, error: String) -> AttemptResult {
    let now = Utc::now();
    AttemptResult {
        attempt_id: a.attempt_id.clone(),
        outcome: Outcome::Rejected,
        exit_code: None,
        signal: None,
        started_at: None,
        finished_at: now,
        duration_ms: 0,
        error: Some(error),
        stdout_truncated: false,
        stderr_truncated: false,
        outputs: BTreeMap::new(),
    }
}

/// The working dir of an attempt.
pub fn work_dir(opts: &ExecOptions, a: &Assignment) -> PathBuf {
    opts.work_root.join(&a.attempt_id)
}

/// Removes an attempt's working dir (and its outputs file).
pub fn remove_work_dir(opts: &ExecOptions, a: &Assignment) {
    let dir = work_dir(opts, a);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove the working dir")
        }
    }
    let _ = std::fs::remove_file(outputs_file(opts, a));
}

/// Where a process may write its outputs as a JSON object: beside the
/// working dir, so it is never collected as an artifact.
fn outputs_file(opts: &ExecOptions, a: &Assignment) -> PathBuf {
    opts.work_root
        .join(format!("{}.outputs.json", a.attempt_id))
}

/// Runs `a` to its end (exit, timeout or `cancel`) and says how it ended.
/// Output chunks go to `logs`; a closed channel just discards them.
pub async fn execute(
    a: &Assignment,
    opts: &ExecOptions,
    cancel: &CancellationToken,
    logs: &mpsc::Sender<LogUpload>,
) -> AttemptResult {
    let started_at = Utc::now();
    let clock = Instant::now();
    let finish = |outcome, error: Option<String>| AttemptResult {
        attempt_id: a.attempt_id.clone(),
        outcome,
        exit_code: None,
        signal: None,
        started_at: Some(started_at),
        finished_at: Utc::now(),
        duration_ms: clock.elapsed().as_millis() as u64,
        error,
        stdout_truncated: false,
        stderr_truncated: false,
        outputs: BTreeMap::new(),
    };
    let Some(program) = a.argv.first() else {
        return finish(
            Outcome::Failed,
            Some("the action has an empty argv".to_owned()),
        );
    };
    if a.argv.len() == 1 && program == BUILTIN_NOOP {
        return finish(Outcome::Succeeded, None);
    }
    let work_dir = work_dir(opts, a);
    if let Err(e) = std::fs::create_dir_all(&work_dir) {
        let why = format!("cannot create the working dir {}: {e}", work_dir.display());
        return finish(Outcome::Failed, Some(why));
    }
    let outputs_path = outputs_file(opts, a);
    let result = run_process(
        a,
        opts,
        &work_dir,
        &outputs_path,
        cancel,
        logs,
        started_at,
        clock,
    )
    .await;
    // Artifacts are collected from the working dir by the caller, which
    // removes it after.
    if a.artifacts.is_empty() {
        remove_work_dir(opts, a);
    } else {
        let _ = std::fs::remove_file(&outputs_path);
    }
    result.unwrap_or_else(|why| finish(Outcome::Failed, Some(why)))
}

/// Collects `::set-output name=value` lines from stdout, within bounds.
#[derive(Debug, Default)]
struct OutputScanner {
    line: Vec<u8>,
    /// The current line is too long to be an output line.
    overlong: bool,
    outputs: BTreeMap<String, String>,
}

impl OutputScanner {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.end_line();
            } else if !self.overlong {
                self.line.push(b);
                if self.line.len() > MAX_OUTPUT_VALUE + 128 {
                    self.overlong = true;
                    self.line.clear();
                }
            }
        }
    }

    fn end_line(&mut self) {
        if !self.overlong {
            let text = String::from_utf8_lossy(&self.line);
            let text = text.strip_suffix('\r').unwrap_or(&text);
            if let Some((name, value)) = parse_set_output(text) {
                set_output(&mut self.outputs, name, value.to_owned());
            }
        }
        self.line.clear();
        self.overlong = false;
    }
}

fn set_output(outputs: &mut BTreeMap<String, String>, name: &str, value: String) {
    if value.len() > MAX_OUTPUT_VALUE {
        tracing::warn!(
            output = name,
            bytes = value.len(),
            "output value too long; ignored"
        );
        return;
    }
    if outputs.len() >= MAX_OUTPUTS && !outputs.contains_key(name) {
        tracing::warn!(output = name, "too many outputs; ignored");
        return;
    }
    outputs.insert(name.to_owned(), value);
}

/// Reads the outputs file a process may have written: a JSON object whose
/// string values are taken as is and other values as JSON text.
fn read_outputs_file(
    path: &std::path::Path,
    outputs: &mut BTreeMap<String, String>,
) -> Result<(), String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot read ${OUTPUT_FILE_ENV}: {e}")),
    };
    if text.len() > MAX_OUTPUTS * MAX_OUTPUT_VALUE {
        return Err(format!(
            "${OUTPUT_FILE_ENV} is larger than {} bytes",
            MAX_OUTPUTS * MAX_OUTPUT_VALUE
        ));
    }
    let map: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&text)
        .map_err(|e| format!("${OUTPUT_FILE_ENV} must hold a JSON object: {e}"))?;
    for (name, value) in map {
        if !valid_output_name(&name) {
            return Err(format!(
                "${OUTPUT_FILE_ENV}: '{name}' is not a valid output name"
            ));
        }
        let value = match value {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        set_output(outputs, &name, value);
    }
    Ok(())
}

/// How the main process ended, before it is turned into a result.
struct Ended {
    status: Option<ExitStatus>,
    /// Set when the agent ended it (timeout or cancel).
    by_agent: Option<Outcome>,
}

#[allow(clippy::too_many_arguments)]
async fn run_process(
    a: &Assignment,
    opts: &ExecOptions,
    work_dir: &std::path::Path,
    outputs_path: &std::path::Path,
    cancel: &CancellationToken,
    logs: &mpsc::Sender<LogUpload>,
    started_at: DateTime<Utc>,
    clock: Instant,
) -> Result<AttemptResult, String> {
    let program = &a.argv[0];
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&a.argv[1..])
        .env_clear()
        .env("PATH", &opts.path)
        .envs(&a.env)
        .env(OUTPUT_FILE_ENV, outputs_path)
        .current_dir(work_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[cfg(unix)]
    cmd.process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run '{program}': {e}"))?;
    // With process_group(0) the group id is the child's pid.
    let pgid = child.id();
    let mut out = StreamLog::new(Stream::Stdout, a.log_cap_bytes);
    let mut err = StreamLog::new(Stream::Stderr, a.log_cap_bytes);
    let mut scan = OutputScanner::default();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let (mut out_buf, mut err_buf) = (vec![0u8; 8192], vec![0u8; 8192]);

    let timeout = Duration::from_millis(a.timeout_ms);
    let grace = Duration::from_millis(a.kill_grace_ms);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ended = Ended {
        status: None,
        by_agent: None,
    };
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut drain_until: Option<tokio::time::Instant> = None;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);

    loop {
        if ended.status.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        tokio::select! {
            n = read_some(&mut stdout, &mut out_buf) => match n {
                Some(n) => { scan.push(&out_buf[..n]); out.push(&out_buf[..n]); out.send_full(logs); }
                None => stdout = None,
            },
            n = read_some(&mut stderr, &mut err_buf) => match n {
                Some(n) => { err.push(&err_buf[..n]); err.send_full(logs); }
                None => stderr = None,
            },
            status = child.wait(), if ended.status.is_none() => {
                match status {
                    Ok(s) => ended.status = Some(s),
                    Err(e) => {
                        // Cannot happen short of a kernel oddity; do not spin.
                        tracing::error!(error = %e, "waiting for the process failed");
                        signal_group(pgid, Signal::Kill);
                        return Err(format!("waiting for '{program}' failed: {e}"));
                    }
                }
                drain_until = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
            }
            _ = &mut deadline, if ended.by_agent.is_none() && ended.status.is_none() => {
                tracing::info!(attempt = %a.attempt_id, "timed out; terminating");
                ended.by_agent = Some(Outcome::TimedOut);
                signal_group(pgid, Signal::Term);
                kill_at = Some(tokio::time::Instant::now() + grace);
            }
            _ = cancel.cancelled(), if ended.by_agent.is_none() && ended.status.is_none() => {
                tracing::info!(attempt = %a.attempt_id, "cancelled; terminating");
                ended.by_agent = Some(Outcome::Cancelled);
                signal_group(pgid, Signal::Term);
                kill_at = Some(tokio::time::Instant::now() + grace);
            }
            _ = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                tracing::warn!(attempt = %a.attempt_id, "still running after the grace period; killing");
                if !signal_group(pgid, Signal::Kill) {
                    let _ = child.start_kill();
                }
                kill_at = None;
            }
            _ = tokio::time::sleep_until(drain_until.unwrap_or(far)), if drain_until.is_some() => break,
            _ = tick.tick() => {
                out.send_pending(logs, false);
                err.send_pending(logs, false);
            }
        }
    }
    // The attempt's process group does not outlive it: whatever the main
    // process left behind is killed (ESRCH when nothing is left is fine).
    signal_group(pgid, Signal::Kill);
    out.finish(logs);
    err.finish(logs);

    let status = ended.status;
    let exit_code = status.and_then(|s| s.code());
    let signal = status.and_then(exit_signal);
    scan.end_line();
    let mut outputs = scan.outputs;
    let outputs_error = read_outputs_file(outputs_path, &mut outputs).err();
    let (outcome, error) = match ended.by_agent {
        Some(Outcome::TimedOut) => (
            Outcome::TimedOut,
            Some(format!(
                "timed out after {}",
                humantime::format_duration(timeout)
            )),
        ),
        Some(o) => (o, Some("cancelled".to_owned())),
        None if status.is_some_and(|s| s.success()) => match outputs_error {
            None => (Outcome::Succeeded, None),
            Some(e) => (Outcome::Failed, Some(e)),
        },
        None => (
            Outcome::Failed,
            signal.map(|s| format!("killed by signal {s}")),
        ),
    };
    Ok(AttemptResult {
        attempt_id: a.attempt_id.clone(),
        outcome,
        exit_code,
        signal,
        started_at: Some(started_at),
        finished_at: Utc::now(),
        duration_ms: clock.elapsed().as_millis() as u64,
        error,
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        outputs,
    })
}

#[cfg(unix)]
fn exit_signal(s: ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    s.signal()
}

#[cfg(not(unix))]
fn exit_signal(_: ExitStatus) -> Option<i32> {
    None
}

/// Reads what is there; `None` at end of stream or on error. A missing
/// reader never completes, so a closed pipe drops out of the select.
async fn read_some<R: AsyncRead + Unpin>(r: &mut Option<R>, buf: &mut [u8]) -> Option<usize> {
    let Some(reader) = r else {
        return std::future::pending().await;
    };
    match reader.read(buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

#[derive(Debug, Clone, Copy)]
enum Signal {
    Term,
    Kill,
}

/// Sends a signal to every process of the group `pgid`. False when it
/// could not be sent (the group is gone, or no such platform support).
#[cfg(unix)]
#[allow(unsafe_code)]
fn signal_group(pgid: Option<u32>, sig: Signal) -> bool {
    // kill(-1) would signal every process we may signal, and kill(0) our
    // own group: only a real group id of a child is acceptable.
    let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()).filter(|&p| p > 1) else {
        return false;
    };
    let sig = match sig {
        Signal::Term => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
    };
    // SAFETY: kill(2) takes two integers and touches no memory of this
    // process; a negative pid addresses the process group. The group id is
    // that of a child we started in its own group, checked to be > 1 above.
    let rc = unsafe { libc::kill(-pgid, sig) };
    rc == 0
}

#[cfg(not(unix))]
fn signal_group(_pgid: Option<u32>, _sig: Signal) -> bool {
    false
}

/// One output stream on its way to log chunks: the cap, the marker, the
/// sequence numbers, and the bytes not yet sent.
struct StreamLog {
    stream: Stream,
    seq: u64,
    cap: u64,
    /// Output bytes read so far, kept or not.
    seen: u64,
    truncated: bool,
    pending: Vec<u8>,
    /// In a run of output dropped because the uploader fell behind.
    dropping: bool,
    /// The uploader is gone: discard everything.
    closed: bool,
}

impl StreamLog {
    fn new(stream: Stream, cap: u64) -> StreamLog {
        StreamLog {
            stream,
            seq: 0,
            cap,
            seen: 0,
            truncated: false,
            pending: Vec::new(),
            dropping: false,
            closed: false,
        }
    }

    /// Takes in output just read, keeping what the cap allows.
    fn push(&mut self, bytes: &[u8]) {
        let room = self.cap.saturating_sub(self.seen);
        self.seen += bytes.len() as u64;
        if self.truncated || self.closed {
            return;
        }
        let keep = usize::try_from(room).unwrap_or(usize::MAX).min(bytes.len());
        self.append(&bytes[..keep]);
        if keep < bytes.len() {
            self.truncated = true;
            // The marker goes in whatever the backlog, once.
            let marker = format!("\n[drover: output truncated after {} bytes]\n", self.cap);
            self.pending.extend_from_slice(marker.as_bytes());
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.pending.len() + bytes.len() <= PENDING_LIMIT {
            self.pending.extend_from_slice(bytes);
            self.dropping = false;
        } else if !self.dropping {
            self.dropping = true;
            self.pending
                .extend_from_slice(b"\n[drover: output dropped: log upload fell behind]\n");
        }
    }

    /// Sends the full chunks waiting.
    fn send_full(&mut self, logs: &mpsc::Sender<LogUpload>) {
        while self.pending.len() >= MAX_LOG_CHUNK {
            if !self.send_one(logs, false) {
                break;
            }
        }
    }

    /// Sends all that waits (but an incomplete character, unless `eof`),
    /// as long as the channel has room.
    fn send_pending(&mut self, logs: &mpsc::Sender<LogUpload>, eof: bool) {
        while !self.pending.is_empty() {
            if !self.send_one(logs, eof) {
                break;
            }
        }
    }

    /// At the end of the attempt: everything left.
    fn finish(&mut self, logs: &mpsc::Sender<LogUpload>) {
        self.send_pending(logs, true);
        if !self.pending.is_empty() && !self.closed {
            tracing::warn!(
                stream = self.stream.as_str(),
                bytes = self.pending.len(),
                "log upload fell behind; dropping the end of the output"
            );
        }
    }

    /// Sends one chunk; false when nothing could be sent.
    fn send_one(&mut self, logs: &mpsc::Sender<LogUpload>, eof: bool) -> bool {
        if self.closed {
            self.pending.clear();
            return false;
        }
        let permit = match logs.try_reserve() {
            Ok(p) => p,
            Err(mpsc::error::TrySendError::Full(())) => return false,
            Err(mpsc::error::TrySendError::Closed(())) => {
                self.closed = true;
                self.pending.clear();
                return false;
            }
        };
        let data = take_chunk(&mut self.pending, MAX_LOG_CHUNK, eof);
        if data.is_empty() {
            return false;
        }
        permit.send(LogUpload {
            stream: self.stream,
            seq: self.seq,
            data,
        });
        self.seq += 1;
        true
    }
}

/// Decodes (lossily) and removes from the front of `buf` at most `max`
/// bytes of UTF-8 text. Without `eof`, an incomplete character at the very
/// end is left for the next read to complete.
fn take_chunk(buf: &mut Vec<u8>, max: usize, eof: bool) -> String {
    let mut out = String::new();
    let mut used = 0;
    for chunk in buf.utf8_chunks() {
        let valid = chunk.valid();
        let room = max - out.len();
        if valid.len() > room {
            let mut cut = room;
            while !valid.is_char_boundary(cut) {
                cut -= 1;
            }
            out.push_str(&valid[..cut]);
            used += cut;
            break;
        }
        out.push_str(valid);
        used += valid.len();
        let invalid = chunk.invalid();
        if invalid.is_empty() {
            continue;
        }
        let at_end = used + invalid.len() == buf.len();
        let incomplete = std::str::from_utf8(invalid).is_err_and(|e| e.error_len().is_none());
        if (at_end && incomplete && !eof) || out.len() + '\u{FFFD}'.len_utf8() > max {
            break;
        }
        out.push('\u{FFFD}');
        used += invalid.len();
    }
    buf.drain(..used);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn assignment(argv: &[&str]) -> Assignment {
        Assignment {
            attempt_id: format!("att-{}", fastrand::u64(..)),
            job_id: "job".into(),
            action: "test".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            timeout_ms: 10_000,
            kill_grace_ms: 1_000,
            log_cap_bytes: 1 << 20,
            lease_ms: 30_000,
            artifacts: Vec::new(),
        }
    }

    struct Run {
        result: AttemptResult,
        stdout: String,
        stderr: String,
        chunks: Vec<LogUpload>,
        elapsed: Duration,
    }

    async fn run(a: &Assignment, cancel: &CancellationToken) -> Run {
        let tmp = tempfile::tempdir().unwrap();
        let opts = ExecOptions {
            work_root: tmp.path().join("work"),
            path: DEFAULT_PATH.to_owned(),
        };
        let (tx, mut rx) = mpsc::channel(10_000);
        let started = Instant::now();
        let result = execute(a, &opts, cancel, &tx).await;
        let elapsed = started.elapsed();
        drop(tx);
        let mut chunks = Vec::new();
        while let Some(c) = rx.recv().await {
            chunks.push(c);
        }
        let text = |s| {
            chunks
                .iter()
                .filter(|c| c.stream == s)
                .map(|c| c.data.as_str())
                .collect::<String>()
        };
        // The working dir is gone.
        assert!(!opts.work_root.join(&a.attempt_id).exists());
        Run {
            stdout: text(Stream::Stdout),
            stderr: text(Stream::Stderr),
            result,
            chunks,
            elapsed,
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn argv_is_passed_literally() {
        let nasty = ["hi; rm -rf /", "$(id)", "`id`", "a\nb", "*", "'\"", ""];
        for arg in nasty {
            let a = assignment(&["/usr/bin/printf", "[%s]", arg]);
            let r = rt().block_on(run(&a, &CancellationToken::new()));
            assert_eq!(r.result.outcome, Outcome::Succeeded, "{:?}", r.result);
            assert_eq!(r.stdout, format!("[{arg}]"));
        }
    }

    #[test]
    fn outputs_come_from_stdout_lines_and_the_outputs_file() {
        let a = assignment(&[
            "sh",
            "-c",
            "echo '::set-output name=image=app:1.2'; printf '::set-output tag=v1\\r\\n'; \
             echo 'noise ::set-output name=x=1'; \
             printf '{\"digest\": \"sha256:abc\", \"count\": 3}' > \"$DROVER_OUTPUT\"; \
             printf '::set-output name=last=no newline'",
        ]);
        let r = rt().block_on(run(&a, &CancellationToken::new()));
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{:?}", r.result);
        let want: BTreeMap<String, String> = [
            ("image", "app:1.2"),
            ("tag", "v1"),
            ("digest", "sha256:abc"),
            ("count", "3"),
            ("last", "no newline"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(r.result.outputs, want);

        let bad = assignment(&["sh", "-c", "echo '[1,2]' > \"$DROVER_OUTPUT\""]);
        let r = rt().block_on(run(&bad, &CancellationToken::new()));
        assert_eq!(r.result.outcome, Outcome::Failed);
        assert!(
            r.result
                .error
                .as_deref()
                .unwrap_or("")
                .contains("must hold a JSON object"),
            "{:?}",
            r.result
        );
    }

    #[test]
    fn environment_is_clean_and_exit_codes_are_reported() {
        let mut a = assignment(&["sh", "-c", "env | sort; echo oops >&2; exit 3"]);
        a.env.insert("GREETING".into(), "hello world".into());
        let r = rt().block_on(run(&a, &CancellationToken::new()));
        assert_eq!(r.result.outcome, Outcome::Failed);
        assert_eq!(r.result.exit_code, Some(3));
        assert_eq!(r.result.signal, None);
        assert!(r.result.started_at.is_some());
        assert_eq!(r.stderr, "oops\n");
        let vars: Vec<&str> = r
            .stdout
            .lines()
            .map(|l| l.split('=').next().unwrap_or(""))
            .collect();
        // sh adds PWD (and sometimes SHLVL, _) itself; nothing comes from us.
        for v in &vars {
            assert!(
                [
                    "GREETING",
                    "PATH",
                    "DROVER_OUTPUT",
                    "PWD",
                    "SHLVL",
                    "_",
                    "OLDPWD"
                ]
                .contains(v),
                "unexpected variable {v} in {}",
                r.stdout
            );
        }
        assert!(r.stdout.contains("GREETING=hello world\n"));
        assert!(r.stdout.contains(&format!("PATH={DEFAULT_PATH}\n")));
        assert!(r.stdout.contains(&format!("/work/{}\n", a.attempt_id)));
    }

    #[test]
    fn noop_and_spawn_failures() {
        let r = rt().block_on(run(&assignment(&[BUILTIN_NOOP]), &CancellationToken::new()));
        assert_eq!(r.result.outcome, Outcome::Succeeded);
        assert!(r.chunks.is_empty());

        let r = rt().block_on(run(
            &assignment(&["/nonexistent/prog", "x"]),
            &CancellationToken::new(),
        ));
        assert_eq!(r.result.outcome, Outcome::Failed);
        let err = r.result.error.unwrap_or_default();
        assert!(err.contains("'/nonexistent/prog'"), "{err}");
        assert!(err.contains("No such file"), "{err}");

        let r = rt().block_on(run(&assignment(&[]), &CancellationToken::new()));
        assert_eq!(r.result.outcome, Outcome::Failed);
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
        let r = rt().block_on(run(&a, &CancellationToken::new()));
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
        let r = rt().block_on(run(&a, &CancellationToken::new()));
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
        let cancel = CancellationToken::new();
        let r = rt().block_on(async {
            let c = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                c.cancel();
            });
            run(&a, &cancel).await
        });
        assert_eq!(r.result.outcome, Outcome::Cancelled);
        assert_eq!(r.result.signal, Some(libc::SIGTERM));
        assert!(r.elapsed < Duration::from_secs(3), "{:?}", r.elapsed);
    }

    #[test]
    fn output_is_capped_with_a_marker() {
        // 300 KiB on stdout, a little on stderr; the cap is 100 000 bytes.
        let mut a = assignment(&[
            "sh",
            "-c",
            "head -c 307200 /dev/zero | tr '\\0' x; echo small >&2",
        ]);
        a.log_cap_bytes = 100_000;
        let r = rt().block_on(run(&a, &CancellationToken::new()));
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{:?}", r.result);
        assert!(r.result.stdout_truncated);
        assert!(!r.result.stderr_truncated);
        let marker = "\n[drover: output truncated after 100000 bytes]\n";
        assert_eq!(r.stdout, format!("{}{marker}", "x".repeat(100_000)));
        assert_eq!(r.stderr, "small\n");
        // Sequence numbers count per stream from 0; chunks respect the limit.
        for s in [Stream::Stdout, Stream::Stderr] {
            let seqs: Vec<u64> = r
                .chunks
                .iter()
                .filter(|c| c.stream == s)
                .map(|c| c.seq)
                .collect();
            assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
        }
        assert!(r.chunks.iter().all(|c| c.data.len() <= MAX_LOG_CHUNK));
    }

    #[test]
    fn output_is_streamed_while_running() {
        let a = assignment(&["sh", "-c", "echo first; sleep 1; echo second"]);
        let tmp = tempfile::tempdir().unwrap();
        let opts = ExecOptions {
            work_root: tmp.path().to_owned(),
            path: DEFAULT_PATH.to_owned(),
        };
        rt().block_on(async {
            let (tx, mut rx) = mpsc::channel(16);
            let cancel = CancellationToken::new();
            let exec = execute(&a, &opts, &cancel, &tx);
            tokio::pin!(exec);
            let first = tokio::select! {
                _ = &mut exec => panic!("finished before streaming"),
                c = rx.recv() => c.unwrap(),
            };
            assert_eq!(first.data, "first\n");
            let r = exec.await;
            assert_eq!(r.outcome, Outcome::Succeeded);
            assert_eq!(rx.recv().await.unwrap().data, "second\n");
        });
    }

    #[test]
    fn chunks_split_on_character_boundaries() {
        // (input, max, eof) -> (chunk, left)
        type Case = (&'static [u8], usize, bool, &'static str, &'static [u8]);
        let cases: [Case; 7] = [
            (b"hello", 10, false, "hello", b""),
            (b"hello", 3, false, "hel", b"lo"),
            ("héllo".as_bytes(), 2, false, "h", "éllo".as_bytes()),
            (b"ab\xc3", 10, false, "ab", b"\xc3"),
            (b"ab\xc3", 10, true, "ab\u{FFFD}", b""),
            (b"a\xffb", 10, false, "a\u{FFFD}b", b""),
            (b"a\xffb", 3, false, "a", b"\xffb"),
        ];
        for (input, max, eof, chunk, left) in cases {
            let mut buf = input.to_vec();
            assert_eq!(take_chunk(&mut buf, max, eof), chunk, "{input:?}");
            assert_eq!(buf, left, "{input:?}");
        }
    }

    #[test]
    fn a_slow_uploader_never_blocks_the_process() {
        // Room for one chunk only, never drained while the process runs.
        let mut a = assignment(&["sh", "-c", "head -c 2000000 /dev/zero"]);
        a.log_cap_bytes = 10_000_000;
        let tmp = tempfile::tempdir().unwrap();
        let opts = ExecOptions {
            work_root: tmp.path().to_owned(),
            path: DEFAULT_PATH.to_owned(),
        };
        let r = rt().block_on(async {
            let (tx, _rx) = mpsc::channel(1);
            execute(&a, &opts, &CancellationToken::new(), &tx).await
        });
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
        assert!(!r.stdout_truncated);
    }
}
