//! The dashboard's jobs pages (`/ui/jobs`) in a real headless Chromium:
//! an operator starts a job from the typed form and watches its output
//! arrive live, without a reload; output holding markup shows as text; a
//! viewer gets no start or cancel controls and forged POSTs are refused;
//! an operator cancels a long job from its page. Screenshots under
//! target/ui-screenshots/ui-jobs/. Plus, over plain HTTP on every store
//! backend: the list's filters and pages, unknown jobs, the form's errors,
//! hostile parameters, the event stream, an agent's recent attempts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use drover_tests::*;
use fantoccini::Locator;
use serde_json::{json, Value};

const XSS: &str = "<script>alert(1)</script>";

const CATALOG: &str = r#"
actions:
  - name: count
    description: Print numbered lines, one a second
    argv: ["/bin/sh", "-c", "echo '<script>alert(1)</script>'; i=1; while [ $i -le \"$1\" ]; do echo \"line-$i\"; sleep 1; i=$((i+1)); done", "sh", "{{lines}}"]
    params:
      lines: {type: integer, min: 1, max: 100}
    timeout: 60s
  - name: echo
    description: Print a message
    argv: ["/bin/echo", "{{message}}"]
    params:
      message: {type: string, max_length: 200}
    timeout: 10s
  - name: sleep
    argv: ["/bin/sleep", "{{seconds}}"]
    params:
      seconds: {type: integer, min: 0, max: 600}
    timeout: 120s
    kill_grace: 2s
"#;

