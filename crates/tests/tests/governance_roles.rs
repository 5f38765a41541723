//! Governance, issue 13 point 1: users, roles, scopes and tokens, through a
//! real server on both engines. The table below names the rule of every
//! route of the OpenAPI document; the test calls each route as nobody, as
//! a viewer, an operator, a scoped operator and an admin and asserts the
//! status, so a route added without a rule here fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::Duration;

use drover_tests::*;
use serde_json::{json, Value};

const CATALOG: &str = r#"
actions:
  - name: web-echo
    argv: ["/bin/echo", "web"]
  - name: db-echo
    argv: ["/bin/echo", "db"]
  - name: web-sleep
    argv: ["/bin/sleep", "30"]
    timeout: 60s
"#;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// No token needed (logging in).
    Public,
    /// The agents' protocol: a user's token is never accepted.
    Agent,
    /// Every user, viewers included.
    Viewer,
    /// Operators and admins; a scoped operator only inside its scope.
    Operator,
    /// Admins only.
    Admin,
    /// Every user for their own (a path name or an object they own),
    /// admins for anyone's: here called on someone else's.
    SelfOrAdmin,
    /// Every user may call it; whether they may act on the object is
    /// decided by owning it (token revocation, checked separately).
    Owner,
    /// Every user, on the token presented (logging out): called with a
    /// throwaway session of its own, not the callers' tokens it would end.
    OwnSession,
}

