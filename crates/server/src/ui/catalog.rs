//! The catalog: every action (its description, command, typed
//! parameters, default sandbox, whether a protection rule guards it) and
//! every sandbox profile (kind, image, limits), from the same functions as
//! `/api/v1/actions` and `/api/v1/sandboxes`; one action's full definition
//! as YAML, in the shape `drover actions apply` reads. Operators get a
//! "Run…" link to the job form.

use axum::extract::{Path, State};
use drover_proto::api::Role;
use drover_proto::approvals::{Protection, ProtectionKind};
use drover_proto::glob::glob_match;
use drover_proto::jobs::{Action, ParamSpec};
use drover_proto::sandbox::{Sandbox, PROCESS};
use maud::{html, Markup};

use super::approvals::segment;
use super::error::UiError;
use super::layout::{page as layout, Section};
use super::session::UiUser;
use crate::state::AppState;

/// The protection rules of `kind` whose glob matches `name`.
fn guards<'a>(rules: &'a [Protection], kind: ProtectionKind, name: &str) -> Vec<&'a Protection> {
    rules
        .iter()
        .filter(|r| r.kind == kind && glob_match(&r.pattern, name))
        .collect()
}

fn protected(rules: &[&Protection]) -> Markup {
    html! {
        @if rules.is_empty() { "no" } @else {
            span.protected {
                span.icon aria-hidden="true" { "◆" }
                " protected ("
                @for (i, r) in rules.iter().enumerate() {
                    @if i > 0 { ", " }
                    code { (r.pattern) } ": " (r.approvers) " approver" @if r.approvers != 1 { "s" }
                }
                ")"
            }
        }
    }
}

/// A parameter: its type, constraints and default.
fn param(p: &ParamSpec) -> (String, String, Option<String>) {
    match p {
        ParamSpec::String {
            max_length,
            pattern,
            default,
            allow_leading_dash,
        } => {
            let mut c = Vec::new();
            if let Some(m) = max_length {
                c.push(format!("at most {m} chars"));
            }
            if let Some(p) = pattern {
                c.push(format!("matches {p}"));
            }
            if *allow_leading_dash {
                c.push("may begin with '-'".to_owned());
            }
            ("string".into(), c.join("; "), default.clone())
        }
        ParamSpec::Integer { min, max, default } => {
            let mut c = Vec::new();
            if let Some(m) = min {
                c.push(format!("≥ {m}"));
            }
            if let Some(m) = max {
                c.push(format!("≤ {m}"));
            }
            (
                "integer".into(),
                c.join(", "),
                default.map(|d| d.to_string()),
            )
        }
        ParamSpec::Enum { values, default } => (
            "enum".into(),
            format!("one of {}", values.join(", ")),
            default.clone(),
        ),
        ParamSpec::Bool { default } => {
            ("bool".into(), String::new(), default.map(|d| d.to_string()))
        }
    }
}

fn params_table(a: &Action) -> Markup {
    html! {
        @if a.spec.params.is_empty() { "none" } @else {
            table.params {
                thead { tr {
                    th scope="col" { "Name" } th scope="col" { "Type" } th scope="col" { "Required" }
                    th scope="col" { "Default" } th scope="col" { "Constraints" }
                } }
                tbody {
                    @for (name, p) in &a.spec.params {
                        @let (kind, constraints, default) = param(p);
                        tr {
                            th scope="row" { code { (name) } }
                            td { (kind) }
                            td { @if default.is_none() { "yes" } @else { "no" } }
                            td { @match &default { Some(d) => code { (d) }, None => "—" } }
                            td { (constraints) }
                        }
                    }
                }
            }
        }
    }
}

fn sandbox_of(a: &Action) -> &str {
    a.spec.sandbox.as_deref().unwrap_or(PROCESS)
}

fn run_link(user: &UiUser, name: &str) -> Markup {
    html! {
        @if user.auth.role.at_least(Role::Operator) {
            a.run href={ "/ui/jobs/new?action=" (segment(name)) } { "Run…" }
        }
    }
}

/// A profile's limits: every field but its name, kind and description.
fn limits(s: &Sandbox) -> Vec<(String, String)> {
    let Ok(serde_json::Value::Object(map)) = serde_json::to_value(s) else {
        return Vec::new();
    };
    map.into_iter()
        .filter(|(k, _)| !matches!(k.as_str(), "name" | "type" | "description" | "image"))
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, v)
        })
        .collect()
}

