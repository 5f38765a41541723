//! Workflow definitions: parsed from YAML (or JSON, which is YAML) with the
//! position of every task, checked, and turned into the canonical
//! `WorkflowDef` that is hashed and stored. Every error names the file,
//! line and column, and what is wrong.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use drover_proto::sandbox::{is_profile_name, GitSource};
use drover_proto::workflows::{
    valid_artifact_path, InputSpec, Mode, TaskDef, WebhookEvent, WebhookSpec, WorkflowDef,
    WorkspaceDef,
};
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Deserialize;
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};

use super::template::{self, Ref};

/// Most tasks one definition may hold.
pub const MAX_TASKS: usize = 2000;
/// Longest definition text accepted.
pub const MAX_DEFINITION_BYTES: usize = 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDef {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    inputs: BTreeMap<String, Option<RawInput>>,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default)]
    webhooks: Vec<Spanned<RawWebhook>>,
    tasks: Vec<Spanned<RawTask>>,
    #[serde(default)]
    workspace: Option<Spanned<RawWorkspace>>,
    #[serde(default)]
    keep_workspace: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkspace {
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    sandbox: Option<String>,
    #[serde(default)]
    git: Option<GitSource>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default)]
    target: Option<String>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default)]
    retries: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    events: Vec<WebhookEvent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    id: Spanned<String>,
    #[serde(default)]
    description: String,
    action: String,
    #[serde(default)]
    params: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    needs: Vec<Spanned<String>>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default)]
    retries: Option<u32>,
    #[serde(default)]
    optional: bool,
    #[serde(default)]
    artifacts: Vec<String>,
    #[serde(default)]
    sandbox: Option<String>,
}

/// A checked definition with where its tasks are in the source, for the
/// errors found later (an unknown action, a bad parameter).
#[derive(Debug, Clone)]
pub struct Parsed {
    pub def: WorkflowDef,
    /// `source:line:column` of each task, by id.
    pub task_at: HashMap<String, String>,
}

/// Parses and checks a definition. `source` names it in errors.
pub fn parse(text: &str, source: &str) -> Result<Parsed, String> {
    if text.len() > MAX_DEFINITION_BYTES {
        return Err(format!(
            "{source}: the definition is {} bytes; at most {MAX_DEFINITION_BYTES} are accepted",
            text.len()
        ));
    }
    let raw: RawDef = drover_proto::yaml::from_str(text, source).map_err(|e| e.to_string())?;
    check(raw, source)
}

/// Canonical JSON of a definition and its sha256, the id it is stored by.
pub fn canonical(def: &WorkflowDef) -> (String, String) {
    let body = serde_json::to_string(def).unwrap_or_default();
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    (body, hash)
}

fn at(source: &str, loc: &serde_saphyr::Location) -> String {
    format!("{source}: line {}, column {}", loc.line(), loc.column())
}

