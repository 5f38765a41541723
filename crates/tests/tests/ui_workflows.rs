//! The dashboard's workflow pages (`/ui/workflows`) in a real headless
//! Chromium: a DAG run on a real agent watched live (task nodes change
//! state over the page's event stream, without a reload), a click on a
//! node leading to the task's output, an XSS payload in a task's output
//! shown as text, an artifact downloaded with the session cookie, a
//! viewer without the cancel form whose forged cancel is refused, an
//! operator who cancels a long run from the page. Plus, over plain HTTP on
//! every store backend: the runs list paged and filtered on the server,
//! unknown runs and tasks as 404 pages, the page's event stream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use drover_proto::workflows::{Run, RunState};
use drover_tests::*;
use fantoccini::Locator;
use serde_json::json;

const XSS: &str = "<script>alert(1)</script>";

const CATALOG: &str = r#"
actions:
  - name: nap
    description: Sleeps, then says something
    argv: ["/bin/sh", "-c", 'sleep "$1"; echo "$2"', "sh", "{{seconds}}", "{{message}}"]
    params:
      seconds: {type: string, pattern: "[0-9]+(\\.[0-9]+)?"}
      message: {type: string, max_length: 500}
  - name: write-file
    argv: ["/bin/sh", "-c", 'mkdir -p "$(dirname "$1")" && printf "%s\n" "$2" > "$1"', "sh", "{{path}}", "{{content}}"]
    params:
      path: {type: string, pattern: "[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*"}
      content: {type: string, max_length: 10000}
  - name: sleep
    argv: ["/bin/sleep", "{{seconds}}"]
    params:
      seconds: {type: string, pattern: "[0-9]+(\\.[0-9]+)?"}
    timeout: 120s
    kill_grace: 1s
"#;

/// Six tasks: one, fanning out to three, fanning in to one, then one.
const FAN: &str = r#"
name: fan-out-in
description: Prepare, build three ways, merge, report
defaults: {target: 'role=ci', timeout: 60s}
tasks:
  - {id: prepare, action: nap, params: {seconds: '1.5', message: prepared}}
  - {id: build-a, action: nap, needs: [prepare], params: {seconds: '1.5', message: built a}}
  - {id: build-b, action: nap, needs: [prepare], params: {seconds: '2', message: built b}}
  - {id: build-c, action: nap, needs: [prepare], params: {seconds: '1', message: '<script>alert(1)</script>'}}
  - id: merge
    action: write-file
    needs: [build-a, build-b, build-c]
    params: {path: out/summary.txt, content: merged three builds}
    artifacts: [out]
  - {id: report, action: nap, needs: [merge], params: {seconds: '1', message: reported}}
"#;