/// Every operation of the OpenAPI document and its rule. Keep it complete:
/// the test fails on a route that is missing here or gone from the API.
const RULES: &[(&str, &str, Rule)] = &[
    ("POST", "/api/v1/auth/login", Rule::Public),
    ("POST", "/api/v1/auth/logout", Rule::OwnSession),
    ("GET", "/api/v1/auth/whoami", Rule::Viewer),
    ("POST", "/api/v1/tokens", Rule::Admin), // a bootstrap token (the default kind)
    ("GET", "/api/v1/tokens", Rule::Viewer),
    ("POST", "/api/v1/tokens/{id}/revoke", Rule::Owner),
    ("POST", "/api/v1/users", Rule::Admin),
    ("GET", "/api/v1/users", Rule::Admin),
    ("GET", "/api/v1/users/{name}", Rule::SelfOrAdmin),
    ("PUT", "/api/v1/users/{name}/role", Rule::Admin),
    ("POST", "/api/v1/users/{name}/disable", Rule::Admin),
    ("POST", "/api/v1/users/{name}/enable", Rule::Admin),
    ("POST", "/api/v1/users/{name}/password", Rule::SelfOrAdmin),
    ("GET", "/api/v1/approvals", Rule::Viewer),
    ("GET", "/api/v1/approvals/{id}", Rule::Viewer),
    ("GET", "/api/v1/approvals/events", Rule::Viewer),
    ("POST", "/api/v1/approvals/{id}/approve", Rule::Operator),
    ("POST", "/api/v1/approvals/{id}/reject", Rule::Operator),
    ("GET", "/api/v1/protections", Rule::Viewer),
    ("POST", "/api/v1/protections", Rule::Admin),
    ("DELETE", "/api/v1/protections/{id}", Rule::Admin),
    ("GET", "/api/v1/agents", Rule::Viewer),
    ("GET", "/api/v1/agents/{id}", Rule::Viewer),
    ("DELETE", "/api/v1/agents/{id}", Rule::Admin),
    ("PATCH", "/api/v1/agents/{id}/labels", Rule::Admin),
    ("PUT", "/api/v1/agents/{id}/group", Rule::Admin),
    ("POST", "/api/v1/agents/{id}/revoke", Rule::Admin),
    ("POST", "/api/v1/agents/{id}/drain", Rule::Operator),
    ("POST", "/api/v1/agents/{id}/resume", Rule::Operator),
    ("POST", "/api/v1/agents/{id}/stop", Rule::Operator),
    ("POST", "/api/v1/agent/enroll", Rule::Public),
    ("POST", "/api/v1/agent/refresh", Rule::Public),
    ("POST", "/api/v1/agent/heartbeat", Rule::Agent),
    ("POST", "/api/v1/agent/poll", Rule::Agent),
    ("POST", "/api/v1/agent/leases", Rule::Agent),
    ("POST", "/api/v1/agent/attempts/{id}/start", Rule::Agent),
    ("POST", "/api/v1/agent/attempts/{id}/logs", Rule::Agent),
    ("POST", "/api/v1/agent/attempts/{id}/result", Rule::Agent),
    ("PUT", "/api/v1/agent/attempts/{id}/artifacts", Rule::Agent),
    ("POST", "/api/v1/actions", Rule::Admin),
    ("GET", "/api/v1/actions", Rule::Viewer),
    ("GET", "/api/v1/actions/{name}", Rule::Viewer),
    ("DELETE", "/api/v1/actions/{name}", Rule::Admin),
    ("POST", "/api/v1/scripts", Rule::Admin),
    ("GET", "/api/v1/scripts", Rule::Viewer),
    ("GET", "/api/v1/scripts/{name}", Rule::Viewer),
    (
        "GET",
        "/api/v1/scripts/{name}/versions/{version}",
        Rule::Viewer,
    ),
    ("POST", "/api/v1/schedules", Rule::Operator),
    ("GET", "/api/v1/schedules", Rule::Viewer),
    ("GET", "/api/v1/schedules/{name}", Rule::Viewer),
    ("DELETE", "/api/v1/schedules/{name}", Rule::Operator),
    ("POST", "/api/v1/schedules/{name}/pause", Rule::Operator),
    ("POST", "/api/v1/schedules/{name}/resume", Rule::Operator),
    ("GET", "/api/v1/sandboxes", Rule::Viewer),
    ("DELETE", "/api/v1/sandboxes/{name}", Rule::Admin),
    ("GET", "/api/v1/fleet", Rule::Viewer),
    ("POST", "/api/v1/fleet/stop", Rule::Admin),
    ("POST", "/api/v1/fleet/resume", Rule::Admin),
    ("POST", "/api/v1/jobs", Rule::Operator),
    ("GET", "/api/v1/jobs", Rule::Viewer),
    ("GET", "/api/v1/jobs/{id}", Rule::Viewer),
    ("GET", "/api/v1/jobs/{id}/logs", Rule::Viewer),
    ("POST", "/api/v1/jobs/{id}/cancel", Rule::Operator),
    ("GET", "/api/v1/audit", Rule::Admin),
    ("GET", "/api/v1/audit/verify", Rule::Admin),
    ("GET", "/api/v1/audit/export", Rule::Admin),
    ("PUT", "/api/v1/secrets/{name}", Rule::Admin),
    ("GET", "/api/v1/secrets", Rule::Admin),
    ("DELETE", "/api/v1/secrets/{name}", Rule::Admin),
    ("POST", "/api/v1/secrets/rotate-master-key", Rule::Admin),
    ("POST", "/api/v1/webhooks", Rule::Admin),
    ("GET", "/api/v1/webhooks", Rule::Viewer),
    ("DELETE", "/api/v1/webhooks/{id}", Rule::Admin),
    ("GET", "/api/v1/webhooks/deliveries", Rule::Viewer),
    ("POST", "/api/v1/workflows/runs", Rule::Operator),
    ("GET", "/api/v1/workflows/runs", Rule::Viewer),
    ("GET", "/api/v1/workflows/runs/{id}", Rule::Viewer),
    ("POST", "/api/v1/workflows/runs/{id}/cancel", Rule::Operator),
    (
        "POST",
        "/api/v1/workflows/runs/{id}/workspace/remove",
        Rule::Operator,
    ),
    ("GET", "/api/v1/workflows/runs/{id}/result", Rule::Viewer),
    ("GET", "/api/v1/workflows/runs/{id}/artifacts", Rule::Viewer),
    ("GET", "/api/v1/artifacts/{id}", Rule::Viewer),
    ("GET", "/api/v1/workflows/runs/{id}/events", Rule::Viewer),
    ("GET", "/api/v1/workflows/runs/{id}/ws", Rule::Viewer),
];