pub fn is_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn check(raw: RawDef, source: &str) -> Result<Parsed, String> {
    let name_at = at(source, &raw.name.referenced);
    let name = raw.name.value;
    if !(1..=128).contains(&name.len())
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        return Err(format!(
            "{name_at}: name '{name}' must be 1 to 128 letters, digits, '-', '_' or '.'"
        ));
    }
    if raw.tasks.is_empty() {
        return Err(format!("{source}: workflow '{name}' has no tasks"));
    }
    if raw.tasks.len() > MAX_TASKS {
        return Err(format!(
            "{source}: workflow '{name}' has {} tasks; at most {MAX_TASKS} are allowed",
            raw.tasks.len()
        ));
    }
    for input in raw.inputs.keys() {
        if !is_name(input) {
            return Err(format!(
                "{source}: input '{input}': a name is letters, digits, '_' and '-', starting with a letter"
            ));
        }
    }
    if raw.timeout == Some(Duration::ZERO) || raw.defaults.timeout == Some(Duration::ZERO) {
        return Err(format!("{source}: a timeout must be longer than 0s"));
    }

    let mut webhooks = Vec::new();
    for hook in raw.webhooks {
        let hook_at = at(source, &hook.referenced);
        let h = hook.value;
        check_webhook_url(&h.url).map_err(|e| format!("{hook_at}: webhook: {e}"))?;
        webhooks.push(WebhookSpec {
            url: h.url,
            secret: h.secret,
            events: if h.events.is_empty() {
                vec![WebhookEvent::Completed, WebhookEvent::Failed]
            } else {
                h.events
            },
        });
    }

    let workspace = match raw.workspace {
        Some(ws) => {
            let ws_at = at(source, &ws.referenced);
            let w = ws.value;
            let target = w.target.or_else(|| raw.defaults.target.clone()).ok_or_else(|| {
                format!("{ws_at}: workspace: no target: set 'target' on the workspace or in 'defaults'")
            })?;
            if let Some(s) = &w.sandbox {
                if !is_profile_name(s) {
                    return Err(format!(
                        "{ws_at}: workspace: sandbox '{s}' is not a sandbox profile name"
                    ));
                }
            }
            if let Some(g) = &w.git {
                check_git(g, &raw.inputs).map_err(|e| format!("{ws_at}: workspace: {e}"))?;
            }
            check_workspace_env(&w.env, &raw.inputs)
                .map_err(|e| format!("{ws_at}: workspace: {e}"))?;
            Some(WorkspaceDef {
                target,
                sandbox: w.sandbox,
                git: w.git,
                env: w.env,
            })
        }
        None => None,
    };
    let keep_workspace = raw.keep_workspace.as_ref().is_some_and(|k| k.value);
    if let (Some(k), true, None) = (&raw.keep_workspace, keep_workspace, &workspace) {
        return Err(format!(
            "{}: keep_workspace is set but the workflow has no workspace",
            at(source, &k.referenced)
        ));
    }

    // Ids first: duplicates, syntax.
    let mut task_at: HashMap<String, String> = HashMap::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, t) in raw.tasks.iter().enumerate() {
        let id = &t.value.id.value;
        let here = at(source, &t.value.id.referenced);
        if !is_name(id) {
            return Err(format!(
                "{here}: task id '{id}': letters, digits, '_' and '-', starting with a letter, at most 64"
            ));
        }
        if let Some(first) = task_at.get(id) {
            return Err(format!(
                "{here}: task id '{id}' is used twice (first at {first})"
            ));
        }
        task_at.insert(id.clone(), here);
        index.insert(id.clone(), i);
    }

    let mut tasks: Vec<TaskDef> = Vec::with_capacity(raw.tasks.len());
    let mut graph: DiGraph<usize, ()> = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..raw.tasks.len()).map(|i| graph.add_node(i)).collect();
    let mut previous: Option<String> = None;
    for (i, t) in raw.tasks.into_iter().enumerate() {
        let t = t.value;
        let id = t.id.value.clone();
        let here = task_at[&id].clone();
        let ctx = |m: String| format!("{here}: task '{id}': {m}");
        if t.action.trim().is_empty() {
            return Err(ctx("action is empty".into()));
        }
        let mut needs: Vec<String> = Vec::new();
        if !t.needs.is_empty() && raw.mode != Mode::Dag {
            let mode = match raw.mode {
                Mode::Sequential => "sequential",
                _ => "parallel",
            };
            return Err(format!(
                "{}: task '{id}': 'needs' is only for mode dag; in mode {mode} the order is given",
                at(source, &t.needs[0].referenced)
            ));
        }
        for need in &t.needs {
            let need_at = at(source, &need.referenced);
            let n = &need.value;
            if n == &id {
                return Err(format!("{need_at}: task '{id}' needs itself"));
            }
            let Some(&j) = index.get(n) else {
                return Err(format!(
                    "{need_at}: task '{id}' needs '{n}', which is not a task of this workflow"
                ));
            };
            if needs.contains(n) {
                return Err(format!("{need_at}: task '{id}' lists '{n}' twice in needs"));
            }
            needs.push(n.clone());
            graph.add_edge(nodes[j], nodes[i], ());
        }
        if raw.mode == Mode::Sequential {
            if let Some(p) = &previous {
                needs.push(p.clone());
                graph.add_edge(nodes[index[p]], nodes[i], ());
            }
            previous = Some(id.clone());
        }
        let target = match &workspace {
            // Every task runs on the agent that holds the workspace.
            Some(ws) => {
                if t.target.is_some() {
                    return Err(ctx(
                        "a run with a workspace runs every task on the workspace's agent; remove 'target' (set it on 'workspace')"
                            .into(),
                    ));
                }
                ws.target.clone()
            }
            None => t
                .target
                .or_else(|| raw.defaults.target.clone())
                .ok_or_else(
                    || ctx("no target: set 'target' on the task or in 'defaults'".into()),
                )?,
        };
        if let Some(s) = &t.sandbox {
            if !is_profile_name(s) {
                return Err(ctx(format!("sandbox '{s}' is not a sandbox profile name")));
            }
        }
        if t.timeout == Some(Duration::ZERO) {
            return Err(ctx("timeout must be longer than 0s".into()));
        }
        for path in &t.artifacts {
            if !valid_artifact_path(path) {
                return Err(ctx(format!(
                    "artifact '{path}' must be a relative path inside the working dir (no '..', no leading '/')"
                )));
            }
        }
        for (param, value) in &t.params {
            if let serde_json::Value::String(s) = value {
                let refs = template::refs(s).map_err(|e| ctx(format!("param '{param}': {e}")))?;
                for r in refs {
                    if let Ref::Secret(name) = &r {
                        return Err(ctx(format!(
                            "param '{param}' refers to secrets.{name}: a secret may only be used in env (an action's or the workspace's), never in parameters, which become argv that other users of the host can read"
                        )));
                    }
                    if let Ref::Input(input) = &r {
                        if !raw.inputs.contains_key(input) {
                            return Err(ctx(format!(
                                "param '{param}' refers to inputs.{input}, which is not declared under 'inputs'"
                            )));
                        }
                    }
                    if let Ref::TaskOutput(task, _) = &r {
                        if !index.contains_key(task) {
                            return Err(ctx(format!(
                                "param '{param}' refers to tasks.{task}, which is not a task of this workflow"
                            )));
                        }
                    }
                }
            }
        }
        tasks.push(TaskDef {
            id,
            description: t.description,
            action: t.action,
            params: t.params,
            target,
            needs,
            timeout: t.timeout.or(raw.defaults.timeout),
            retries: t.retries.or(raw.defaults.retries),
            optional: t.optional,
            artifacts: t.artifacts,
            sandbox: t.sandbox,
        });
    }

    if let Some(cycle) = find_cycle(&graph, &tasks) {
        let first = &cycle[0];
        return Err(format!(
            "{}: the tasks form a cycle: {}",
            task_at[first],
            cycle
                .iter()
                .chain(std::iter::once(first))
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(" -> ")
        ));
    }

    // A task may only read outputs of tasks that end before it starts.
    let upstream = ancestors(&tasks);
    for t in &tasks {
        for (param, value) in &t.params {
            let serde_json::Value::String(s) = value else {
                continue;
            };
            for r in template::refs(s).unwrap_or_default() {
                if let Ref::TaskOutput(task, _) = &r {
                    if !upstream[&t.id].contains(task) {
                        return Err(format!(
                            "{}: task '{}': param '{param}' refers to tasks.{task}, which is not upstream of '{}' (add it to needs)",
                            task_at[&t.id], t.id, t.id
                        ));
                    }
                }
            }
        }
    }

    let inputs = raw
        .inputs
        .into_iter()
        .map(|(k, v)| {
            let v = v.unwrap_or(RawInput {
                default: None,
                description: String::new(),
            });
            (
                k,
                InputSpec {
                    default: v.default,
                    description: v.description,
                },
            )
        })
        .collect();
    Ok(Parsed {
        def: WorkflowDef {
            name,
            description: raw.description,
            mode: raw.mode,
            inputs,
            timeout: raw.timeout,
            webhooks,
            tasks,
            workspace,
            keep_workspace,
        },
        task_at,
    })
}

