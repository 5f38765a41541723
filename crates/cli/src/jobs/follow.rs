//! Following a job live (`drover run --follow`, `drover jobs logs
//! --follow`): its output as it comes, a per-agent summary at the end, and
//! what Ctrl-C does.
//!
//! Text for people: output as the job writes it when one agent runs it;
//! each line prefixed with its agent (`[web-1] …`) when several do; the
//! summary on stderr. `-o json` prints events for scripts instead, one JSON
//! object per line on stdout and nothing else there (README, "Following
//! work"): `job`, `state`, `output`, `end`, `interrupted`.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use drover_proto::api::Agent;
use drover_proto::jobs::{Attempt, Job, JobState, LogPage, Stream};
use serde_json::json;

use crate::client::Api;
use crate::output::{self, Output};

/// Exit status after Ctrl-C during a follow (128 + SIGINT, as a shell
/// reports it).
pub const EXIT_INTERRUPTED: i32 = 130;

/// Up to this many agents, their host names are asked one by one; more,
/// and the whole list is read once.
const FETCH_ONE_BY_ONE: usize = 8;

/// How the agents of a job are named in prefixes and summaries.
#[derive(Debug, Default)]
pub struct Names {
    /// agent id → label: the host name when every agent of the job has
    /// a different one, else the short id `jobs show` prints.
    label: HashMap<String, String>,
    /// agent id → host name, when the server told it.
    hostname: HashMap<String, String>,
}

impl Names {
    /// Asks the server for the host name of each agent of the job (a user
    /// who may not read agents gets short ids).
    pub async fn fetch(api: &Api, job: &Job) -> Names {
        let ids = agent_ids(job);
        let mut hostname = HashMap::new();
        if ids.len() <= FETCH_ONE_BY_ONE {
            for id in &ids {
                if let Ok(agent) = api.get::<Agent>(&format!("/agents/{id}")).await {
                    hostname.insert(id.clone(), agent.hostname);
                }
            }
        } else if let Ok(all) = api.get::<Vec<Agent>>("/agents").await {
            let wanted: std::collections::HashSet<&String> = ids.iter().collect();
            hostname.extend(
                all.into_iter()
                    .filter(|a| wanted.contains(&a.id))
                    .map(|a| (a.id, a.hostname)),
            );
        }
        Names::new(&ids, hostname)
    }

    fn new(agents: &[String], hostname: HashMap<String, String>) -> Names {
        let hosts: Vec<Option<&String>> = agents.iter().map(|a| hostname.get(a)).collect();
        let distinct_hosts = hosts.iter().all(Option::is_some) && {
            let mut seen: Vec<&String> = hosts.iter().flatten().copied().collect();
            seen.sort();
            seen.dedup();
            seen.len() == agents.len()
        };
        let shorts = short_ids(agents);
        let label = agents
            .iter()
            .zip(shorts)
            .map(|(a, short)| {
                let name = match hostname.get(a) {
                    Some(h) if distinct_hosts && !h.is_empty() => output::clean(h),
                    _ => short,
                };
                (a.clone(), name)
            })
            .collect();
        Names { label, hostname }
    }

    pub fn label(&self, agent: &str) -> String {
        self.label
            .get(agent)
            .cloned()
            .unwrap_or_else(|| short_id(agent).to_owned())
    }

    fn hostname(&self, agent: &str) -> Option<&str> {
        self.hostname.get(agent).map(String::as_str)
    }
}

/// The agents of a job, in the order of their first attempt.
fn agent_ids(job: &Job) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in &job.attempts {
        if !out.contains(&a.agent_id) {
            out.push(a.agent_id.clone());
        }
    }
    out
}

/// An id as `jobs show` shortens it.
fn short_id(id: &str) -> &str {
    id.get(..13).unwrap_or(id)
}

/// Short ids, made longer (up to the whole id) where two would be equal.
fn short_ids(ids: &[String]) -> Vec<String> {
    ids.iter()
        .map(|id| {
            let mut len = 13.min(id.len());
            while len < id.len() && ids.iter().any(|o| o != id && o.get(..len) == id.get(..len)) {
                len += 1;
            }
            id.get(..len).unwrap_or(id).to_owned()
        })
        .collect()
}

