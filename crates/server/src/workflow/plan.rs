//! The engine's decisions as a pure function: given what is known of a run
//! (its definition, its tasks with their jobs' states, its workspace, the
//! time), [`plan`] says which steps are due. It does no I/O, so every rule
//! — fan-in, optional failures, skips, cancel, timeout, the workspace
//! coming first — is tested with tables of cases below. The engine applies
//! the steps in one transaction, folds their effect into the facts and
//! plans again until nothing more is due.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use drover_proto::jobs::JobState;
use drover_proto::workflows::{RunState, TaskState, WorkflowDef};

/// A task's job, as far as the plan cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFacts {
    pub id: String,
    pub state: JobState,
    /// A cancel was asked for it already.
    pub cancel_requested: bool,
}

/// A task as stored: `Pending`, `Queued` once its job exists, or final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFacts {
    pub state: TaskState,
    pub job: Option<JobFacts>,
}

/// Where the run's workspace stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkspaceFacts {
    /// The run has none.
    None,
    /// Not created yet.
    Pending,
    /// Its creation was looked at in this pass and must wait (no agent).
    Waiting,
    /// Being created by this job.
    Creating(JobFacts),
    Ready,
    /// It could not be created.
    Failed(String),
}

/// What the plan looks at.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub def: &'a WorkflowDef,
    pub tasks: BTreeMap<String, TaskFacts>,
    pub workspace: WorkspaceFacts,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub deadline_at: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The task's job ended: the task takes the matching final state
    /// (its outputs when it succeeded).
    EndTask {
        task: String,
        job: String,
        state: TaskState,
    },
    /// The task will never run.
    Skip { task: String, reason: String },
    /// Build the task's job and start it.
    Start { task: String },
    /// Ask a job to stop (the run is being cancelled or timed out).
    CancelJob { job: String, reason: String },
    /// Pick the workspace's agent and create it.
    CreateWorkspace,
    /// The job creating the workspace ended.
    WorkspaceCreated { job: String, ok: bool },
    /// Every task ended: the run ends.
    Finish {
        state: RunState,
        reason: Option<String>,
    },
}

/// The task state that mirrors a job's.
pub fn mirror(job: JobState) -> TaskState {
    match job {
        JobState::AwaitingApproval | JobState::Queued => TaskState::Queued,
        JobState::Dispatched => TaskState::Dispatched,
        JobState::Running => TaskState::Running,
        JobState::Succeeded => TaskState::Succeeded,
        JobState::TimedOut => TaskState::TimedOut,
        JobState::Cancelled => TaskState::Cancelled,
        JobState::Failed | JobState::Rejected | JobState::Lost => TaskState::Failed,
    }
}

/// A task's state as people see it: a task that has not ended shows its
/// job's live state (derived when read, never written).
pub fn live_state(stored: TaskState, job: Option<JobState>) -> TaskState {
    match job {
        Some(js) if !stored.is_final() => mirror(js),
        _ => stored,
    }
}

/// Why a run stops before its tasks are done, if it does.
fn stop_reason(f: &Facts<'_>) -> Option<(RunState, String)> {
    if let Some(at) = f.cancel_requested_at {
        return Some((
            RunState::Cancelled,
            format!("cancelled at {}", at.to_rfc3339()),
        ));
    }
    let deadline = f.deadline_at.filter(|d| *d <= f.now)?;
    let limit = f
        .def
        .timeout
        .map(|t| humantime::format_duration(t).to_string())
        .unwrap_or_default();
    Some((
        RunState::TimedOut,
        format!(
            "the run timed out after {limit} (at {})",
            deadline.to_rfc3339()
        ),
    ))
}