/// A cycle as task ids in order, if the needs have one.
fn find_cycle(graph: &DiGraph<usize, ()>, tasks: &[TaskDef]) -> Option<Vec<String>> {
    for scc in petgraph::algo::kosaraju_scc(graph) {
        if scc.len() < 2 {
            continue;
        }
        // Walk edges inside the component from its earliest task until a
        // task repeats: that walk is a cycle.
        let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
        let start = *members.iter().min_by_key(|n| graph[**n])?;
        let mut path = vec![start];
        let mut current = start;
        loop {
            let next = graph
                .neighbors(current)
                .filter(|n| members.contains(n))
                .min_by_key(|n| graph[*n])?;
            if let Some(pos) = path.iter().position(|n| *n == next) {
                return Some(
                    path[pos..]
                        .iter()
                        .map(|n| tasks[graph[*n]].id.clone())
                        .collect(),
                );
            }
            path.push(next);
            current = next;
        }
    }
    None
}

/// Every task's transitive needs. Tasks are acyclic here.
fn ancestors(tasks: &[TaskDef]) -> HashMap<String, BTreeSet<String>> {
    let by_id: HashMap<&str, &TaskDef> = tasks.iter().map(|t| (t.id.as_str(), t)).collect();
    let mut memo: HashMap<String, BTreeSet<String>> = HashMap::new();
    fn visit(
        id: &str,
        by_id: &HashMap<&str, &TaskDef>,
        memo: &mut HashMap<String, BTreeSet<String>>,
    ) -> BTreeSet<String> {
        if let Some(s) = memo.get(id) {
            return s.clone();
        }
        let mut set = BTreeSet::new();
        if let Some(t) = by_id.get(id) {
            for n in &t.needs {
                set.insert(n.clone());
                set.extend(visit(n, by_id, memo));
            }
        }
        memo.insert(id.to_owned(), set.clone());
        set
    }
    for t in tasks {
        visit(&t.id, &by_id, &mut memo);
    }
    memo
}