/// The last attempt of each agent of a job, in agent order.
fn last_attempts(job: &Job) -> Vec<&Attempt> {
    agent_ids(job)
        .iter()
        .filter_map(|agent| {
            job.attempts
                .iter()
                .filter(|a| &a.agent_id == agent)
                .max_by_key(|a| a.number)
        })
        .collect()
}

/// Why an attempt ended as it did, beyond its exit code: a signal, a
/// sandbox limit, an error, the reason the server gave.
fn attempt_reason(a: &Attempt) -> String {
    let mut parts = Vec::new();
    if let Some(s) = a.signal {
        parts.push(format!("signal {s}"));
    }
    if let Some(l) = a.limit_exceeded {
        parts.push(format!("limit exceeded: {}", l.as_str()));
    }
    if let Some(e) = &a.error {
        parts.push(e.clone());
    }
    if let Some(r) = &a.reason {
        if !parts.contains(r) {
            parts.push(r.clone());
        }
    }
    if let Some(l) = &a.late_result {
        parts.push(super::late_note(l));
    }
    parts.join(", ")
}

/// What the error of a job that did not succeed says after its state:
/// with one agent, how its attempt ended; with several, which agents
/// failed and how.
pub fn failure_detail(job: &Job, names: &Names) -> String {
    let last = last_attempts(job);
    let how = |a: &Attempt| {
        let mut parts = Vec::new();
        if let Some(c) = a.exit_code {
            parts.push(format!("exit code {c}"));
        }
        let reason = attempt_reason(a);
        if !reason.is_empty() {
            parts.push(reason);
        }
        parts.join(", ")
    };
    if last.len() <= 1 {
        return last
            .first()
            .map(|a| how(a))
            .filter(|s| !s.is_empty())
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
    }
    let failed: Vec<String> = last
        .iter()
        .filter(|a| a.state != JobState::Succeeded)
        .map(|a| {
            let mut s = format!("agent {} {}", names.label(&a.agent_id), a.state.as_str());
            let h = how(a);
            if !h.is_empty() {
                s.push_str(&format!(" ({h})"));
            }
            s
        })
        .collect();
    format!(
        " on {} of {} agents: {}",
        failed.len(),
        last.len(),
        failed.join("; ")
    )
}

/// The per-agent outcome of a job, as a JSON array (for the `end` event).
fn summary_json(job: &Job, names: &Names) -> serde_json::Value {
    last_attempts(job)
        .iter()
        .map(|a| {
            json!({
                "agent": a.agent_id,
                "name": names.label(&a.agent_id),
                "hostname": names.hostname(&a.agent_id),
                "state": a.state.as_str(),
                "exit_code": a.exit_code,
                "signal": a.signal,
                "attempts": a.number,
                "reason": Some(attempt_reason(a)).filter(|r| !r.is_empty()),
            })
        })
        .collect()
}

/// Prints the per-agent outcome of a job on stderr, as a table.
fn print_summary(job: &Job, names: &Names) {
    let rows: Vec<Vec<String>> = last_attempts(job)
        .iter()
        .map(|a| {
            vec![
                short_id(&a.agent_id).to_owned(),
                names
                    .hostname(&a.agent_id)
                    .filter(|h| !h.is_empty())
                    .unwrap_or("-")
                    .to_owned(),
                a.state.as_str().to_owned(),
                a.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".to_owned()),
                a.number.to_string(),
                attempt_reason(a),
            ]
        })
        .collect();
    let table = output::format_table(
        &["AGENT", "HOST", "STATE", "EXIT", "ATTEMPTS", "REASON"],
        &rows,
    );
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(table.as_bytes());
}

/// What the follow of a job prints when it ends: the `end` event, or the
/// per-agent table (when several agents ran it) and the final state, on
/// stderr.
pub fn print_end(job: &Job, names: &Names, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => output::event(&json!({
            "event": "end",
            "job": job.id,
            "state": job.state.as_str(),
            "agents": summary_json(job, names),
        }))?,
        Output::Text => {
            if agent_ids(job).len() > 1 {
                print_summary(job, names);
            }
            eprintln!("job {} {}", job.id, job.state.as_str());
        }
    }
    Ok(())
}