/// The steps due now. Steps that depend on the outcome of others (a task
/// that can start once a skipped one is known) come in a later call, after
/// the engine folded these in.
pub fn plan(f: &Facts<'_>) -> Vec<Step> {
    let mut steps = Vec::new();
    // Tasks whose job ended take its state.
    let mut tasks = f.tasks.clone();
    for (id, t) in tasks.iter_mut() {
        if t.state.is_final() {
            continue;
        }
        if let Some(job) = t.job.as_ref().filter(|j| j.state.is_final()) {
            let state = mirror(job.state);
            steps.push(Step::EndTask {
                task: id.clone(),
                job: job.id.clone(),
                state,
            });
            t.state = state;
        }
    }

    // A run asked to stop, or out of time, cancels what runs and skips
    // what waits; it ends once all has ended, and never while its
    // workspace is still being created.
    if let Some((end, why)) = stop_reason(f) {
        let mut creating = false;
        if let WorkspaceFacts::Creating(job) = &f.workspace {
            if job.state.is_final() {
                steps.push(Step::WorkspaceCreated {
                    job: job.id.clone(),
                    ok: job.state == JobState::Succeeded,
                });
            } else {
                creating = true;
                if !job.cancel_requested {
                    steps.push(Step::CancelJob {
                        job: job.id.clone(),
                        reason: why.clone(),
                    });
                }
            }
        }
        for (id, t) in tasks.iter_mut() {
            if t.state.is_final() {
                continue;
            }
            match &t.job {
                Some(job) => {
                    if !job.cancel_requested {
                        steps.push(Step::CancelJob {
                            job: job.id.clone(),
                            reason: why.clone(),
                        });
                    }
                }
                None => {
                    steps.push(Step::Skip {
                        task: id.clone(),
                        reason: why.clone(),
                    });
                    t.state = TaskState::Skipped;
                }
            }
        }
        if !creating && tasks.values().all(|t| t.state.is_final()) {
            steps.push(Step::Finish {
                state: end,
                reason: Some(why),
            });
        }
        return steps;
    }

    // The workspace, if any, comes before every task.
    enum Ws<'w> {
        None,
        NotReady,
        Ready,
        Failed(&'w str),
    }
    let ws = match &f.workspace {
        WorkspaceFacts::None => Ws::None,
        WorkspaceFacts::Pending => {
            steps.push(Step::CreateWorkspace);
            return steps;
        }
        WorkspaceFacts::Waiting => Ws::NotReady,
        WorkspaceFacts::Creating(job) if job.state.is_final() => {
            steps.push(Step::WorkspaceCreated {
                job: job.id.clone(),
                ok: job.state == JobState::Succeeded,
            });
            return steps;
        }
        WorkspaceFacts::Creating(_) => Ws::NotReady,
        WorkspaceFacts::Ready => Ws::Ready,
        WorkspaceFacts::Failed(why) => Ws::Failed(why),
    };

    // Start (or skip) every pending task whose needs have ended; a skip
    // can end the needs of another, so go round until nothing moves.
    loop {
        let mut moved = false;
        for task in &f.def.tasks {
            let Some(t) = tasks.get(&task.id) else {
                continue;
            };
            if t.state != TaskState::Pending {
                continue;
            }
            let ended = task
                .needs
                .iter()
                .all(|n| tasks.get(n).is_some_and(|d| d.state.is_final()));
            if !ended || matches!(ws, Ws::NotReady) {
                continue;
            }
            let blocking: Vec<String> = task
                .needs
                .iter()
                .filter(|n| {
                    let done = tasks[*n].state;
                    let optional = f.def.tasks.iter().any(|d| &d.id == *n && d.optional);
                    done != TaskState::Succeeded && !(optional && done != TaskState::Skipped)
                })
                .map(|n| format!("{n} ({})", tasks[n].state.as_str()))
                .collect();
            let next = if let Ws::Failed(why) = ws {
                steps.push(Step::Skip {
                    task: task.id.clone(),
                    reason: format!("the workspace could not be created: {why}"),
                });
                TaskState::Skipped
            } else if !blocking.is_empty() {
                steps.push(Step::Skip {
                    task: task.id.clone(),
                    reason: format!("needs {}", blocking.join(", ")),
                });
                TaskState::Skipped
            } else {
                steps.push(Step::Start {
                    task: task.id.clone(),
                });
                TaskState::Queued
            };
            if let Some(t) = tasks.get_mut(&task.id) {
                t.state = next;
            }
            moved = true;
        }
        if !moved {
            break;
        }
    }

    // Every task ended: so does the run.
    if tasks.values().all(|t| t.state.is_final()) {
        let failed: Vec<String> = f
            .def
            .tasks
            .iter()
            .filter(|d| {
                !d.optional
                    && tasks
                        .get(&d.id)
                        .is_some_and(|t| t.state != TaskState::Succeeded)
            })
            .map(|d| format!("{} ({})", d.id, tasks[&d.id].state.as_str()))
            .collect();
        let (state, reason) = if let Ws::Failed(why) = ws {
            (
                RunState::Failed,
                Some(format!("the workspace could not be created: {why}")),
            )
        } else if failed.is_empty() {
            (RunState::Succeeded, None)
        } else {
            (
                RunState::Failed,
                Some(format!(
                    "required tasks did not succeed: {}",
                    failed.join(", ")
                )),
            )
        };
        steps.push(Step::Finish { state, reason });
    }
    steps
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use drover_proto::workflows::TaskDef;

    use super::*;

    fn def(tasks: &[(&str, &[&str], bool)]) -> WorkflowDef {
        WorkflowDef {
            name: "t".into(),
            description: String::new(),
            mode: drover_proto::workflows::Mode::Dag,
            inputs: BTreeMap::new(),
            timeout: None,
            webhooks: Vec::new(),
            workspace: None,
            keep_workspace: false,
            tasks: tasks
                .iter()
                .map(|(id, needs, optional)| TaskDef {
                    id: (*id).into(),
                    description: String::new(),
                    action: "noop".into(),
                    params: BTreeMap::new(),
                    target: "*".into(),
                    needs: needs.iter().map(|n| (*n).to_owned()).collect(),
                    timeout: None,
                    retries: None,
                    optional: *optional,
                    artifacts: Vec::new(),
                    sandbox: None,
                })
                .collect(),
        }
    }

    fn job(id: &str, state: JobState) -> Option<JobFacts> {
        Some(JobFacts {
            id: id.into(),
            state,
            cancel_requested: false,
        })
    }

    fn facts<'a>(d: &'a WorkflowDef, tasks: &[(&str, TaskState, Option<JobFacts>)]) -> Facts<'a> {
        Facts {
            def: d,
            tasks: tasks
                .iter()
                .map(|(id, state, job)| {
                    (
                        (*id).to_owned(),
                        TaskFacts {
                            state: *state,
                            job: job.clone(),
                        },
                    )
                })
                .collect(),
            workspace: WorkspaceFacts::None,
            cancel_requested_at: None,
            deadline_at: None,
            now: Utc::now(),
        }
    }

    fn start(t: &str) -> Step {
        Step::Start { task: t.into() }
    }

    fn skip(t: &str, why: &str) -> Step {
        Step::Skip {
            task: t.into(),
            reason: why.into(),
        }
    }

    fn end(t: &str, j: &str, s: TaskState) -> Step {
        Step::EndTask {
            task: t.into(),
            job: j.into(),
            state: s,
        }
    }

    use JobState as J;
    use TaskState as T;

    #[test]
    fn tasks_start_when_their_needs_have_ended() {
        // A diamond: a → (b, c) → d.
        let d = def(&[
            ("a", &[], false),
            ("b", &["a"], false),
            ("c", &["a"], false),
            ("d", &["b", "c"], false),
        ]);
        /// name, the tasks (id, stored state, job), the steps wanted
        type Case<'a> = (
            &'a str,
            Vec<(&'a str, TaskState, Option<JobFacts>)>,
            Vec<Step>,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "only the root starts",
                vec![
                    ("a", T::Pending, None),
                    ("b", T::Pending, None),
                    ("c", T::Pending, None),
                    ("d", T::Pending, None),
                ],
                vec![start("a")],
            ),
            (
                "a running: nothing to do",
                vec![
                    ("a", T::Queued, job("ja", J::Running)),
                    ("b", T::Pending, None),
                    ("c", T::Pending, None),
                    ("d", T::Pending, None),
                ],
                vec![],
            ),
            (
                "a's job ended: a ends and both branches start in the same plan",
                vec![
                    ("a", T::Queued, job("ja", J::Succeeded)),
                    ("b", T::Pending, None),
                    ("c", T::Pending, None),
                    ("d", T::Pending, None),
                ],
                vec![end("a", "ja", T::Succeeded), start("b"), start("c")],
            ),
            (
                "fan-in waits for every need",
                vec![
                    ("a", T::Succeeded, None),
                    ("b", T::Queued, job("jb", J::Succeeded)),
                    ("c", T::Queued, job("jc", J::Running)),
                    ("d", T::Pending, None),
                ],
                vec![end("b", "jb", T::Succeeded)],
            ),
            (
                "the last task ends: the run succeeds",
                vec![
                    ("a", T::Succeeded, None),
                    ("b", T::Succeeded, None),
                    ("c", T::Succeeded, None),
                    ("d", T::Queued, job("jd", J::Succeeded)),
                ],
                vec![
                    end("d", "jd", T::Succeeded),
                    Step::Finish {
                        state: RunState::Succeeded,
                        reason: None,
                    },
                ],
            ),
        ];
        for (name, tasks, want) in cases {
            assert_eq!(plan(&facts(&d, &tasks)), want, "{name}");
        }
    }

    #[test]
    fn failures_skip_what_needs_them_unless_optional() {
        let d = def(&[
            ("a", &[], false),
            ("opt", &[], true),
            ("b", &["a"], false),
            ("c", &["opt"], false),
            ("e", &["b"], false),
        ]);
        let got = plan(&facts(
            &d,
            &[
                ("a", T::Queued, job("ja", J::Lost)),
                ("opt", T::Queued, job("jo", J::Failed)),
                ("b", T::Pending, None),
                ("c", T::Pending, None),
                ("e", T::Pending, None),
            ],
        ));
        assert_eq!(
            got,
            vec![
                end("a", "ja", T::Failed),
                end("opt", "jo", T::Failed),
                // Skips cascade in one plan; an optional failure lets
                // what needs it run.
                skip("b", "needs a (failed)"),
                start("c"),
                skip("e", "needs b (skipped)"),
            ]
        );
        // Once c ended, the run fails for the required failures only.
        let got = plan(&facts(
            &d,
            &[
                ("a", T::Failed, None),
                ("opt", T::Failed, None),
                ("b", T::Skipped, None),
                ("c", T::Queued, job("jc", J::Succeeded)),
                ("e", T::Skipped, None),
            ],
        ));
        assert_eq!(
            got,
            vec![
                end("c", "jc", T::Succeeded),
                Step::Finish {
                    state: RunState::Failed,
                    reason: Some(
                        "required tasks did not succeed: a (failed), b (skipped), e (skipped)"
                            .into()
                    ),
                },
            ]
        );
        // A skipped optional task still blocks what needs it.
        let d = def(&[("opt", &[], true), ("c", &["opt"], false)]);
        let got = plan(&facts(
            &d,
            &[("opt", T::Skipped, None), ("c", T::Pending, None)],
        ));
        assert_eq!(got[0], skip("c", "needs opt (skipped)"));
    }

    #[test]
    fn job_states_map_to_task_states() {
        for (job_state, task_state) in [
            (J::TimedOut, T::TimedOut),
            (J::Cancelled, T::Cancelled),
            (J::Rejected, T::Failed),
            (J::Failed, T::Failed),
        ] {
            let d = def(&[("a", &[], false)]);
            let got = plan(&facts(&d, &[("a", T::Queued, job("ja", job_state))]));
            assert_eq!(got[0], end("a", "ja", task_state), "{job_state:?}");
            assert!(matches!(
                got[1],
                Step::Finish {
                    state: RunState::Failed,
                    ..
                }
            ));
        }
        // Non-final states are derived when read, never planned.
        assert_eq!(live_state(T::Queued, Some(J::Running)), T::Running);
        assert_eq!(live_state(T::Queued, Some(J::Dispatched)), T::Dispatched);
        assert_eq!(live_state(T::Succeeded, Some(J::Succeeded)), T::Succeeded);
        assert_eq!(live_state(T::Pending, None), T::Pending);
    }

    #[test]
    fn cancel_stops_running_jobs_once_and_skips_what_waits() {
        let d = def(&[("a", &[], false), ("b", &["a"], false)]);
        let mut f = facts(
            &d,
            &[
                ("a", T::Queued, job("ja", J::Running)),
                ("b", T::Pending, None),
            ],
        );
        f.cancel_requested_at = Some(Utc::now());
        let got = plan(&f);
        assert!(
            matches!(&got[0], Step::CancelJob { job, .. } if job == "ja"),
            "{got:?}"
        );
        assert!(
            matches!(&got[1], Step::Skip { task, reason } if task == "b" && reason.starts_with("cancelled at")),
            "{got:?}"
        );
        assert_eq!(got.len(), 2, "the run waits for a's job: {got:?}");
        // Asked once: not again.
        f.tasks
            .get_mut("a")
            .unwrap()
            .job
            .as_mut()
            .unwrap()
            .cancel_requested = true;
        f.tasks.get_mut("b").unwrap().state = T::Skipped;
        assert_eq!(plan(&f), vec![]);
        // The job ended: the run ends cancelled.
        f.tasks.get_mut("a").unwrap().job.as_mut().unwrap().state = J::Cancelled;
        let got = plan(&f);
        assert_eq!(got[0], end("a", "ja", T::Cancelled));
        assert!(
            matches!(
                &got[1],
                Step::Finish {
                    state: RunState::Cancelled,
                    ..
                }
            ),
            "{got:?}"
        );
    }

    #[test]
    fn a_deadline_times_the_run_out() {
        let mut d = def(&[("a", &[], false)]);
        d.timeout = Some(Duration::from_secs(60));
        let mut f = facts(&d, &[("a", T::Pending, None)]);
        f.deadline_at = Some(f.now - chrono::Duration::seconds(1));
        let got = plan(&f);
        assert!(
            matches!(&got[0], Step::Skip { reason, .. } if reason.starts_with("the run timed out after 1m")),
            "{got:?}"
        );
        assert!(
            matches!(
                &got[1],
                Step::Finish {
                    state: RunState::TimedOut,
                    ..
                }
            ),
            "{got:?}"
        );
        // Not yet due: tasks start as usual.
        f.deadline_at = Some(f.now + chrono::Duration::seconds(1));
        assert_eq!(plan(&f), vec![start("a")]);
    }

    #[test]
    fn the_workspace_comes_before_every_task() {
        let d = def(&[("a", &[], false), ("b", &["a"], false)]);
        let tasks = [("a", T::Pending, None), ("b", T::Pending, None)];
        let with = |ws: WorkspaceFacts| {
            let mut f = facts(&d, &tasks);
            f.workspace = ws;
            plan(&f)
        };
        assert_eq!(with(WorkspaceFacts::Pending), vec![Step::CreateWorkspace]);
        assert_eq!(with(WorkspaceFacts::Waiting), vec![]);
        assert_eq!(
            with(WorkspaceFacts::Creating(job("w", J::Running).unwrap())),
            vec![]
        );
        assert_eq!(
            with(WorkspaceFacts::Creating(job("w", J::Succeeded).unwrap())),
            vec![Step::WorkspaceCreated {
                job: "w".into(),
                ok: true
            }]
        );
        assert_eq!(
            with(WorkspaceFacts::Creating(job("w", J::Failed).unwrap())),
            vec![Step::WorkspaceCreated {
                job: "w".into(),
                ok: false
            }]
        );
        assert_eq!(with(WorkspaceFacts::Ready), vec![start("a")]);
        let got = with(WorkspaceFacts::Failed("no agent".into()));
        let why = "the workspace could not be created: no agent";
        assert_eq!(
            got,
            vec![
                skip("a", why),
                skip("b", why),
                Step::Finish {
                    state: RunState::Failed,
                    reason: Some(why.into())
                }
            ]
        );
    }

    #[test]
    fn a_stop_waits_for_the_workspace_being_created() {
        let d = def(&[("a", &[], false)]);
        let mut f = facts(&d, &[("a", T::Pending, None)]);
        f.cancel_requested_at = Some(Utc::now());
        f.workspace = WorkspaceFacts::Creating(job("w", J::Running).unwrap());
        let got = plan(&f);
        assert!(
            matches!(&got[0], Step::CancelJob { job, .. } if job == "w"),
            "{got:?}"
        );
        assert!(matches!(&got[1], Step::Skip { .. }), "{got:?}");
        assert_eq!(
            got.len(),
            2,
            "no Finish while the workspace is created: {got:?}"
        );
        f.workspace = WorkspaceFacts::Creating(job("w", J::Cancelled).unwrap());
        f.tasks.get_mut("a").unwrap().state = T::Skipped;
        let got = plan(&f);
        assert_eq!(
            got[0],
            Step::WorkspaceCreated {
                job: "w".into(),
                ok: false
            }
        );
        assert!(
            matches!(
                &got[1],
                Step::Finish {
                    state: RunState::Cancelled,
                    ..
                }
            ),
            "{got:?}"
        );
    }
}