/// A workspace's git source: `repo` and `ref` may hold `${{ inputs.NAME }}`
/// and `${{ run.id }}` (rendered, then checked, when the workspace is
/// created); without references they are checked now.
/// Variables the agent sets itself, or that change what a fixed argv does:
/// a workspace may not set them for its tasks.
const RESERVED_ENV: &[&str] = &["PATH", "BASH_ENV", "ENV", "IFS", "HOME"];

/// A workspace's variables: valid names, none reserved, values referring
/// only to declared inputs and the run id (no task has run when the
/// workspace is made).
fn check_workspace_env(
    env: &BTreeMap<String, String>,
    inputs: &BTreeMap<String, Option<RawInput>>,
) -> Result<(), String> {
    for (name, value) in env {
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(format!("env: '{name}' is not a valid variable name"));
        }
        if RESERVED_ENV.contains(&name.as_str())
            || name.starts_with("DROVER_")
            || name.starts_with("LD_")
        {
            return Err(format!(
                "env: '{name}' is reserved (PATH, HOME, IFS, ENV, BASH_ENV, DROVER_* and LD_* cannot be set)"
            ));
        }
        check_workspace_refs(&format!("env.{name}"), value, inputs)?;
    }
    Ok(())
}

/// Checks the `${{ }}` references of a workspace's field: declared inputs
/// and the run id only. True when it has any.
fn check_workspace_refs(
    field: &str,
    value: &str,
    inputs: &BTreeMap<String, Option<RawInput>>,
) -> Result<bool, String> {
    let refs = template::refs(value).map_err(|e| format!("{field}: {e}"))?;
    for r in &refs {
        match r {
            Ref::Input(input) if !inputs.contains_key(input) => {
                return Err(format!(
                    "{field} refers to inputs.{input}, which is not declared under 'inputs'"
                ))
            }
            Ref::TaskOutput(task, _) => {
                return Err(format!(
                    "{field} refers to tasks.{task}: the workspace is made before any task runs"
                ))
            }
            Ref::Secret(name) if !field.starts_with("env.") => {
                return Err(format!(
                    "{field} refers to secrets.{name}: a secret may only be used in env"
                ))
            }
            _ => {}
        }
    }
    Ok(!refs.is_empty())
}

fn check_git(g: &GitSource, inputs: &BTreeMap<String, Option<RawInput>>) -> Result<(), String> {
    let mut templated = false;
    for (field, value) in [
        ("git.repo", Some(&g.repo)),
        ("git.ref", g.reference.as_ref()),
    ] {
        let Some(value) = value else { continue };
        templated |= check_workspace_refs(field, value, inputs)?;
    }
    if templated {
        Ok(())
    } else {
        g.validate()
    }
}