/// Output lines not yet ended by a newline, per attempt and stream (in
/// the order they began).
#[derive(Debug, Default)]
struct Lines {
    partial: Vec<((String, Stream), String)>,
}

impl Lines {
    /// Adds a chunk; returns the lines it completes (without their
    /// newline).
    fn push(&mut self, attempt: &str, stream: Stream, data: &str) -> Vec<String> {
        let key = (attempt.to_owned(), stream);
        let at = match self.partial.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                self.partial.push((key, String::new()));
                self.partial.len() - 1
            }
        };
        let buf = &mut self.partial[at].1;
        buf.push_str(data);
        let Some(end) = buf.rfind('\n') else {
            return Vec::new();
        };
        let done: String = buf.drain(..=end).collect();
        done.lines().map(str::to_owned).collect()
    }

    /// The unfinished lines, once the job has ended.
    fn rest(&mut self) -> Vec<((String, Stream), String)> {
        std::mem::take(&mut self.partial)
            .into_iter()
            .filter(|(_, s)| !s.is_empty())
            .collect()
    }
}

/// Follows a job until it ends: prints its output (and, with `-o json`,
/// its state changes) as they come; returns the final job.
pub async fn follow_job(
    api: &Api,
    id: &str,
    output: Output,
    names: &mut Names,
) -> anyhow::Result<Job> {
    let mut job: Job = api.get(&format!("/jobs/{id}")).await?;
    *names = Names::fetch(api, &job).await;
    let several = agent_ids(&job).len() > 1;
    let json = output == Output::Json;
    let mut states: HashMap<String, JobState> = HashMap::new();
    if json {
        output::event(&json!({
            "event": "job",
            "job": job.id,
            "action": job.action,
            "target": job.target,
            "state": job.state.as_str(),
            "agents": agent_ids(&job).iter().map(|a| json!({
                "agent": a,
                "name": names.label(a),
                "hostname": names.hostname(a),
            })).collect::<Vec<_>>(),
        }))?;
        state_events(&job, names, &mut states)?;
    }
    let mut lines = Lines::default();
    let mut after = 0;
    // Scripts see state changes within two seconds; people, who see only
    // output, wait on the server as long as it lets them.
    let wait_ms = if json { 2000 } else { 25000 };
    loop {
        let page: LogPage = api
            .get(&format!("/jobs/{id}/logs?after={after}&wait_ms={wait_ms}"))
            .await?;
        if page
            .chunks
            .iter()
            .any(|c| !job.attempts.iter().any(|a| a.id == c.attempt_id))
        {
            // A retry we have not seen yet.
            job = api.get(&format!("/jobs/{id}")).await?;
        }
        let agent_of = |attempt: &str| {
            job.attempts
                .iter()
                .find(|a| a.id == attempt)
                .map(|a| a.agent_id.clone())
                .unwrap_or_default()
        };
        for chunk in &page.chunks {
            if !json && !several {
                write_raw(chunk.stream, &chunk.data)?;
                continue;
            }
            let agent = agent_of(&chunk.attempt_id);
            for line in lines.push(&chunk.attempt_id, chunk.stream, &chunk.data) {
                print_line(
                    id,
                    &chunk.attempt_id,
                    &agent,
                    chunk.stream,
                    &line,
                    names,
                    json,
                )?;
            }
        }
        after = page.next;
        if page.complete {
            for ((attempt, stream), line) in lines.rest() {
                print_line(
                    id,
                    &attempt,
                    &agent_of(&attempt),
                    stream,
                    &line,
                    names,
                    json,
                )?;
            }
            let job: Job = api.get(&format!("/jobs/{id}")).await?;
            if json {
                state_events(&job, names, &mut states)?;
            }
            return Ok(job);
        }
        if json {
            job = api.get(&format!("/jobs/{id}")).await?;
            state_events(&job, names, &mut states)?;
        }
    }
}

/// Whether a job runs on more than one agent (its lines then name theirs).
pub fn several_agents(job: &Job) -> bool {
    agent_ids(job).len() > 1
}