/// An HTTP client that shows redirects instead of following them.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Logs `user` in through the form over HTTP; returns the session cookie.
async fn cookie_of(url: &str, user: &str, password: &str) -> String {
    let resp = no_redirects()
        .post(format!("{url}/ui/login"))
        .form(&[("username", user), ("password", password)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303, "login of {user}");
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    set.split(';')
        .next()
        .unwrap()
        .trim_start_matches("drover_session=")
        .to_owned()
}

/// GET a dashboard page with a session cookie: status and body.
async fn get_page(url: &str, cookie: &str) -> (u16, String) {
    let resp = no_redirects()
        .get(url)
        .header("Cookie", format!("drover_session={cookie}"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// The CSRF token in a page's forms.
fn csrf_in(html: &str) -> String {
    html.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned()
}

/// A POST of a dashboard form: status, Location and body.
async fn post_form(url: &str, cookie: &str, fields: &[(&str, &str)]) -> (u16, String, String) {
    let resp = no_redirects()
        .post(url)
        .header("Cookie", format!("drover_session={cookie}"))
        .form(fields)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, location, resp.text().await.unwrap())
}

/// Submits a job through the API as the admin; returns its id.
async fn api_submit(cluster: &Cluster, action: &str, target: &str, params: Value) -> String {
    let (code, job) = post_json(
        &cluster.http,
        format!("{}/api/v1/jobs", cluster.url),
        Some(&cluster.admin_token),
        json!({"action": action, "target": target, "params": params}),
    )
    .await;
    assert_eq!(code, 201, "{job}");
    job["id"].as_str().unwrap().to_owned()
}

/// How many job rows a list page shows.
fn rows(html: &str) -> usize {
    html.matches("<tr data-job=").count()
}

#[tokio::test]
async fn jobs_in_a_real_browser() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    let url = cluster.url.clone();
    cluster.apply_actions(CATALOG);
    let agent = cluster.enroll_agent(&[]).await;
    cluster.wait_online(&agent.id).await;
    let operator_password = cluster.add_user("olga", "operator", &[]);
    let viewer_password = cluster.add_user("vera", "viewer", &[]);

    let b = Browser::start("ui-jobs").await;
    b.login(&url, "olga", &operator_password).await;
    // Jobs is in the navigation; the list offers to start one.
    b.click_to("nav[aria-label=Main] a[href='/ui/jobs']", "/ui/jobs")
        .await;
    assert_eq!(b.count("#start").await, 1);
    b.click_to("#start", "/ui/jobs/new").await;
    // First the action, from the catalog.
    let choose = b.client.form(Locator::Css("form.choose")).await.unwrap();
    choose.set_by_name("action", "count").await.unwrap();
    choose.submit().await.unwrap();
    wait_for("the count form", Duration::from_secs(10), || async {
        (b.count("form.start").await == 1).then_some(())
    })
    .await;
    assert_eq!(b.text("h1").await, "Start count");
    assert!(b
        .text("main")
        .await
        .contains("Print numbered lines, one a second"));
    // The integer parameter is a number input with its limits.
    let lines = b
        .client
        .find(Locator::Css("input[name='param.lines']"))
        .await
        .unwrap();
    assert_eq!(lines.attr("type").await.unwrap().as_deref(), Some("number"));
    assert_eq!(lines.attr("min").await.unwrap().as_deref(), Some("1"));
    assert_eq!(lines.attr("max").await.unwrap().as_deref(), Some("100"));
    assert!(b.text("#p-lines-help").await.contains("from 1 to 100"));
    lines.send_keys("5").await.unwrap();
    b.client
        .find(Locator::Css("#f-target"))
        .await
        .unwrap()
        .send_keys(&agent.id)
        .await
        .unwrap();
    b.screenshot("start-form").await;
    b.client
        .find(Locator::Css("#start-job"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let path = wait_for("the job's page", Duration::from_secs(10), || async {
        let p = b.path().await;
        (p.starts_with("/ui/jobs/") && p != "/ui/jobs/new").then_some(p)
    })
    .await;
    let job_id = path.trim_start_matches("/ui/jobs/").to_owned();
    // A mark in the page: it is still there at the end, so nothing
    // reloaded the page meanwhile.
    b.client
        .execute("window.droverMark = 'same page'; return 1;", vec![])
        .await
        .unwrap();
    let first = b.text("#log").await;
    assert!(!first.contains("line-5"), "too late already: {first}");
    let shown = wait_for("line-5 to appear live", Duration::from_secs(30), || async {
        let t = b.text("#log").await;
        t.contains("line-5").then_some(t)
    })
    .await;
    for i in 1..=5 {
        assert!(shown.contains(&format!("line-{i}")), "{shown}");
    }
    assert!(shown.contains(XSS), "the markup shows as text: {shown}");
    wait_for(
        "the badge to say succeeded",
        Duration::from_secs(20),
        || async {
            let s = b
                .client
                .find(Locator::Css("#job-state .badge"))
                .await
                .ok()?
                .attr("data-state")
                .await
                .ok()??;
            (s == "succeeded").then_some(())
        },
    )
    .await;
    assert!(b.text("#job-state").await.contains("succeeded"));
    assert!(b
        .text("tr[data-attempt] .attempt-state")
        .await
        .contains("succeeded"));
    let mark = b
        .client
        .execute("return window.droverMark || null;", vec![])
        .await
        .unwrap();
    assert_eq!(mark, json!("same page"), "the page was reloaded");
    assert_eq!(b.count("main script").await, 0);
    b.no_dialog().await;
    // Ended: no cancel form.
    assert_eq!(b.count("#cancel:not([hidden])").await, 0);
    b.screenshot("job-output").await;
    let job = cluster.job(&job_id);
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.created_by, "olga");

    // The list shows it, linked, with its state.
    b.goto(&format!("{url}/ui/jobs")).await;
    let row = format!("tr[data-job='{job_id}']");
    assert!(b.text(&row).await.contains("count"));
    assert!(b.text(&row).await.contains("succeeded"));
    b.screenshot("jobs-list").await;

    // A long job: the operator cancels it from its page.
    let long = api_submit(&cluster, "sleep", &agent.id, json!({"seconds": 300})).await;
    cluster.wait_running(&long).await;

    // A viewer: no start, no cancel; forged POSTs refused (403).
    b.click_to(".who button", "/ui/login").await;
    b.login(&url, "vera", &viewer_password).await;
    b.goto(&format!("{url}/ui/jobs")).await;
    assert_eq!(b.count("#start").await, 0);
    assert_eq!(b.count(&format!("tr[data-job='{long}']")).await, 1);
    b.goto(&format!("{url}/ui/jobs/{long}")).await;
    assert!(b.text("#job-state").await.contains("running"));
    assert_eq!(b.count("#cancel").await, 0);
    b.screenshot("job-as-viewer").await;
    let viewer_cookie = b.session_cookie().await;
    let viewer_csrf = b
        .client
        .find(Locator::Css("input[name=csrf]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap();
    let (status, _) = get_page(&format!("{url}/ui/jobs/new?action=echo"), &viewer_cookie).await;
    assert_eq!(status, 403, "the form, to a viewer");
    let start = [
        ("csrf", viewer_csrf.as_str()),
        ("action", "echo"),
        ("param.message", "hi"),
        ("target", agent.id.as_str()),
    ];
    let (status, _, _) = post_form(&format!("{url}/ui/jobs"), &viewer_cookie, &start).await;
    assert_eq!(status, 403, "a viewer's start");
    let cancel_url = format!("{url}/ui/jobs/{long}/cancel");
    let (status, _, _) = post_form(
        &cancel_url,
        &viewer_cookie,
        &[("csrf", &viewer_csrf), ("reason", "x")],
    )
    .await;
    assert_eq!(status, 403, "a viewer's cancel");
    assert_eq!(cluster.job(&long).state, JobState::Running);
    b.click_to(".who button", "/ui/login").await;

    // The operator: a POST without the CSRF field is refused too.
    b.login(&url, "olga", &operator_password).await;
    let operator_cookie = b.session_cookie().await;
    let (status, _, _) = post_form(&cancel_url, &operator_cookie, &[("reason", "no token")]).await;
    assert_eq!(status, 403);
    let (status, _, _) = post_form(&format!("{url}/ui/jobs"), &operator_cookie, &start[1..]).await;
    assert_eq!(status, 403);
    assert_eq!(cluster.job(&long).state, JobState::Running);
    b.goto(&format!("{url}/ui/jobs/{long}")).await;
    b.client
        .find(Locator::Css("#cancel-reason"))
        .await
        .unwrap()
        .send_keys("wrong host")
        .await
        .unwrap();
    b.client
        .find(Locator::Css("#cancel button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        "the badge to say cancelled",
        Duration::from_secs(20),
        || async {
            let s = b
                .client
                .find(Locator::Css("#job-state .badge"))
                .await
                .ok()?
                .attr("data-state")
                .await
                .ok()??;
            (s == "cancelled").then_some(())
        },
    )
    .await;
    assert_eq!(b.path().await, format!("/ui/jobs/{long}"));
    let job = cluster.wait_job(&long, Duration::from_secs(20)).await;
    assert_eq!(job.state, JobState::Cancelled);
    b.screenshot("job-cancelled").await;
    // The cancel is audited like the API's, with its reason.
    let audit: Vec<Value> = cluster.cli_json(&["audit", "list", "--action", "/ui/jobs"]);
    let ok: Vec<_> = audit
        .iter()
        .filter(|e| e["outcome"] == "ok" && e["action"] == "job.cancel")
        .collect();
    assert_eq!(ok.len(), 1, "{audit:?}");
    assert_eq!(ok[0]["actor"], "olga");
    assert_eq!(ok[0]["target"], format!("job:{long}"));
    assert!(ok[0].to_string().contains("wrong host"), "{audit:?}");
    // One entry per start, as for the API's.
    let created: Vec<_> = audit
        .iter()
        .filter(|e| e["action"] == "job.create" && e["outcome"] == "ok")
        .collect();
    assert_eq!(created.len(), 1, "{audit:?}");
    assert_eq!(created[0]["actor"], "olga");
    assert_eq!(created[0]["target"], format!("job:{job_id}"));
    b.no_dialog().await;
}

#[tokio::test]
async fn jobs_pages_over_http_on_each_backend() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        let url = cluster.url.clone();
        cluster.apply_actions(CATALOG);
        let agent = cluster.enroll_agent(&[]).await;
        cluster.wait_online(&agent.id).await;
        let cookie = cookie_of(&url, "admin", ADMIN_PASSWORD).await;

        // 60 noops and 3 echoes, through the API.
        let mut ids = Vec::new();
        for _ in 0..60 {
            ids.push(api_submit(&cluster, "noop", &agent.id, json!({})).await);
        }
        for m in ["a", "b", "c"] {
            ids.push(api_submit(&cluster, "echo", &agent.id, json!({"message": m})).await);
        }
        let newest = ids.last().unwrap().clone();
        for id in &ids {
            cluster.wait_job(id, Duration::from_secs(30)).await;
        }

        let (status, html) = get_page(&format!("{url}/ui/jobs"), &cookie).await;
        assert_eq!(status, 200, "{backend}");
        assert_eq!(rows(&html), 50, "{backend}");
        assert!(html.contains("1–50 of 63"), "{backend}: {html}");
        // Newest first, linked.
        let first_row = html.split("<tr data-job=\"").nth(1).unwrap();
        assert!(first_row.starts_with(&newest), "{backend}");
        assert!(html.contains(&format!("href=\"/ui/jobs/{newest}\"")));
        let (_, page2) = get_page(&format!("{url}/ui/jobs?page=2"), &cookie).await;
        assert_eq!(rows(&page2), 13, "{backend}");
        assert!(page2.contains("51–63 of 63"), "{backend}");
        assert!(page2.contains(&format!("<tr data-job=\"{}\"", ids[0])));
        // Filters, kept by the page links.
        let (_, echoes) = get_page(&format!("{url}/ui/jobs?action=echo"), &cookie).await;
        assert_eq!(rows(&echoes), 3, "{backend}");
        let (_, small) = get_page(
            &format!("{url}/ui/jobs?action=noop&limit=25&page=2"),
            &cookie,
        )
        .await;
        assert_eq!(rows(&small), 25, "{backend}");
        assert!(
            small.contains("action=noop&amp;page=3&amp;limit=25"),
            "{small}"
        );
        let (_, done) = get_page(
            &format!("{url}/ui/jobs?state=succeeded&by=admin&limit=200"),
            &cookie,
        )
        .await;
        assert_eq!(rows(&done), 63, "{backend}");
        let (_, nobody) = get_page(&format!("{url}/ui/jobs?by=nobody"), &cookie).await;
        assert_eq!(rows(&nobody), 0);
        let (_, one) = get_page(&format!("{url}/ui/jobs?id={}", &ids[7][..30]), &cookie).await;
        assert_eq!(rows(&one), 1, "{backend}");
        let (status, _) = get_page(&format!("{url}/ui/jobs?state=bogus"), &cookie).await;
        assert_eq!(status, 422);
        let (status, _) = get_page(&format!("{url}/ui/jobs?id=%25"), &cookie).await;
        assert_eq!(status, 422);

        // One job, by id or prefix; an unknown one is the 404 page.
        let (status, page) = get_page(&format!("{url}/ui/jobs/{}", &ids[61][..13]), &cookie).await;
        assert_eq!(status, 200, "{backend}");
        assert!(page.contains(&ids[61]));
        assert!(page.contains("message=b"), "{page}");
        assert!(
            page.contains("<pre id=\"log\" tabindex=\"0\">b\n</pre>"),
            "{page}"
        );
        for missing in ["0190aaaa-0000-7000-8000-000000000000", "zzzz", "ab"] {
            let (status, page) = get_page(&format!("{url}/ui/jobs/{missing}"), &cookie).await;
            assert_eq!(status, 404, "{backend} {missing}");
            assert!(page.contains("not found"), "{page}");
        }
        // Cancelling an ended job: the API's 409, as a page.
        let csrf = csrf_in(&page);
        let (status, _, body) = post_form(
            &format!("{url}/ui/jobs/{}/cancel", ids[61]),
            &cookie,
            &[("csrf", &csrf)],
        )
        .await;
        assert_eq!(status, 409, "{backend}");
        assert!(body.contains("already ended"), "{body}");

        // The form: typed inputs, errors naming the field, values kept.
        let (status, form) = get_page(&format!("{url}/ui/jobs/new?action=sleep"), &cookie).await;
        assert_eq!(status, 200);
        assert!(form.contains("type=\"number\""), "{form}");
        let (status, _) = get_page(&format!("{url}/ui/jobs/new?action=nope"), &cookie).await;
        assert_eq!(status, 404);
        let (status, _, body) = post_form(
            &format!("{url}/ui/jobs"),
            &cookie,
            &[
                ("csrf", &csrf),
                ("action", "sleep"),
                ("param.seconds", "lots"),
                ("target", &agent.id),
            ],
        )
        .await;
        assert_eq!(status, 422, "{backend}");
        assert!(
            body.contains("parameter &#39;seconds&#39; must be an integer")
                || body.contains("parameter 'seconds' must be an integer"),
            "{body}"
        );
        assert!(body.contains("id=\"p-seconds-error\""), "{body}");
        assert!(body.contains("value=\"lots\""), "the value is kept: {body}");
        let (status, _, body) = post_form(
            &format!("{url}/ui/jobs"),
            &cookie,
            &[
                ("csrf", &csrf),
                ("action", "echo"),
                ("param.message", "hi"),
                ("target", "role in (web"),
            ],
        )
        .await;
        assert_eq!(status, 422, "{backend}");
        assert!(body.contains("id=\"f-target-error\""), "{body}");
        // Shell syntax in a parameter is one literal argument.
        let hostile = "; rm -rf / $(id)";
        let (status, location, _) = post_form(
            &format!("{url}/ui/jobs"),
            &cookie,
            &[
                ("csrf", &csrf),
                ("action", "echo"),
                ("param.message", hostile),
                ("target", &agent.id),
            ],
        )
        .await;
        assert_eq!(status, 303, "{backend}");
        let hostile_id = location.trim_start_matches("/ui/jobs/").to_owned();
        let job = cluster.wait_job(&hostile_id, Duration::from_secs(20)).await;
        assert_eq!(job.state, JobState::Succeeded);
        let (_, page) = get_page(&format!("{url}{location}"), &cookie).await;
        assert!(page.contains(&format!(">{hostile}\n</pre>")), "{page}");

        // The event stream of an ended job: its output, its state, the end;
        // resumed after the last event id, only what follows.
        let resp = no_redirects()
            .get(format!("{url}/ui/jobs/{hostile_id}/events"))
            .header("Cookie", format!("drover_session={cookie}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let events = resp.text().await.unwrap();
        assert!(events.contains("event: log"), "{events}");
        assert!(events.contains("rm -rf"), "{events}");
        assert!(events.contains("event: state"), "{events}");
        assert!(events.contains("\"succeeded\""), "{events}");
        assert!(events.trim_end().ends_with("data: {}"), "{events}");
        let last_id = events
            .lines()
            .filter_map(|l| l.strip_prefix("id: "))
            .next_back()
            .unwrap()
            .to_owned();
        let resumed = no_redirects()
            .get(format!("{url}/ui/jobs/{hostile_id}/events"))
            .header("Cookie", format!("drover_session={cookie}"))
            .header("Last-Event-ID", &last_id)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!resumed.contains("event: log"), "{resumed}");
        assert!(resumed.contains("event: end"), "{resumed}");
        // Without a session: to the login page.
        let anon = no_redirects()
            .get(format!("{url}/ui/jobs/{hostile_id}/events"))
            .send()
            .await
            .unwrap();
        assert_eq!(anon.status(), 303);

        // The agent's page lists its latest attempts, linked to their jobs.
        let (_, page) = get_page(&format!("{url}/ui/agents/{}", agent.id), &cookie).await;
        assert!(page.contains("Recent attempts"), "{page}");
        assert_eq!(page.matches("<tr data-attempt=").count(), 20, "{backend}");
        assert!(
            page.contains(&format!("href=\"/ui/jobs/{hostile_id}\"")),
            "{page}"
        );
    }
}