fn description(s: &Sandbox) -> &str {
    match s {
        Sandbox::Process(p) => &p.description,
        Sandbox::Docker(d) => &d.description,
    }
}

/// `GET /ui/catalog`.
pub async fn page(State(state): State<AppState>, user: UiUser) -> Result<Markup, UiError> {
    let actions = crate::routes::actions::all(&state).await?;
    let sandboxes = crate::routes::sandboxes::all(&state).await?;
    let rules = state.store.list_protections().await?;
    let content = html! {
        section aria-labelledby="actions-h" {
            h2 #actions-h { "Actions" }
            table #actions {
                thead { tr {
                    th scope="col" { "Name" } th scope="col" { "Description" } th scope="col" { "Command" }
                    th scope="col" { "Parameters" } th scope="col" { "Sandbox" } th scope="col" { "Protected" }
                    th scope="col" { span.visually-hidden { "Run" } }
                } }
                tbody {
                    @for a in &actions {
                        tr data-action=(a.spec.name) {
                            th scope="row" { a href={ "/ui/catalog/actions/" (segment(&a.spec.name)) } { (a.spec.name) } }
                            td.description { (a.spec.description) }
                            td { code { (a.spec.argv.join(" ")) } }
                            td { (params_table(a)) }
                            td { (sandbox_of(a)) }
                            td.protection { (protected(&guards(&rules, ProtectionKind::Action, &a.spec.name))) }
                            td { (run_link(&user, &a.spec.name)) }
                        }
                    }
                }
            }
        }
        section aria-labelledby="sandboxes-h" {
            h2 #sandboxes-h { "Sandbox profiles" }
            table #sandboxes {
                thead { tr {
                    th scope="col" { "Name" } th scope="col" { "Kind" } th scope="col" { "Image" }
                    th scope="col" { "Limits" } th scope="col" { "Description" } th scope="col" { "Protected" }
                } }
                tbody {
                    @for s in &sandboxes {
                        tr data-sandbox=(s.profile.name()) {
                            th scope="row" { (s.profile.name()) @if s.builtin { " (built in)" } }
                            td { (s.profile.kind()) }
                            td { @match s.profile.docker() { Some(d) => code { (d.image) }, None => "—" } }
                            td {
                                @let l = limits(&s.profile);
                                @if l.is_empty() { "the agent's own" } @else {
                                    ul.limits { @for (k, v) in &l { li { (k) ": " code { (v) } } } }
                                }
                            }
                            td { (description(&s.profile)) }
                            td.protection { (protected(&guards(&rules, ProtectionKind::Sandbox, s.profile.name()))) }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(&user, Section::Catalog, "Catalog", content))
}

/// `GET /ui/catalog/actions/{name}`.
pub async fn action(
    State(state): State<AppState>,
    user: UiUser,
    Path(name): Path<String>,
) -> Result<Markup, UiError> {
    let a = crate::routes::actions::one(&state, &name).await?;
    let rules = state.store.list_protections().await?;
    let yaml = serde_saphyr::to_string(&a.spec).unwrap_or_else(|e| format!("# {e}"));
    let title = format!("Action {}", a.spec.name);
    let content = html! {
        dl.facts {
            dt { "Description" } dd.description { (a.spec.description) }
            dt { "Command" } dd { code { (a.spec.argv.join(" ")) } }
            dt { "Sandbox" } dd { (sandbox_of(&a)) }
            dt { "Timeout" } dd { (humantime::format_duration(a.spec.timeout)) }
            dt { "Protected" } dd.protection { (protected(&guards(&rules, ProtectionKind::Action, &a.spec.name))) }
            dt { "Hash" } dd { code { (a.hash) } }
            dt { "Updated" } dd { (a.updated_at.to_rfc3339()) }
        }
        (run_link(&user, &a.spec.name))
        section aria-labelledby="params-h" {
            h2 #params-h { "Parameters" }
            (params_table(&a))
        }
        section aria-labelledby="def-h" {
            h2 #def-h { "Definition" }
            p { "As an entry of " code { "actions:" } " in a catalog for " code { "drover actions apply" } "." }
            pre #definition { code { (yaml) } }
        }
        p { a href="/ui/catalog" { "Back to the catalog" } }
    };
    Ok(layout(&user, Section::Catalog, &title, content))
}