/// `jobs logs ID` of a job on several agents, or with `-o json`: the
/// output stored so far, each line prefixed with its agent, or as `output`
/// events.
pub async fn print_logs(api: &Api, job: &Job, output: Output) -> anyhow::Result<()> {
    let json = output == Output::Json;
    let names = Names::fetch(api, job).await;
    let mut lines = Lines::default();
    let agent_of = |attempt: &str| {
        job.attempts
            .iter()
            .find(|a| a.id == attempt)
            .map(|a| a.agent_id.clone())
            .unwrap_or_default()
    };
    let mut after = 0;
    loop {
        let page: LogPage = api
            .get(&format!("/jobs/{}/logs?after={after}&limit=5000", job.id))
            .await?;
        for c in &page.chunks {
            for line in lines.push(&c.attempt_id, c.stream, &c.data) {
                let agent = agent_of(&c.attempt_id);
                print_line(
                    &job.id,
                    &c.attempt_id,
                    &agent,
                    c.stream,
                    &line,
                    &names,
                    json,
                )?;
            }
        }
        if page.chunks.is_empty() {
            break;
        }
        after = page.next;
    }
    for ((attempt, stream), line) in lines.rest() {
        print_line(
            &job.id,
            &attempt,
            &agent_of(&attempt),
            stream,
            &line,
            &names,
            json,
        )?;
    }
    Ok(())
}

/// Output as the job wrote it: stdout to stdout, stderr to stderr.
fn write_raw(stream: Stream, data: &str) -> std::io::Result<()> {
    match stream {
        Stream::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(data.as_bytes())?;
            out.flush()
        }
        Stream::Stderr => {
            let mut err = std::io::stderr().lock();
            err.write_all(data.as_bytes())?;
            err.flush()
        }
    }
}

/// One line of output: an `output` event, or the line prefixed with its
/// agent on the stream it came from.
fn print_line(
    job: &str,
    attempt: &str,
    agent: &str,
    stream: Stream,
    line: &str,
    names: &Names,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return output::event(&json!({
            "event": "output",
            "job": job,
            "attempt": attempt,
            "agent": agent,
            "name": names.label(agent),
            "stream": stream.as_str(),
            "line": line,
        }));
    }
    write_raw(stream, &format!("[{}] {line}\n", names.label(agent)))?;
    Ok(())
}

/// A `state` event for each attempt whose state changed since the last
/// call.
fn state_events(
    job: &Job,
    names: &Names,
    seen: &mut HashMap<String, JobState>,
) -> anyhow::Result<()> {
    for a in &job.attempts {
        if seen.get(&a.id) == Some(&a.state) {
            continue;
        }
        seen.insert(a.id.clone(), a.state);
        output::event(&json!({
            "event": "state",
            "job": job.id,
            "attempt": a.id,
            "agent": a.agent_id,
            "name": names.label(&a.agent_id),
            "number": a.number,
            "state": a.state.as_str(),
            "exit_code": a.exit_code,
            "reason": a.reason.clone().or_else(|| a.error.clone()),
        }))?;
    }
    Ok(())
}

/// Runs a follow until it ends or Ctrl-C comes (`None`).
pub async fn until_interrupted<T>(
    follow: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<Option<T>> {
    tokio::select! {
        r = follow => r.map(Some),
        _ = tokio::signal::ctrl_c() => Ok(None),
    }
}

/// What a follow stopped by Ctrl-C leaves behind.
#[derive(Debug, Clone, Copy)]
pub struct Interrupted<'a> {
    /// `job` or `run`.
    pub kind: &'static str,
    pub id: &'a str,
    /// The command that cancels it, e.g. `drover jobs cancel ID`.
    pub cancel_command: &'a str,
    /// The API path that cancels it, when `--cancel-on-interrupt` asks to.
    pub cancel_path: Option<&'a str>,
}

