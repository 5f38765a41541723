//! An attempt's output on its way out: cut into log chunks of a bounded
//! size, capped per stream with a marker, never waited for (what the
//! uploader cannot take is coalesced, then dropped with a marker), and
//! read for outputs (`::set-output` lines, the outputs file).

use std::collections::BTreeMap;
use std::path::Path;

use drover_proto::jobs::{LogUpload, Stream};
use drover_proto::limits::MAX_LOG_CHUNK;
use drover_proto::workflows::{
    parse_set_output, valid_output_name, MAX_OUTPUTS, MAX_OUTPUT_VALUE, OUTPUT_FILE_ENV,
};
use tokio::sync::mpsc;

/// Output waiting for the uploader, per stream, beyond which it is dropped.
const PENDING_LIMIT: usize = 4 * MAX_LOG_CHUNK;
/// Where output was dropped because the uploader fell behind.
const DROPPED_MARKER: &[u8] = b"\n[drover: output dropped: log upload fell behind]\n";

/// Collects `::set-output name=value` lines from stdout, within bounds.
#[derive(Debug, Default)]
pub(super) struct OutputScanner {
    line: Vec<u8>,
    /// The current line is too long to be an output line.
    overlong: bool,
    pub(super) outputs: BTreeMap<String, String>,
}

impl OutputScanner {
    pub(super) fn push(&mut self, bytes: &[u8]) {
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

    pub(super) fn end_line(&mut self) {
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

/// Why the outputs file a workload wrote (`$DROVER_OUTPUT`) is not taken.
#[derive(Debug, thiserror::Error)]
pub enum OutputsFileError {
    #[error("${} must be a regular file, not a symlink", OUTPUT_FILE_ENV)]
    Symlink,
    #[error("${} must be a regular file", OUTPUT_FILE_ENV)]
    NotAFile,
    #[error("cannot read ${}: {}", OUTPUT_FILE_ENV, .0)]
    Read(std::io::Error),
    #[error("${} is larger than {limit} bytes", OUTPUT_FILE_ENV)]
    TooLarge { limit: u64 },
    #[error("${} must hold a JSON object: {}", OUTPUT_FILE_ENV, .0)]
    NotAnObject(serde_json::Error),
    #[error("${}: '{name}' is not a valid output name", OUTPUT_FILE_ENV)]
    InvalidName { name: String },
}

/// Reads the outputs file a workload may have written: a JSON object whose
/// string values are taken as is and other values as JSON text. The file
/// is written by the sandboxed side, so a symlink, a FIFO or anything but
/// a regular file of a bounded size is refused rather than followed.
pub(crate) fn read_outputs_file(
    path: &Path,
    outputs: &mut BTreeMap<String, String>,
) -> Result<(), OutputsFileError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let limit = (MAX_OUTPUTS * MAX_OUTPUT_VALUE) as u64;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(OutputsFileError::Symlink),
        Err(e) => return Err(OutputsFileError::Read(e)),
    };
    let meta = file.metadata().map_err(OutputsFileError::Read)?;
    if !meta.is_file() {
        return Err(OutputsFileError::NotAFile);
    }
    if meta.len() > limit {
        return Err(OutputsFileError::TooLarge { limit });
    }
    let mut text = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut text)
        .map_err(OutputsFileError::Read)?;
    if text.len() as u64 > limit {
        return Err(OutputsFileError::TooLarge { limit });
    }
    let map: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&text).map_err(OutputsFileError::NotAnObject)?;
    for (name, value) in map {
        if !valid_output_name(&name) {
            return Err(OutputsFileError::InvalidName { name });
        }
        let value = match value {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        set_output(outputs, &name, value);
    }
    Ok(())
}

/// One output stream on its way to log chunks: the cap, the marker, the
/// sequence numbers, and the bytes not yet sent.
pub(super) struct StreamLog {
    stream: Stream,
    seq: u64,
    cap: u64,
    /// Output bytes read so far, kept or not.
    seen: u64,
    pub(super) truncated: bool,
    pending: Vec<u8>,
    /// In a run of output dropped because the uploader fell behind.
    dropping: bool,
    /// The uploader is gone: discard everything.
    closed: bool,
    /// Secret values to replace with `***` before a chunk leaves; a chunk
    /// ending in the start of one keeps that end back for the next.
    masks: Vec<String>,
}