struct Caller {
    name: &'static str,
    token: Option<String>,
    /// The role it acts with, `None` for nobody.
    rank: Option<u8>,
}

async fn call(
    cluster: &Cluster,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("{}{path}", cluster.url);
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = cluster
        .http
        .request(method, url)
        .timeout(Duration::from_secs(20));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let streaming = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if streaming {
        // A live stream never ends: its status is the answer.
        return (status, Value::Null);
    }
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn login(cluster: &Cluster, user: &str, password: &str) -> String {
    let (status, body) = call(
        cluster,
        "POST",
        "/api/v1/auth/login",
        None,
        Some(json!({"username": user, "password": password})),
    )
    .await;
    assert_eq!(status, 200, "login {user}: {body}");
    body["token"].as_str().unwrap().to_owned()
}

/// Adds a user with the CLI and logs them in.
async fn add_user(cluster: &Cluster, name: &str, role: &str, extra: &[&str]) -> String {
    let password = cluster.add_user(name, role, extra);
    login(cluster, name, &password).await
}

/// The path of an operation with its parameters filled in. Ids name
/// nothing (so allowed callers get 404 or 422, never a change), except
/// where noted.
fn concrete(path: &str) -> String {
    path.replace("{id}", "0123456789abcdef0123")
        .replace("{name}", "nosuch")
        .replace("{version}", "latest")
}

#[tokio::test]
async fn every_route_has_a_rule_and_every_role_gets_its_status() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        cluster.apply_actions(CATALOG);
        let web = cluster.enroll_agent(&["--label", "team=web"]).await;
        let db = cluster.enroll_agent(&["--label", "team=db"]).await;
        cluster.wait_online(&web.id).await;
        cluster.wait_online(&db.id).await;

        let viewer = add_user(&cluster, "vera", "viewer", &[]).await;
        let operator = add_user(&cluster, "otto", "operator", &[]).await;
        let scoped = add_user(
            &cluster,
            "sam",
            "operator",
            &["--scope-target", "team=web", "--scope-action", "web-*"],
        )
        .await;

        // The document and the table name the same operations.
        let (status, doc) = call(&cluster, "GET", "/api/v1/openapi.json", None, None).await;
        assert_eq!(status, 200);
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in ["get", "put", "post", "delete", "patch"] {
                if item.get(method).is_some() {
                    documented.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        let ruled: BTreeSet<(String, String)> = RULES
            .iter()
            .map(|(m, p, _)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        let unruled: Vec<_> = documented.difference(&ruled).collect();
        assert!(
            unruled.is_empty(),
            "routes without a rule in RULES (add one): {unruled:?}"
        );
        let gone: Vec<_> = ruled.difference(&documented).collect();
        assert!(
            gone.is_empty(),
            "rules for routes no longer documented: {gone:?}"
        );

        let callers = [
            Caller {
                name: "nobody",
                token: None,
                rank: None,
            },
            Caller {
                name: "viewer",
                token: Some(viewer.clone()),
                rank: Some(0),
            },
            Caller {
                name: "operator",
                token: Some(operator.clone()),
                rank: Some(1),
            },
            Caller {
                name: "scoped operator",
                token: Some(scoped.clone()),
                rank: Some(1),
            },
            Caller {
                name: "admin",
                token: Some(cluster.admin_token.clone()),
                rank: Some(2),
            },
        ];
        for (method, path, rule) in RULES {
            if *rule == Rule::OwnSession {
                // Ending a session: nobody is refused, a viewer's own
                // session ends and is refused from then on.
                let (status, _) = call(&cluster, method, path, None, None).await;
                assert_eq!(status, 401, "{method} {path} as nobody");
                let own = login(&cluster, "vera", "vera-password-long").await;
                let (status, answer) = call(&cluster, method, path, Some(&own), None).await;
                assert_eq!(status, 200, "{method} {path} as viewer: {answer}");
                let (status, _) = call(&cluster, method, path, Some(&own), None).await;
                assert_eq!(status, 401, "{method} {path} twice");
                continue;
            }
            let url = concrete(path);
            // An empty object for operations that take a body: enough to
            // reach the role check, never a valid change.
            let body = matches!(*method, "POST" | "PUT" | "PATCH").then(|| json!({}));
            for caller in &callers {
                let (status, answer) = call(
                    &cluster,
                    method,
                    &url,
                    caller.token.as_deref(),
                    body.clone(),
                )
                .await;
                let allowed = match (rule, caller.rank) {
                    (Rule::Public, _) => true,
                    (_, None) => false,
                    (Rule::Agent, Some(_)) => false,
                    (Rule::Viewer | Rule::Owner | Rule::OwnSession, Some(_)) => true,
                    (Rule::Operator, Some(r)) => r >= 1,
                    (Rule::Admin | Rule::SelfOrAdmin, Some(r)) => r >= 2,
                };
                let what = format!("{method} {url} as {}: {status} {answer}", caller.name);
                if allowed {
                    assert!(status != 401 && status != 403, "should be allowed: {what}");
                } else if caller.rank.is_none() || *rule == Rule::Agent {
                    assert_eq!(status, 401, "should need a user's token: {what}");
                } else {
                    assert_eq!(status, 403, "should be forbidden: {what}");
                    assert_eq!(answer["error"]["code"], "forbidden", "{what}");
                }
            }
        }
        // The admin's empty-bodied fleet stop above stopped the fleet.
        let (status, _) = call(
            &cluster,
            "POST",
            "/api/v1/fleet/resume",
            Some(&cluster.admin_token),
            None,
        )
        .await;
        assert!(status < 500);

        // A scoped operator outside its scope: another team's agent, an
        // action outside its globs, someone else's run; inside it, allowed.
        let job = |action: &str, target: &str| json!({"action": action, "target": target});
        let forbidden = [
            (
                "POST",
                "/api/v1/jobs".to_owned(),
                Some(job("web-echo", &db.id)),
            ),
            (
                "POST",
                "/api/v1/jobs".to_owned(),
                Some(job("web-echo", "*")),
            ),
            (
                "POST",
                "/api/v1/jobs".to_owned(),
                Some(job("db-echo", &web.id)),
            ),
            (
                "POST",
                format!("/api/v1/agents/{}/drain", db.id),
                Some(json!({})),
            ),
            (
                "POST",
                format!("/api/v1/agents/{}/stop", db.id),
                Some(json!({})),
            ),
            ("POST", format!("/api/v1/agents/{}/resume", db.id), None),
        ];
        for (method, path, body) in forbidden {
            let (status, answer) = call(&cluster, method, &path, Some(&scoped), body.clone()).await;
            assert_eq!(status, 403, "{method} {path} {body:?} as scoped: {answer}");
            assert!(
                answer["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("outside your scope"),
                "{answer}"
            );
            // The unscoped operator may.
            if path.contains("/jobs") {
                let (status, answer) = call(&cluster, method, &path, Some(&operator), body).await;
                assert_eq!(status, 201, "{answer}");
            }
        }
        let (status, answer) = call(
            &cluster,
            "POST",
            "/api/v1/jobs",
            Some(&scoped),
            Some(job("web-echo", "team=web")),
        )
        .await;
        assert_eq!(status, 201, "inside its scope: {answer}");
        let (status, _) = call(
            &cluster,
            "POST",
            &format!("/api/v1/agents/{}/drain", web.id),
            Some(&scoped),
            Some(json!({})),
        )
        .await;
        assert_eq!(status, 200, "its own agent");
        call(
            &cluster,
            "POST",
            &format!("/api/v1/agents/{}/resume", web.id),
            Some(&scoped),
            None,
        )
        .await;

        // Cancelling: a job on another team's agent is out of reach; its own is not.
        let (_, other) = call(
            &cluster,
            "POST",
            "/api/v1/jobs",
            Some(&cluster.admin_token),
            Some(job("db-echo", &db.id)),
        )
        .await;
        let (status, answer) = call(
            &cluster,
            "POST",
            &format!("/api/v1/jobs/{}/cancel", other["id"].as_str().unwrap()),
            Some(&scoped),
            None,
        )
        .await;
        assert_eq!(status, 403, "{answer}");
        let (_, own) = call(
            &cluster,
            "POST",
            "/api/v1/jobs",
            Some(&scoped),
            Some(job("web-sleep", &web.id)),
        )
        .await;
        let (status, answer) = call(
            &cluster,
            "POST",
            &format!("/api/v1/jobs/{}/cancel", own["id"].as_str().unwrap()),
            Some(&scoped),
            None,
        )
        .await;
        assert_eq!(status, 200, "{answer}");

        // Workflows: a task outside the globs is refused at submission;
        // another user's run cannot be cancelled.
        let def = |action: &str| {
            json!({"definition": format!(
                "name: wf\ntasks:\n  - id: a\n    action: {action}\n    target: \"team=web\"\n"
            )})
        };
        let (status, answer) = call(
            &cluster,
            "POST",
            "/api/v1/workflows/runs",
            Some(&scoped),
            Some(def("db-echo")),
        )
        .await;
        assert_eq!(status, 403, "{answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("task 'a'"),
            "{answer}"
        );
        let (status, run) = call(
            &cluster,
            "POST",
            "/api/v1/workflows/runs",
            Some(&operator),
            Some(def("web-sleep")),
        )
        .await;
        assert_eq!(status, 201, "{run}");
        let run_id = run["id"].as_str().unwrap();
        let (status, answer) = call(
            &cluster,
            "POST",
            &format!("/api/v1/workflows/runs/{run_id}/cancel"),
            Some(&scoped),
            None,
        )
        .await;
        assert_eq!(status, 403, "{answer}");
        let (status, _) = call(
            &cluster,
            "POST",
            &format!("/api/v1/workflows/runs/{run_id}/cancel"),
            Some(&operator),
            None,
        )
        .await;
        assert_eq!(status, 200);

        // Someone else's token cannot be revoked without admin.
        let tokens = call(
            &cluster,
            "GET",
            "/api/v1/tokens?all=true",
            Some(&cluster.admin_token),
            None,
        )
        .await
        .1;
        let admins = tokens
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["username"] == "admin" && t["kind"] == "session")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (status, _) = call(
            &cluster,
            "POST",
            &format!("/api/v1/tokens/{admins}/revoke"),
            Some(&viewer),
            None,
        )
        .await;
        assert_eq!(status, 403);
        let (status, _) = call(
            &cluster,
            "GET",
            "/api/v1/tokens?all=true",
            Some(&viewer),
            None,
        )
        .await;
        assert_eq!(status, 403);
        // A user may read themselves.
        let (status, me) = call(&cluster, "GET", "/api/v1/users/vera", Some(&viewer), None).await;
        assert_eq!((status, me["role"].as_str()), (200, Some("viewer")));
        drop((web, db));
    }
}

/// Role changes, disabling, token roles and scopes, revocation and expiry
/// count from the next request; the last admin cannot be removed.
#[tokio::test]
async fn changes_count_from_the_next_request() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        cluster.apply_actions(CATALOG);
        let web = cluster.enroll_agent(&["--label", "team=web"]).await;
        cluster.wait_online(&web.id).await;
        let job = json!({"action": "web-echo", "target": web.id});
        let ola = add_user(&cluster, "ola", "viewer", &[]).await;

        // A viewer cannot start a job; promoted, the same session can.
        let (status, answer) = call(
            &cluster,
            "POST",
            "/api/v1/jobs",
            Some(&ola),
            Some(job.clone()),
        )
        .await;
        assert_eq!(status, 403, "{answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("needs operator"),
            "{answer}"
        );
        cluster.cli_ok(&["users", "role", "ola", "operator"]);
        let (status, answer) = call(
            &cluster,
            "POST",
            "/api/v1/jobs",
            Some(&ola),
            Some(job.clone()),
        )
        .await;
        assert_eq!(status, 201, "{answer}");

        // An API token with a lower role acts with it; one above its
        // creator's is refused, and so is a bootstrap token.
        let (status, viewer_token) = call(
            &cluster,
            "POST",
            "/api/v1/tokens",
            Some(&ola),
            Some(json!({"kind": "api", "role": "viewer", "name": "ci"})),
        )
        .await;
        assert_eq!(status, 201, "{viewer_token}");
        let expires: chrono::DateTime<chrono::Utc> =
            serde_json::from_value(viewer_token["expires_at"].clone()).unwrap();
        let days = (expires - chrono::Utc::now()).num_days();
        assert!(
            (89..=90).contains(&days),
            "API tokens expire in 90 days by default: {days}"
        );
        let vt = viewer_token["token"].as_str().unwrap().to_owned();
        let (status, _) = call(
            &cluster,
            "POST",
            "/api/v1/jobs",
            Some(&vt),
            Some(job.clone()),
        )
        .await;
        assert_eq!(status, 403);
        let (status, _) = call(&cluster, "GET", "/api/v1/jobs", Some(&vt), None).await;
        assert_eq!(status, 200);
        for body in [
            json!({"kind": "api", "role": "admin"}),
            json!({"kind": "bootstrap"}),
        ] {
            let (status, answer) =
                call(&cluster, "POST", "/api/v1/tokens", Some(&ola), Some(body)).await;
            assert_eq!(status, 403, "{answer}");
        }
        let (status, answer) = call(
            &cluster,
            "POST",
            "/api/v1/tokens",
            Some(&cluster.admin_token),
            Some(json!({"kind": "bootstrap", "ttl_secs": 31 * 24 * 3600})),
        )
        .await;
        assert_eq!(
            status, 422,
            "bootstrap tokens live at most 30 days: {answer}"
        );
        // A token scoped narrower than its user stays inside its scope.
        let (_, scoped_token) = call(
            &cluster,
            "POST",
            "/api/v1/tokens",
            Some(&ola),
            Some(json!({"kind": "api", "scope": {"actions": ["db-*"]}})),
        )
        .await;
        let st = scoped_token["token"].as_str().unwrap();
        let (status, answer) = call(
            &cluster,
            "POST",
            "/api/v1/jobs",
            Some(st),
            Some(job.clone()),
        )
        .await;
        assert_eq!(status, 403, "{answer}");

        // token list shows them (never the secret); revoke counts at once.
        let listed: Vec<Value> =
            serde_json::from_str(&cluster.cli_ok(&["token", "list", "--all", "-o", "json"]))
                .unwrap();
        let ci = listed.iter().find(|t| t["name"] == "ci").unwrap();
        assert_eq!(ci["role"], "viewer");
        assert_eq!(ci["state"], "active");
        assert!(!listed.iter().any(|t| t.to_string().contains(&vt)));
        cluster.cli_ok(&["token", "revoke", ci["id"].as_str().unwrap()]);
        let (status, answer) = call(&cluster, "GET", "/api/v1/jobs", Some(&vt), None).await;
        assert_eq!(status, 401, "{answer}");
        assert!(answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("revoked"));
        let out = cluster.cli(&["token", "revoke", ci["id"].as_str().unwrap()]);
        assert!(!out.status.success(), "revoking twice is an error");

        // A revoked bootstrap token enrolls nothing.
        let bt = cluster.bootstrap_token(&[]);
        let listed: Vec<Value> =
            serde_json::from_str(&cluster.cli_ok(&["token", "list", "-o", "json"])).unwrap();
        let b = listed
            .iter()
            .find(|t| t["kind"] == "bootstrap" && t["state"] == "active")
            .unwrap();
        cluster.cli_ok(&["token", "revoke", b["id"].as_str().unwrap()]);
        let agent = AgentProc::new(&cluster.url);
        let out = agent.command(&["enroll", "--token", &bt]).output().unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("revoked"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // Disabled: every token refused at once, no login; enabled again, back.
        cluster.cli_ok(&["users", "disable", "ola"]);
        let (status, answer) = call(&cluster, "GET", "/api/v1/jobs", Some(&ola), None).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (403, Some("user_disabled"))
        );
        let (status, _) = call(
            &cluster,
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"username": "ola", "password": "ola-password-long"})),
        )
        .await;
        assert_eq!(status, 403);
        cluster.cli_ok(&["users", "enable", "ola"]);
        let (status, _) = call(&cluster, "GET", "/api/v1/jobs", Some(&ola), None).await;
        assert_eq!(status, 200);

        // Own password: needs the current one; other sessions end.
        let second = login(&cluster, "ola", "ola-password-long").await;
        let (status, _) = call(
            &cluster,
            "POST",
            "/api/v1/users/ola/password",
            Some(&ola),
            Some(json!({"password": "a-new-password-1"})),
        )
        .await;
        assert_eq!(status, 403);
        let (status, changed) = call(
            &cluster,
            "POST",
            "/api/v1/users/ola/password",
            Some(&ola),
            Some(json!({"password": "a-new-password-1", "current_password": "ola-password-long"})),
        )
        .await;
        assert_eq!(
            (status, changed["sessions_ended"].as_u64()),
            (200, Some(1)),
            "{changed}"
        );
        assert_eq!(
            call(&cluster, "GET", "/api/v1/jobs", Some(&second), None)
                .await
                .0,
            401
        );
        assert_eq!(
            call(&cluster, "GET", "/api/v1/jobs", Some(&ola), None)
                .await
                .0,
            200
        );
        login(&cluster, "ola", "a-new-password-1").await;
        let (status, _) = call(
            &cluster,
            "POST",
            "/api/v1/users/ola/password",
            Some(&ola),
            Some(json!({"password": "short", "current_password": "a-new-password-1"})),
        )
        .await;
        assert_eq!(status, 422);

        // The last admin keeps its role.
        let out = cluster.cli(&["users", "role", "admin", "viewer"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("last enabled admin"));
        let out = cluster.cli(&["users", "disable", "admin"]);
        assert!(!out.status.success());
        // A scope on an admin or viewer makes no sense and is refused.
        let out = cluster.cli(&[
            "users",
            "role",
            "ola",
            "viewer",
            "--scope-target",
            "team=web",
        ]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("only an operator has a scope"));
        // Bad names and duplicates are refused with the reason.
        let out = cluster.cli(&["users", "add", "bad name", "--role", "viewer"]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("username"));
        let out = cluster.cli(&["users", "add", "ola", "--role", "viewer"]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("exists already"));
        // A generated password is printed once and works.
        let out = cluster.cli(&["users", "add", "gen", "--role", "viewer"]);
        assert!(out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        let password = err
            .lines()
            .find_map(|l| l.strip_prefix("password (shown once): "))
            .unwrap();
        login(&cluster, "gen", password).await;
        let users: Vec<Value> =
            serde_json::from_str(&cluster.cli_ok(&["users", "list", "-o", "json"])).unwrap();
        let names: Vec<&str> = users
            .iter()
            .map(|u| u["username"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["admin", "gen", "ola"]);
        assert!(
            !users.iter().any(|u| u.to_string().contains("argon2")),
            "no hash is shown"
        );
        drop(web);
    }
}