const LONG: &str = "name: long\ndefaults: {target: 'role=ci'}\ntasks:\n  - {id: soak, action: sleep, params: {seconds: '60'}}\n  - {id: after, action: nap, needs: [soak], params: {seconds: '0', message: never}}\n";

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn submit(cluster: &Cluster, yaml: &str) -> Run {
    let resp = cluster
        .http
        .post(format!("{}/api/v1/workflows/runs", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .json(&json!({"definition": yaml}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status.as_u16(), 201, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn run_state(cluster: &Cluster, id: &str) -> RunState {
    let run: Run = cluster
        .http
        .get(format!("{}/api/v1/workflows/runs/{id}", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    run.state
}

async fn wait_state(cluster: &Cluster, id: &str, want: RunState) {
    wait_for(
        &format!("run {id} {}", want.as_str()),
        Duration::from_secs(60),
        || async { (run_state(cluster, id).await == want).then_some(()) },
    )
    .await;
}

/// An attribute of the first element `css` selects.
async fn attr(b: &Browser, css: &str, name: &str) -> Option<String> {
    b.client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .attr(name)
        .await
        .unwrap()
}

/// The CSRF field of the page shown (the logout form has one on every
/// page).
async fn csrf_of_page(b: &Browser) -> String {
    attr(b, ".who input[name=csrf]", "value").await.unwrap()
}

#[tokio::test]
async fn a_run_watched_live_in_a_real_browser() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    let url = cluster.url.clone();
    cluster.apply_actions(CATALOG);
    let agent = cluster.enroll_agent(&["--label", "role=ci"]).await;
    cluster.wait_online(&agent.id).await;
    let viewer_password = cluster.add_user("vera", "viewer", &[]);
    let operator_password = cluster.add_user("olga", "operator", &[]);

    let b = Browser::start("workflows").await;
    b.login(&url, "admin", ADMIN_PASSWORD).await;
    assert!(
        b.text("nav[aria-label=Main]").await.contains("Workflows"),
        "the navigation leads to the runs"
    );

    // The run starts; its page opens while it runs.
    let run = submit(&cluster, FAN).await;
    let page = format!("/ui/workflows/runs/{}", run.id);
    b.goto(&format!("{url}{page}")).await;
    assert_eq!(b.count("svg.task-graph g.task").await, 6);
    assert_eq!(b.count("[data-live-run]").await, 1);
    let first = attr(&b, "#task-report", "data-state").await.unwrap();
    assert!(
        ["pending", "queued", "dispatched", "running"].contains(&first.as_str()),
        "report has not ended yet: {first}"
    );
    // Marks this page: a reload would lose the mark.
    b.client
        .execute("window.droverMark = 'same page';", vec![])
        .await
        .unwrap();
    // A fan-out task is seen waiting or running, then done, live.
    let seen_busy = wait_for("build-b busy", Duration::from_secs(20), || async {
        let s = attr(&b, "#task-build-b", "data-state").await.unwrap();
        ["queued", "dispatched", "running"]
            .contains(&s.as_str())
            .then_some(s)
    })
    .await;
    b.screenshot("run-graph-running").await;
    let (done, _) = wait_for("every task succeeded", Duration::from_secs(60), || async {
        let done = b.count("g.task[data-state=succeeded]").await;
        let badge = b.text("#run-state").await;
        (done == 6 && badge.contains("succeeded")).then_some((done, badge))
    })
    .await;
    assert_eq!(done, 6, "after {seen_busy}");
    let mark = b
        .client
        .execute("return window.droverMark || null;", vec![])
        .await
        .unwrap();
    assert_eq!(mark, json!("same page"), "the page was not reloaded");
    // The node follows graph.rs's contract, and so does the table.
    assert_eq!(
        attr(&b, "#task-build-b", "class").await.as_deref(),
        Some("task state-succeeded")
    );
    assert_eq!(b.text("#task-build-b text.state").await, "succeeded");
    assert_eq!(b.text("#task-build-b text.glyph").await, "✓");
    assert_eq!(
        b.count("#tasks td.state .badge[data-state=succeeded]")
            .await,
        6
    );
    for row in b
        .client
        .find_all(Locator::Css("#tasks tbody tr"))
        .await
        .unwrap()
    {
        let text = row.text().await.unwrap();
        assert!(
            !text.contains('—'),
            "job, start and end filled in live: {text}"
        );
    }
    assert_eq!(b.count("[data-live-run]").await, 0, "the stream is closed");
    assert_eq!(run_state(&cluster, &run.id).await, RunState::Succeeded);
    b.no_dialog().await;
    b.screenshot("run-graph-succeeded").await;

    // The XSS payload in build-c's output: its node leads to its page,
    // where the output is text.
    let task_page = format!("{page}/tasks/build-c");
    b.click_to("svg.task-graph a[href$='/tasks/build-c']", &task_page)
        .await;
    assert!(b.text("#task-state").await.contains("succeeded"));
    assert_eq!(b.text("#output").await.trim(), XSS);
    assert_eq!(b.count("main script").await, 0);
    b.no_dialog().await;
    b.screenshot("task").await;
    // The merge task's artifact downloads with the session cookie.
    b.goto(&format!("{url}{page}/tasks/merge")).await;
    let href = attr(&b, "#artifacts a", "href").await.unwrap();
    assert!(href.starts_with("/ui/artifacts/"), "{href}");
    let cookie = b.session_cookie().await;
    let file = no_redirects()
        .get(format!("{url}{href}"))
        .header("Cookie", format!("drover_session={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(file.status(), 200);
    assert_eq!(file.text().await.unwrap(), "merged three builds\n");
    let anonymous = no_redirects()
        .get(format!("{url}{href}"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 303, "no session, no file");

    // The list of runs.
    b.goto(&format!("{url}/ui/workflows")).await;
    assert_eq!(b.count("#runs tbody tr").await, 1);
    assert!(b.text("#runs tbody tr").await.contains("6 / 6"));
    b.screenshot("runs").await;
    b.click_to(".who button", "/ui/login").await;

    // A viewer sees a long run without the cancel form; a forged cancel
    // with the viewer's own CSRF token is refused.
    let long = submit(&cluster, LONG).await;
    let long_page = format!("/ui/workflows/runs/{}", long.id);
    b.login(&url, "vera", &viewer_password).await;
    b.goto(&format!("{url}{long_page}")).await;
    assert!(b.text("#run-state").await.contains("running"));
    assert_eq!(b.count("#cancel").await, 0);
    let viewer_cookie = b.session_cookie().await;
    let viewer_csrf = csrf_of_page(&b).await;
    let cancel = format!("{url}{long_page}/cancel");
    assert_eq!(
        post_ui_form(
            &cancel,
            &viewer_cookie,
            &[("csrf", &viewer_csrf), ("reason", "x")]
        )
        .await,
        403
    );
    assert_eq!(run_state(&cluster, &long.id).await, RunState::Running);
    b.click_to(".who button", "/ui/login").await;

    // An operator cancels it from the page.
    b.login(&url, "olga", &operator_password).await;
    b.goto(&format!("{url}{long_page}")).await;
    wait_for("soak running", Duration::from_secs(20), || async {
        let s = attr(&b, "#task-soak", "data-state").await.unwrap();
        (s != "pending").then_some(())
    })
    .await;
    b.client
        .find(Locator::Css("#cancel-reason"))
        .await
        .unwrap()
        .send_keys("not needed")
        .await
        .unwrap();
    b.client
        .find(Locator::Css("button.cancel-run"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for("the run cancelled", Duration::from_secs(30), || async {
        b.wait_text("#run-state")
            .await
            .contains("cancelled")
            .then_some(())
    })
    .await;
    assert_eq!(b.path().await, long_page);
    wait_for("the reason of the end", Duration::from_secs(10), || async {
        let why = b.text("#run-reason").await;
        (!why.contains("cancelling")).then_some(())
    })
    .await;
    assert_eq!(run_state(&cluster, &long.id).await, RunState::Cancelled);
    wait_for(
        "the cancel form hidden",
        Duration::from_secs(10),
        || async {
            let shown = b
                .client
                .find(Locator::Css("#cancel"))
                .await
                .ok()?
                .is_displayed()
                .await
                .ok()?;
            (!shown).then_some(())
        },
    )
    .await;
    b.screenshot("run-cancelled").await;
    // Audited like the API's cancel, the refused one too.
    let audit: Vec<serde_json::Value> =
        cluster.cli_json(&["audit", "list", "--action", "/ui/workflows"]);
    let ok: Vec<_> = audit.iter().filter(|e| e["outcome"] == "ok").collect();
    assert_eq!(ok.len(), 1, "{audit:?}");
    assert_eq!(ok[0]["action"], "run.cancel", "{audit:?}");
    assert_eq!(ok[0]["actor"], "olga", "{audit:?}");
    assert_eq!(ok[0]["target"], format!("run:{}", long.id), "{audit:?}");
    assert!(
        audit
            .iter()
            .any(|e| e["actor"] == "vera" && e["outcome"] == "refused"),
        "{audit:?}"
    );
    b.no_dialog().await;
}

/// Logs in through the form over HTTP; the session cookie.
async fn cookie_of(url: &str, user: &str, password: &str) -> String {
    let resp = no_redirects()
        .post(format!("{url}/ui/login"))
        .form(&[("username", user), ("password", password)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303, "{user}");
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    set.split(';')
        .next()
        .unwrap()
        .trim_start_matches("drover_session=")
        .to_owned()
}

async fn get_page(url: &str, cookie: &str) -> (u16, String) {
    let resp = no_redirects()
        .get(url)
        .header("Cookie", format!("drover_session={cookie}"))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn runs_list_paged_and_filtered_on_each_backend() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        let url = cluster.url.clone();
        cluster.apply_actions(CATALOG);
        let agent = cluster.enroll_agent(&["--label", "role=ci"]).await;
        cluster.wait_online(&agent.id).await;
        // alpha runs sleep on the agent; beta runs select no agent and end.
        let one = |name: &str| {
            let target = if name == "alpha" {
                "role=ci"
            } else {
                "role=nowhere"
            };
            format!(
                "name: {name}\ndefaults: {{target: '{target}'}}\ntasks:\n  - {{id: a, action: sleep, params: {{seconds: '60'}}}}\n"
            )
        };
        let mut ids = Vec::new();
        for name in ["alpha", "beta", "alpha", "beta", "alpha"] {
            ids.push(submit(&cluster, &one(name)).await.id);
        }
        let resp = cluster
            .http
            .post(format!("{url}/api/v1/workflows/runs/{}/cancel", ids[0]))
            .bearer_auth(&cluster.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{backend:?}");
        wait_state(&cluster, &ids[0], RunState::Cancelled).await;
        for beta in [&ids[1], &ids[3]] {
            wait_for("beta ended", Duration::from_secs(30), || async {
                (run_state(&cluster, beta).await != RunState::Running).then_some(())
            })
            .await;
        }
        let beta_state = run_state(&cluster, &ids[1]).await;
        let cookie = cookie_of(&url, "admin", ADMIN_PASSWORD).await;
        let rows = |html: &str| html.matches("<tr data-run=").count();

        let (code, html) = get_page(&format!("{url}/ui/workflows"), &cookie).await;
        assert_eq!(code, 200, "{backend:?}");
        assert_eq!(rows(&html), 5, "{backend:?}");
        // Newest first.
        let first = html.find(&ids[4]).unwrap();
        let last = html.find(&format!("data-run=\"{}\"", ids[0])).unwrap();
        assert!(first < last, "{backend:?}");
        assert!(html.contains("0 / 1"), "{backend:?}: tasks done / total");
        assert!(html.contains("1 / 1"), "{backend:?}: tasks done / total");

        let (_, html) = get_page(&format!("{url}/ui/workflows?limit=2&page=2"), &cookie).await;
        assert_eq!(rows(&html), 2, "{backend:?}");
        assert!(html.contains("3–4 of 5"), "{backend:?}: {html}");
        assert!(
            html.contains(&format!("data-run=\"{}\"", ids[2])),
            "{backend:?}"
        );
        assert!(html.contains("rel=\"next\""), "{backend:?}");
        // Past the end: the last page.
        let (_, html) = get_page(&format!("{url}/ui/workflows?limit=2&page=9"), &cookie).await;
        assert_eq!(rows(&html), 1, "{backend:?}");
        assert!(html.contains("5–5 of 5"), "{backend:?}");

        let (_, html) = get_page(&format!("{url}/ui/workflows?workflow=beta"), &cookie).await;
        assert_eq!(rows(&html), 2, "{backend:?}");
        assert!(html.contains("1–2 of 2"), "{backend:?}");
        let (_, html) = get_page(
            &format!("{url}/ui/workflows?workflow=alpha&state=running&limit=1"),
            &cookie,
        )
        .await;
        assert_eq!(rows(&html), 1, "{backend:?}");
        assert!(html.contains("1–1 of 2"), "{backend:?}");
        // The next page keeps the filters.
        assert!(
            html.contains("state=running&amp;workflow=alpha&amp;page=2"),
            "{backend:?}: {html}"
        );
        let (_, html) = get_page(&format!("{url}/ui/workflows?state=cancelled"), &cookie).await;
        assert_eq!(rows(&html), 1, "{backend:?}");
        assert!(
            html.contains(&format!("data-run=\"{}\"", ids[0])),
            "{backend:?}"
        );
        let (_, html) = get_page(
            &format!("{url}/ui/workflows?state={}", beta_state.as_str()),
            &cookie,
        )
        .await;
        assert_eq!(rows(&html), 2, "{backend:?}: {beta_state:?}");

        // One run, by a unique prefix; its task page.
        let (code, html) = get_page(
            &format!("{url}/ui/workflows/runs/{}", &ids[2][..30]),
            &cookie,
        )
        .await;
        assert_eq!(code, 200, "{backend:?}");
        assert!(html.contains("data-live-run"), "{backend:?}");
        assert!(
            html.contains("id=\"cancel\""),
            "{backend:?}: admin may cancel"
        );
        let (code, html) = get_page(
            &format!("{url}/ui/workflows/runs/{}/tasks/a", ids[2]),
            &cookie,
        )
        .await;
        assert_eq!(code, 200, "{backend:?}");
        assert!(html.contains("id=\"task-state\""), "{backend:?}");
        // An ended run's page does not follow it, and has no cancel form.
        let (_, html) = get_page(&format!("{url}/ui/workflows/runs/{}", ids[0]), &cookie).await;
        assert!(!html.contains("data-live-run"), "{backend:?}");
        assert!(!html.contains("id=\"cancel\""), "{backend:?}");

        // Unknown ones are 404 pages.
        for missing in [
            format!("{url}/ui/workflows/runs/nope"),
            format!("{url}/ui/workflows/runs/{}/tasks/nope", ids[2]),
        ] {
            let resp = no_redirects()
                .get(&missing)
                .header("Cookie", format!("drover_session={cookie}"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 404, "{backend:?}: {missing}");
            assert!(resp.headers().contains_key("content-security-policy"));
            assert!(resp
                .text()
                .await
                .unwrap()
                .contains("<h1>404 Not Found</h1>"));
        }

        // The page's event stream: the cookie, not a token; it replays
        // an ended run's events and ends; Last-Event-ID resumes.
        let events = format!("{url}/ui/workflows/runs/{}/events", ids[0]);
        let anonymous = no_redirects().get(&events).send().await.unwrap();
        assert_eq!(anonymous.status(), 303, "{backend:?}");
        let resp = no_redirects()
            .get(&events)
            .header("Cookie", format!("drover_session={cookie}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{backend:?}");
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let body = tokio::time::timeout(Duration::from_secs(20), resp.text())
            .await
            .expect("the stream ends with the run")
            .unwrap();
        assert!(body.contains("event: run"), "{backend:?}: {body}");
        assert!(
            body.contains("\"state\":\"cancelled\""),
            "{backend:?}: {body}"
        );
        let ids_seen: Vec<i64> = body
            .lines()
            .filter_map(|l| l.strip_prefix("id:"))
            .map(|v| v.trim().parse().unwrap())
            .collect();
        let last = *ids_seen.last().unwrap();
        let resumed = no_redirects()
            .get(&events)
            .header("Cookie", format!("drover_session={cookie}"))
            .header("Last-Event-ID", (last - 1).to_string())
            .send()
            .await
            .unwrap();
        let body = tokio::time::timeout(Duration::from_secs(20), resumed.text())
            .await
            .unwrap()
            .unwrap();
        let again: Vec<i64> = body
            .lines()
            .filter_map(|l| l.strip_prefix("id:"))
            .map(|v| v.trim().parse().unwrap())
            .collect();
        assert_eq!(again, [last], "{backend:?}: {body}");
    }
}