impl StreamLog {
    pub(super) fn new(stream: Stream, cap: u64) -> StreamLog {
        StreamLog {
            stream,
            seq: 0,
            cap,
            seen: 0,
            truncated: false,
            pending: Vec::new(),
            dropping: false,
            closed: false,
            masks: Vec::new(),
        }
    }

    /// Masks these values (the attempt's secrets) in what it sends.
    pub(super) fn with_masks(mut self, masks: &[String]) -> StreamLog {
        self.masks = masks.iter().filter(|m| !m.is_empty()).cloned().collect();
        self.masks.sort_by_key(|m| std::cmp::Reverse(m.len()));
        self
    }

    /// Takes in output just read, keeping what the cap allows.
    pub(super) fn push(&mut self, bytes: &[u8]) {
        let room = self.cap.saturating_sub(self.seen);
        self.seen += bytes.len() as u64;
        if self.truncated || self.closed {
            return;
        }
        let keep = usize::try_from(room).unwrap_or(usize::MAX).min(bytes.len());
        self.append(&bytes[..keep]);
        if keep < bytes.len() {
            self.truncated = true;
            // The marker goes in whatever the backlog, once, beyond the
            // cap: the server keeps room for it (`LOG_MARKER_ROOM`).
            self.pending
                .extend_from_slice(truncation_marker(self.cap).as_bytes());
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.pending.len() + bytes.len() <= PENDING_LIMIT {
            self.pending.extend_from_slice(bytes);
            self.dropping = false;
        } else if !self.dropping {
            self.dropping = true;
            self.pending.extend_from_slice(DROPPED_MARKER);
            // Counted against the cap, however many runs are dropped: only
            // the truncation marker goes beyond it.
            self.seen = self.seen.saturating_add(DROPPED_MARKER.len() as u64);
        }
    }

    /// Sends the full chunks waiting.
    pub(super) fn send_full(&mut self, logs: &mpsc::Sender<LogUpload>) {
        while self.pending.len() >= MAX_LOG_CHUNK {
            if !self.send_one(logs, false) {
                break;
            }
        }
    }

    /// Sends all that waits (but an incomplete character, unless `eof`),
    /// as long as the channel has room.
    pub(super) fn send_pending(&mut self, logs: &mpsc::Sender<LogUpload>, eof: bool) {
        while !self.pending.is_empty() {
            if !self.send_one(logs, eof) {
                break;
            }
        }
    }

    /// At the end of the attempt: everything left.
    pub(super) fn finish(&mut self, logs: &mpsc::Sender<LogUpload>) {
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
        let mut data = take_chunk(&mut self.pending, MAX_LOG_CHUNK, eof);
        if !self.masks.is_empty() {
            data = mask(&data, &self.masks);
            // A value split between this chunk and the next: keep its
            // start back (in front of what waits) until the rest comes.
            if !(eof && self.pending.is_empty()) {
                let hold = held_back(&data, &self.masks);
                if hold > 0 {
                    let tail = data.split_off(data.len() - hold);
                    let mut rest = tail.into_bytes();
                    rest.append(&mut self.pending);
                    self.pending = rest;
                }
            }
        }
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

/// Replaces every value (longest first) with `***`.
fn mask(text: &str, masks: &[String]) -> String {
    let mut out = text.to_owned();
    for m in masks {
        if out.contains(m.as_str()) {
            out = out.replace(m.as_str(), "***");
        }
    }
    out
}

/// How many bytes at the end of `text` could be the start of a value.
fn held_back(text: &str, masks: &[String]) -> usize {
    let mut hold = 0;
    for m in masks {
        for k in (1..m.len()).rev() {
            if k <= hold {
                break;
            }
            if m.is_char_boundary(k) && text.ends_with(&m[..k]) {
                hold = k;
                break;
            }
        }
    }
    hold
}

/// Where the output of a stream was cut at its cap.
fn truncation_marker(cap: u64) -> String {
    format!("\n[drover: output truncated after {cap} bytes]\n")
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
    use std::collections::BTreeMap;

    use drover_proto::jobs::Outcome;

    use super::*;
    use crate::executor::{execute, ExecOptions, Stop};
    use crate::test_support::{assignment, rt, run};

    #[test]
    fn outputs_file_must_be_a_regular_file() {
        // The sandboxed side writes it; the agent must not follow it
        // elsewhere, nor block on a FIFO.
        let cases = [
            (
                "ln -s /etc/hostname \"$DROVER_OUTPUT\"",
                "must be a regular file, not a symlink",
            ),
            ("mkfifo \"$DROVER_OUTPUT\"", "must be a regular file"),
            (
                "head -c 2000000 /dev/zero > \"$DROVER_OUTPUT\"",
                "is larger than",
            ),
        ];
        for (script, want) in cases {
            let r = rt().block_on(run(&assignment(&["sh", "-c", script]), &Stop::new()));
            assert_eq!(
                r.result.outcome,
                Outcome::Failed,
                "{script}: {:?}",
                r.result
            );
            let err = r.result.error.unwrap_or_default();
            assert!(err.contains(want), "{script}: {err}");
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
        let r = rt().block_on(run(&a, &Stop::new()));
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
        let r = rt().block_on(run(&bad, &Stop::new()));
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
    fn output_is_capped_with_a_marker() {
        // 300 KiB on stdout, a little on stderr; the cap is 100 000 bytes.
        let mut a = assignment(&[
            "sh",
            "-c",
            "head -c 307200 /dev/zero | tr '\\0' x; echo small >&2",
        ]);
        a.log_cap_bytes = 100_000;
        let r = rt().block_on(run(&a, &Stop::new()));
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
        let opts = ExecOptions::new(tmp.path());
        rt().block_on(async {
            let (tx, mut rx) = mpsc::channel(16);
            let stop = Stop::new();
            let exec = execute(&a, &opts, &stop, &tx);
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
    fn secrets_are_masked_also_across_chunks() {
        let (tx, mut rx) = mpsc::channel(100);
        let mut log =
            StreamLog::new(Stream::Stdout, 1 << 20).with_masks(&["s3cr3t-value".to_owned()]);
        log.push(b"token=s3cr");
        log.send_pending(&tx, false);
        log.push(b"3t-value and s3cr3t-value; end s3");
        log.send_pending(&tx, false);
        log.push(b"x");
        log.finish(&tx);
        drop(tx);
        let mut all = String::new();
        while let Ok(chunk) = rx.try_recv() {
            assert!(!chunk.data.contains("s3cr3t"), "{:?}", chunk.data);
            all.push_str(&chunk.data);
        }
        assert_eq!(all, "token=*** and ***; end s3x");
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
    fn markers_stay_within_the_room_the_server_keeps_beyond_the_cap() {
        use drover_proto::limits::LOG_MARKER_ROOM;
        assert!(
            (truncation_marker(u64::MAX).len() + DROPPED_MARKER.len()) as u64 <= LOG_MARKER_ROOM
        );
        // An uploader that stays just behind a trickle of output: every
        // other byte starts a run of dropped output, with its marker.
        let cap = (PENDING_LIMIT + 10_000) as u64;
        let mut log = StreamLog::new(Stream::Stdout, cap);
        let mut shipped = 0;
        log.push(&vec![b'x'; PENDING_LIMIT]);
        for _ in 0..1000 {
            log.push(b"y");
            let n = (DROPPED_MARKER.len() + 1).min(log.pending.len());
            shipped += log.pending.drain(..n).len();
            log.push(b"z");
        }
        log.push(&[b'w'; 10_000]);
        assert!(log.truncated);
        shipped += log.pending.len();
        assert!(
            shipped as u64 <= cap + LOG_MARKER_ROOM,
            "{shipped} bytes stored for a cap of {cap}"
        );
    }

    #[test]
    fn a_slow_uploader_never_blocks_the_process() {
        // Room for one chunk only, never drained while the process runs.
        let mut a = assignment(&["sh", "-c", "head -c 2000000 /dev/zero"]);
        a.log_cap_bytes = 10_000_000;
        let tmp = tempfile::tempdir().unwrap();
        let opts = ExecOptions::new(tmp.path());
        let r = rt().block_on(async {
            let (tx, _rx) = mpsc::channel(1);
            execute(&a, &opts, &Stop::new(), &tx).await
        });
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
        assert!(!r.stdout_truncated);
    }
}