/// After Ctrl-C: says on stderr that the work goes on and how to cancel
/// it, or requests the cancel (`--cancel-on-interrupt`); then exits with
/// status 130 at once, as an interrupted command does.
pub async fn exit_interrupted(api: &Api, what: Interrupted<'_>, output: Output) -> ! {
    let Interrupted {
        kind,
        id,
        cancel_command,
        cancel_path,
    } = what;
    let cancelled = match cancel_path {
        Some(path) => {
            let body = json!({});
            let asked = api.post::<_, serde_json::Value>(path, &body);
            // A second Ctrl-C gives up waiting for the server.
            let answer = tokio::select! {
                a = tokio::time::timeout(Duration::from_secs(10), asked) => a,
                _ = tokio::signal::ctrl_c() => {
                    eprintln!(
                        "interrupted again: the cancel of {kind} {id} may not have reached the server; it may go on: {cancel_command}"
                    );
                    if output == Output::Json {
                        let _ = output::event(&json!({"event": "interrupted", kind: id, "cancel_requested": false}));
                    }
                    let _ = std::io::stdout().flush();
                    std::process::exit(EXIT_INTERRUPTED)
                }
            };
            match answer {
                Ok(Ok(_)) => {
                    eprintln!("interrupted: cancel requested for {kind} {id}");
                    true
                }
                Ok(Err(e)) => {
                    eprintln!(
                        "interrupted: the cancel of {kind} {id} failed ({e:#}); it goes on: {cancel_command}"
                    );
                    false
                }
                Err(_) => {
                    eprintln!(
                        "interrupted: the server did not answer the cancel of {kind} {id} in 10s; it may go on: {cancel_command}"
                    );
                    false
                }
            }
        }
        None => {
            eprintln!(
                "interrupted: {kind} {id} goes on without you; cancel it with: {cancel_command}"
            );
            false
        }
    };
    if output == Output::Json {
        let _ = output::event(&json!({
            "event": "interrupted",
            kind: id,
            "cancel_requested": cancelled,
        }));
    }
    let _ = std::io::stdout().flush();
    // Exits here rather than through main's error path: an interrupt is
    // not an error to print, and nothing else is left to clean up.
    std::process::exit(EXIT_INTERRUPTED)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_at_newlines_per_attempt_and_stream() {
        let mut l = Lines::default();
        assert!(l.push("a", Stream::Stdout, "par").is_empty());
        assert_eq!(l.push("b", Stream::Stdout, "x\ny\n"), ["x", "y"]);
        assert_eq!(l.push("a", Stream::Stdout, "tial\nnext"), ["partial"]);
        assert_eq!(l.push("a", Stream::Stderr, "e\r\n"), ["e"]);
        assert_eq!(
            l.rest(),
            [(("a".to_owned(), Stream::Stdout), "next".to_owned())]
        );
    }

    /// The agents of a job, their host names, the labels they get.
    type Case<'a> = (Vec<&'a String>, HashMap<String, String>, Vec<&'a str>);

    #[test]
    fn agents_are_named_by_distinct_hosts_else_short_ids() {
        let a = "0192aaaa-1111-7000-8000-000000000001".to_owned();
        let b = "0192aaaa-1111-7000-8000-000000000002".to_owned();
        let c = "0192aaaa-2222-7000-8000-000000000003".to_owned();
        let hosts = |pairs: &[(&String, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).clone(), (*v).to_owned()))
                .collect::<HashMap<_, _>>()
        };
        // (agents, host names, labels)
        let cases: Vec<Case> = vec![
            (
                vec![&a, &c],
                hosts(&[(&a, "web-1"), (&c, "web-2")]),
                vec!["web-1", "web-2"],
            ),
            (
                vec![&a, &c],
                hosts(&[(&a, "box"), (&c, "box")]),
                vec!["0192aaaa-1111", "0192aaaa-2222"],
            ),
            (
                vec![&a, &c],
                hosts(&[(&a, "web-1")]),
                vec!["0192aaaa-1111", "0192aaaa-2222"],
            ),
            (
                vec![&a, &b],
                HashMap::new(),
                vec![
                    "0192aaaa-1111-7000-8000-000000000001",
                    "0192aaaa-1111-7000-8000-000000000002",
                ],
            ),
        ];
        for (agents, hostnames, want) in cases {
            let agents: Vec<String> = agents.into_iter().cloned().collect();
            let names = Names::new(&agents, hostnames);
            let got: Vec<String> = agents.iter().map(|x| names.label(x)).collect();
            assert_eq!(got, want);
        }
    }
}