/// A webhook URL must be http or https with a host.
pub fn check_webhook_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("url '{url}': {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!(
            "url '{url}' must be http:// or https:// with a host"
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn err(yaml: &str) -> String {
        parse(yaml, "wf.yaml").expect_err("must be refused")
    }

    const DIAMOND: &str = "\
name: diamond
inputs:
  greeting: {default: hello}
defaults:
  target: group:local
tasks:
  - id: a
    action: echo
    params: {message: '${{ inputs.greeting }}'}
  - id: b
    action: echo
    needs: [a]
    params: {message: '${{ tasks.a.outputs.x }}'}
  - id: c
    action: echo
    needs: [a]
  - id: d
    action: noop
    needs: [b, c]
";

    #[test]
    fn a_diamond_is_accepted_with_defaults_applied() {
        let p = parse(DIAMOND, "wf.yaml").expect("valid");
        assert_eq!(p.def.tasks.len(), 4);
        assert_eq!(p.def.tasks[3].needs, vec!["b", "c"]);
        assert_eq!(p.def.tasks[0].target, "group:local");
        assert_eq!(p.task_at["c"], "wf.yaml: line 14, column 9");
        let (body, hash) = canonical(&p.def);
        assert_eq!(
            canonical(&parse(DIAMOND, "other").expect("valid").def).1,
            hash
        );
        assert!(body.contains("\"diamond\""));
    }

    #[test]
    fn sequential_mode_chains_tasks() {
        let p = parse(
            "name: s\nmode: sequential\ndefaults: {target: '*'}\ntasks:\n  - {id: a, action: noop}\n  - {id: b, action: noop}\n  - {id: c, action: noop}\n",
            "s.yaml",
        )
        .expect("valid");
        let needs: Vec<_> = p.def.tasks.iter().map(|t| t.needs.clone()).collect();
        assert_eq!(
            needs,
            vec![vec![], vec!["a".to_owned()], vec!["b".to_owned()]]
        );
    }

    #[test]
    fn refusals_name_the_line_and_the_problem() {
        let table: &[(&str, &[&str])] = &[
            (
                "name: x\ndefaults: {target: '*'}\ntasks:\n  - id: a\n    action: noop\n    needs: [b]\n  - id: b\n    action: noop\n    needs: [c]\n  - id: c\n    action: noop\n    needs: [a]\n",
                &["line 4", "cycle: a -> c -> b -> a"],
            ),
            (
                "name: x\ndefaults: {target: '*'}\ntasks:\n  - id: a\n    action: noop\n    needs: [zz]\n",
                &["line 6, column 13", "needs 'zz', which is not a task"],
            ),
            (
                "name: x\ndefaults: {target: '*'}\ntasks:\n  - {id: a, action: noop}\n  - {id: a, action: noop}\n",
                &["line 5", "task id 'a' is used twice (first at wf.yaml: line 4"],
            ),
            (
                "name: x\ndefaults: {target: '*'}\ntasks:\n  - id: a\n    action: echo\n  - id: b\n    action: echo\n    params: {message: '${{ tasks.a.outputs.x }}'}\n",
                &["line 6", "refers to tasks.a, which is not upstream of 'b'"],
            ),
            (
                "name: x\ndefaults: {target: '*'}\ntasks:\n  - id: a\n    action: echo\n    params: {message: '${{ inputs.nope }}'}\n",
                &["line 4", "inputs.nope, which is not declared"],
            ),
            (
                "name: x\ndefaults: {target: '*'}\ntasks:\n  - id: a\n    action: echo\n    params: {message: '${{ env.HOME }}'}\n",
                &["unknown reference 'env.HOME'"],
            ),
            (
                "name: x\ntasks:\n  - id: a\n    action: noop\n    colour: red\n",
                &["line 5", "colour"],
            ),
            ("name: x\ntasks:\n  - id: a\n    action: noop\n", &["no target"]),
            (
                "name: x\ndefaults: {target: '*'}\ntasks:\n  - id: a\n    action: noop\n    artifacts: [../etc/passwd]\n",
                &["artifact '../etc/passwd'"],
            ),
            (
                "name: x\nmode: parallel\ndefaults: {target: '*'}\ntasks:\n  - {id: a, action: noop}\n  - {id: b, action: noop, needs: [a]}\n",
                &["only for mode dag"],
            ),
            (
                "name: x\ndefaults: {target: '*'}\nwebhooks:\n  - url: 'ftp://x'\ntasks:\n  - {id: a, action: noop}\n",
                &["line 4", "must be http"],
            ),
            ("name: x\ntasks: []\n", &["has no tasks"]),
            ("name: [\n", &["wf.yaml"]),
            (
                "name: x\ndefaults: {target: '*'}\ntasks:\n  - {id: a, action: noop, retries: many}\n",
                &["line 4"],
            ),
        ];
        for (yaml, wants) in table {
            let e = err(yaml);
            for want in *wants {
                assert!(e.contains(want), "{e:?} should contain {want:?}");
            }
        }
    }

    #[test]
    fn workspaces_pin_tasks_and_are_checked() {
        let ok = "\
name: ws
defaults: {target: group:build}
workspace:
  sandbox: builder
  git: {repo: /srv/app.git, ref: v1.2}
tasks:
  - {id: a, action: noop}
  - {id: b, action: noop, needs: [a], sandbox: builder}
";
        let p = parse(ok, "ws.yaml").expect("valid");
        let ws = p.def.workspace.as_ref().expect("workspace");
        assert_eq!(ws.target, "group:build");
        assert_eq!(ws.sandbox.as_deref(), Some("builder"));
        assert_eq!(
            ws.git.as_ref().map(|g| g.repo.as_str()),
            Some("/srv/app.git")
        );
        assert!(!p.def.keep_workspace);
        assert_eq!(p.def.tasks[1].sandbox.as_deref(), Some("builder"));
        let templated = "name: t\ninputs: {repo: {}, ref: {default: main}}\nworkspace: {target: '*', git: {repo: '${{ inputs.repo }}', ref: '${{ inputs.ref }}'}}\ntasks:\n  - {id: a, action: noop}\n";
        assert!(parse(templated, "t.yaml").is_ok());
        // A definition without the new fields hashes as it always did.
        let (plain, _) = canonical(&parse(DIAMOND, "d").expect("valid").def);
        assert!(
            !plain.contains("workspace") && !plain.contains("sandbox"),
            "{plain}"
        );

        let table: &[(&str, &[&str])] = &[
            (
                "name: w\nworkspace: {git: {repo: /r}}\ntasks:\n  - {id: a, action: noop}\n",
                &["line 2", "workspace: no target"],
            ),
            (
                "name: w\nworkspace: {target: '*'}\ntasks:\n  - {id: a, action: noop, target: group:x}\n",
                &["line 4", "task 'a'", "remove 'target'"],
            ),
            (
                "name: w\nworkspace: {target: '*', git: {repo: '--upload-pack=touch /tmp/x'}}\ntasks:\n  - {id: a, action: noop}\n",
                &["line 2", "must not start with '-'"],
            ),
            (
                "name: w\nworkspace: {target: '*', git: {repo: 'ext::id'}}\ntasks:\n  - {id: a, action: noop}\n",
                &["line 2", "refused"],
            ),
            (
                "name: w\nworkspace: {target: '*', git: {repo: /r, ref: '-b'}}\ntasks:\n  - {id: a, action: noop}\n",
                &["git.ref '-b'"],
            ),
            (
                "name: w\nworkspace: {target: '*', git: {repo: /r, branch: main}}\ntasks:\n  - {id: a, action: noop}\n",
                &["wf.yaml", "branch"],
            ),
            (
                "name: w\nworkspace: {target: '*', sandbox: 'a b'}\ntasks:\n  - {id: a, action: noop}\n",
                &["line 2", "sandbox 'a b'"],
            ),
            (
                "name: w\ndefaults: {target: '*'}\nkeep_workspace: true\ntasks:\n  - {id: a, action: noop}\n",
                &["line 3", "no workspace"],
            ),
            (
                "name: w\nworkspace: {target: '*', git: {repo: '${{ inputs.repo }}'}}\ntasks:\n  - {id: a, action: noop}\n",
                &["line 2", "inputs.repo", "not declared"],
            ),
            (
                "name: w\nworkspace: {target: '*', git: {repo: /r, ref: '${{ tasks.a.outputs.x }}'}}\ntasks:\n  - {id: a, action: noop}\n",
                &["line 2", "before any task"],
            ),
            (
                "name: w\ndefaults: {target: '*'}\ntasks:\n  - {id: a, action: noop, sandbox: '$(id)'}\n",
                &["line 4", "task 'a'", "sandbox"],
            ),
        ];
        for (yaml, wants) in table {
            let e = err(yaml);
            for w in *wants {
                assert!(e.contains(w), "{yaml:?}: {e} (wanted {w})");
            }
        }
    }

    #[test]
    fn task_descriptions_are_kept_and_left_out_when_empty() {
        let p = parse(
            "name: d\ndefaults: {target: '*'}\ntasks:\n  - {id: a, action: noop, description: Build the image once}\n  - {id: b, action: noop}\n",
            "d.yaml",
        )
        .expect("valid");
        assert_eq!(p.def.tasks[0].description, "Build the image once");
        assert_eq!(p.def.tasks[1].description, "");
        // A task without one adds nothing to the canonical JSON, so
        // definitions written before the field keep their hash.
        let b = serde_json::to_value(&p.def.tasks[1]).expect("json");
        assert!(b.get("description").is_none(), "{b}");
    }

    #[test]
    fn json_text_is_accepted() {
        let json = r#"{"name": "j", "defaults": {"target": "*"}, "tasks": [{"id": "a", "action": "noop"}]}"#;
        let p = parse(json, "api").expect("json is yaml");
        assert_eq!(p.def.tasks[0].id, "a");
    }
}
