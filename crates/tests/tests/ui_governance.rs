//! The dashboard's approvals, audit and catalog pages (issue 15), in a
//! real headless Chromium: an approver sees exactly what a protected job
//! will run and approves it (it then runs), another request is rejected
//! with a reason, the requester and a viewer get no buttons and their
//! forged POSTs are refused; the audit log filters and shows its chain
//! intact, then broken at the row tampered with; the catalog lists
//! actions and profiles, shows an XSS payload as text and gives viewers
//! no Run links. Screenshots under target/ui-screenshots/. Plus the pages
//! over plain HTTP on every store backend (paging, filters, roles).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use drover_tests::*;
use fantoccini::Locator;
use serde_json::{json, Value};

const XSS: &str = "<script>alert(1)</script>";

const CATALOG: &str = r#"
sandboxes:
  - name: box
    type: docker
    image: busybox:1
    memory: 64m
    pids: 32
actions:
  - name: deploy
    description: Deploys a version
    argv: ["/bin/echo", "deploying", "{{version}}"]
    params:
      version:
        type: string
        pattern: "[0-9.]+"
      force:
        type: bool
        default: false
  - name: hello
    argv: ["/bin/echo", "hello"]
  - name: sneaky
    description: "<script>alert(1)</script>"
    argv: ["/bin/echo", "<script>alert(1)</script>"]
"#;

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn api(
    cluster: &Cluster,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = cluster
        .http
        .request(method, format!("{}/api/v1{path}", cluster.url))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A bearer token of `user`.
async fn token(cluster: &Cluster, user: &str, password: &str) -> String {
    let (status, body) = post_json(
        &cluster.http,
        format!("{}/api/v1/auth/login", cluster.url),
        None,
        json!({"username": user, "password": password}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

/// A dashboard session cookie of `user`, through the login form.
async fn cookie(url: &str, user: &str, password: &str) -> String {
    let resp = no_redirects()
        .post(format!("{url}/ui/login"))
        .form(&[("username", user), ("password", password)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303, "{user}");
    resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("drover_session=")
        .to_owned()
}

/// A dashboard page over HTTP: status and HTML.
async fn page(url: &str, cookie: &str) -> (u16, String) {
    let resp = no_redirects()
        .get(url)
        .header("Cookie", format!("drover_session={cookie}"))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn csrf_of(html: &str) -> String {
    html.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned()
}

/// Submits a protected `deploy` job as `who`; returns the job id and its
/// approval request.
async fn deploy(cluster: &Cluster, who: &str, target: &str, version: &str) -> (String, Value) {
    let (status, job) = api(
        cluster,
        "POST",
        "/jobs",
        who,
        Some(json!({"action": "deploy", "target": target, "params": {"version": version}})),
    )
    .await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(job["state"], "awaiting_approval", "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let request = wait_for("the approval request", Duration::from_secs(20), || async {
        let (_, list) = api(
            cluster,
            "GET",
            "/approvals?state=pending",
            &cluster.admin_token,
            None,
        )
        .await;
        list.as_array()
            .unwrap()
            .iter()
            .find(|a| a["job_id"] == id.as_str())
            .cloned()
    })
    .await;
    (id, request)
}

async fn approval_state(cluster: &Cluster, id: &str) -> String {
    let (_, a) = api(
        cluster,
        "GET",
        &format!("/approvals/{id}"),
        &cluster.admin_token,
        None,
    )
    .await;
    a["state"].as_str().unwrap().to_owned()
}

async fn type_into(b: &Browser, css: &str, text: &str) {
    b.client
        .find(Locator::Css(css))
        .await
        .unwrap()
        .send_keys(text)
        .await
        .unwrap();
}

#[tokio::test]
async fn approvals_audit_and_catalog_in_a_real_browser() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    let url = cluster.url.clone();
    cluster.apply_actions(CATALOG);
    let agent = cluster.enroll_agent(&[]).await;
    cluster.wait_online(&agent.id).await;
    cluster.cli_ok(&["approvals", "protect", "action", "deploy"]);
    let alice_password = cluster.add_user("alice", "operator", &[]);
    let bob_password = cluster.add_user("bob", "operator", &[]);
    let vera_password = cluster.add_user("vera", "viewer", &[]);
    let alice = token(&cluster, "alice", &alice_password).await;

    // Alice asks for two deploys.
    let (first_job, first) = deploy(&cluster, &alice, &agent.id, "1.2.3").await;
    let (second_job, second) = deploy(&cluster, &alice, &agent.id, "2.0").await;
    let first_id = first["id"].as_str().unwrap().to_owned();
    let second_id = second["id"].as_str().unwrap().to_owned();

    let b = Browser::start("governance").await;

    // Bob sees both pending, and exactly what the first one will run.
    b.login(&url, "bob", &bob_password).await;
    b.goto(&format!("{url}/ui/approvals")).await;
    assert_eq!(b.count("#approvals tbody tr").await, 2);
    assert_eq!(b.text("#pending-count").await, "2 pending");
    assert!(b
        .text(&format!("tr[data-approval='{first_id}']"))
        .await
        .contains("deploy"));
    b.screenshot("approvals").await;
    b.click_to(
        &format!("tr[data-approval='{first_id}'] th a"),
        &format!("/ui/approvals/{first_id}"),
    )
    .await;
    assert!(b.text("#state").await.contains("pending"));
    assert_eq!(b.text("#action").await, "deploy");
    assert_eq!(b.text("#params").await, "version=1.2.3");
    assert_eq!(b.text("#argv").await, "/bin/echo deploying 1.2.3");
    assert_eq!(b.text("#agents").await, agent.id);
    assert_eq!(b.text("#target").await, agent.id);
    assert!(b.text("#sandbox").await.starts_with("process"));
    assert_eq!(b.text("#timeout").await, "1m");
    assert_eq!(b.text("#requested-by").await, "alice");
    assert_eq!(b.text("#spec-hash").await, first["spec_hash"]);
    assert_eq!(b.text("#votes").await, "0 of 1 needed");
    assert_eq!(b.count("form.approve").await, 1);
    b.screenshot("approval-pending").await;
    // Approving from the page releases the job, which then runs.
    type_into(&b, "#approve-comment", "looks right").await;
    b.client
        .find(Locator::Css("button[value=approve]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        "the approval shown approved",
        Duration::from_secs(10),
        || async {
            b.wait_text("#state")
                .await
                .contains("approved")
                .then_some(())
        },
    )
    .await;
    assert_eq!(b.path().await, format!("/ui/approvals/{first_id}"));
    assert_eq!(b.text("#votes").await, "1 of 1 needed: bob");
    assert_eq!(b.count("#decide").await, 0, "decided: no more forms");
    b.screenshot("approval-approved").await;
    let done = cluster.wait_job(&first_job, Duration::from_secs(30)).await;
    assert_eq!(done.state, JobState::Succeeded);

    // The second one is rejected with a reason.
    b.goto(&format!("{url}/ui/approvals/{second_id}")).await;
    assert_eq!(b.text("#params").await, "version=2.0");
    type_into(&b, "#reject-reason", "not this week").await;
    b.client
        .find(Locator::Css("button[value=reject]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        "the approval shown rejected",
        Duration::from_secs(10),
        || async {
            b.wait_text("#state")
                .await
                .contains("rejected")
                .then_some(())
        },
    )
    .await;
    assert_eq!(b.text("#reason").await, "not this week");
    assert!(b.text("#decided").await.ends_with("by bob"));
    b.screenshot("approval-rejected").await;
    assert_eq!(cluster.job(&second_job).state, JobState::Cancelled);
    b.goto(&format!("{url}/ui/approvals?show=decided")).await;
    assert_eq!(b.count("#approvals tbody tr").await, 2);
    b.screenshot("approvals-decided").await;
    b.click_to(".who button", "/ui/login").await;

    // Alice asks again: she sees no Approve button on her own request,
    // and a forged approve with her cookie and a valid token is refused.
    let (_, third) = deploy(&cluster, &alice, &agent.id, "3.0").await;
    let third_id = third["id"].as_str().unwrap().to_owned();
    b.login(&url, "alice", &alice_password).await;
    b.goto(&format!("{url}/ui/approvals/{third_id}")).await;
    assert_eq!(b.count("button[value=approve]").await, 0);
    assert_eq!(b.count("form.approve").await, 0);
    assert!(b.text("#own").await.contains("four eyes"));
    b.screenshot("approval-own").await;
    let alice_cookie = b.session_cookie().await;
    let alice_csrf = b
        .client
        .find(Locator::Css("input[name=csrf]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap();
    let approve = format!("{url}/ui/approvals/{third_id}/approve");
    assert_eq!(
        post_ui_form(&approve, &alice_cookie, &[("csrf", &alice_csrf)]).await,
        403
    );
    assert_eq!(approval_state(&cluster, &third_id).await, "pending");
    b.click_to(".who button", "/ui/login").await;

    // A viewer gets no forms, and POSTs are refused.
    b.login(&url, "vera", &vera_password).await;
    b.goto(&format!("{url}/ui/approvals/{third_id}")).await;
    assert_eq!(b.count("#decide").await, 0);
    assert_eq!(b.count("form.approve, form.reject").await, 0);
    assert_eq!(b.text("#params").await, "version=3.0");
    let vera_cookie = b.session_cookie().await;
    let vera_csrf = b
        .client
        .find(Locator::Css("input[name=csrf]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        post_ui_form(&approve, &vera_cookie, &[("csrf", &vera_csrf)]).await,
        403
    );
    let reject = format!("{url}/ui/approvals/{third_id}/reject");
    assert_eq!(
        post_ui_form(
            &reject,
            &vera_cookie,
            &[("csrf", &vera_csrf), ("reason", "x")]
        )
        .await,
        403
    );
    assert_eq!(approval_state(&cluster, &third_id).await, "pending");
    // The catalog, for a viewer: no Run links.
    b.goto(&format!("{url}/ui/catalog")).await;
    assert!(b.count("#actions > tbody > tr").await >= 4);
    assert_eq!(b.count("a.run").await, 0);
    b.goto(&format!("{url}/ui/catalog/actions/deploy")).await;
    assert_eq!(b.count("a.run").await, 0);
    // Nor the audit log: admins only, and not in the navigation.
    assert_eq!(b.count("nav[aria-label=Main] a[href='/ui/audit']").await, 0);
    b.click_to(".who button", "/ui/login").await;

    // The admin: the catalog with the payload as text and Run links.
    b.login(&url, "admin", ADMIN_PASSWORD).await;
    b.goto(&format!("{url}/ui/catalog")).await;
    assert_eq!(b.text("tr[data-action=sneaky] .description").await, XSS);
    b.no_dialog().await;
    assert!(!b.client.source().await.unwrap().contains(XSS));
    assert!(b
        .text("tr[data-action=deploy] .protection")
        .await
        .contains("protected"));
    assert_eq!(b.text("tr[data-action=hello] .protection").await, "no");
    assert_eq!(
        b.client
            .find(Locator::Css("tr[data-action=deploy] a.run"))
            .await
            .unwrap()
            .attr("href")
            .await
            .unwrap()
            .as_deref(),
        Some("/ui/jobs/new?action=deploy")
    );
    let deploy_row = b.text("tr[data-action=deploy]").await;
    assert!(deploy_row.contains("version"), "{deploy_row}");
    assert!(deploy_row.contains("string"), "{deploy_row}");
    assert_eq!(b.count("#sandboxes > tbody > tr").await, 2);
    let profile = b.text("tr[data-sandbox=box]").await;
    assert!(profile.contains("docker"), "{profile}");
    assert!(profile.contains("busybox:1"), "{profile}");
    assert!(profile.contains("pids: 32"), "{profile}");
    b.screenshot("catalog").await;
    b.goto(&format!("{url}/ui/catalog/actions/sneaky")).await;
    assert!(b.text("#definition").await.contains(XSS));
    b.no_dialog().await;
    b.screenshot("catalog-action").await;
    b.goto(&format!("{url}/ui/catalog/actions/deploy")).await;
    let yaml = b.text("#definition").await;
    assert!(yaml.contains("name: deploy"), "{yaml}");
    assert!(yaml.contains("version:"), "{yaml}");

    // The audit log: filtered by actor and by action.
    b.goto(&format!("{url}/ui/audit?actor=bob")).await;
    let actors: Vec<String> = {
        let mut out = Vec::new();
        for e in b
            .client
            .find_all(Locator::Css("#audit td.actor"))
            .await
            .unwrap()
        {
            out.push(e.text().await.unwrap());
        }
        out
    };
    assert!(!actors.is_empty());
    assert!(actors.iter().all(|a| a == "bob"), "{actors:?}");
    b.goto(&format!("{url}/ui/audit?action=approval.approve"))
        .await;
    assert!(
        b.count("#audit tbody tr").await >= 2,
        "bob's and alice's refused one"
    );
    let first_row = b.text("#audit tbody tr").await;
    assert!(first_row.contains("approval.approve"), "{first_row}");
    b.screenshot("audit").await;
    // The chain is intact, then broken where a row was edited.
    b.goto(&format!("{url}/ui/audit/verify")).await;
    assert_eq!(
        b.client
            .find(Locator::Css("#chain"))
            .await
            .unwrap()
            .attr("data-chain")
            .await
            .unwrap()
            .as_deref(),
        Some("ok")
    );
    assert!(b.text("#chain").await.contains("intact"));
    b.screenshot("audit-chain-ok").await;
    let entries: Vec<Value> = cluster.cli_json(&["audit", "list", "--actor", "bob"]);
    let victim = entries.last().unwrap()["id"].as_i64().unwrap();
    let changed = cluster
        .tamper(&format!(
            "UPDATE audit SET actor = 'mallory' WHERE id = {victim}"
        ))
        .await;
    assert_eq!(changed, 1);
    b.goto(&format!("{url}/ui/audit/verify")).await;
    let chain = b.text("#chain").await;
    assert!(
        chain.contains(&format!("BROKEN at entry {victim}")),
        "{chain}"
    );
    assert!(
        chain.contains(&format!("row {victim} was edited")),
        "{chain}"
    );
    b.screenshot("audit-chain-broken").await;
    b.no_dialog().await;
}

#[tokio::test]
async fn governance_pages_over_http_on_each_backend() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        let url = cluster.url.clone();
        cluster.apply_actions(CATALOG);
        let agent = cluster.enroll_agent(&[]).await;
        cluster.wait_online(&agent.id).await;
        cluster.cli_ok(&["approvals", "protect", "action", "deploy"]);
        let alice_password = cluster.add_user("alice", "operator", &[]);
        let alice = token(&cluster, "alice", &alice_password).await;
        let mut ids = Vec::new();
        for v in ["1", "2", "3"] {
            ids.push(deploy(&cluster, &alice, &agent.id, v).await.1["id"].clone());
        }
        let admin = cookie(&url, "admin", ADMIN_PASSWORD).await;

        // Approvals: pending a page at a time, decided apart.
        let (status, html) = page(&format!("{url}/ui/approvals?limit=2"), &admin).await;
        assert_eq!(status, 200, "{backend:?}");
        assert_eq!(html.matches("data-approval=").count(), 2, "{backend:?}");
        assert!(html.contains("1–2 of 3"), "{backend:?}: {html}");
        let (_, html) = page(&format!("{url}/ui/approvals?limit=2&page=2"), &admin).await;
        assert_eq!(html.matches("data-approval=").count(), 1, "{backend:?}");
        let (_, html) = page(&format!("{url}/ui/approvals?show=decided"), &admin).await;
        assert_eq!(html.matches("data-approval=").count(), 0, "{backend:?}");
        assert!(html.contains("0 decided"), "{backend:?}");
        let id = ids[0].as_str().unwrap();
        let (_, html) = page(&format!("{url}/ui/approvals/{id}"), &admin).await;
        assert!(html.contains("value=\"approve\""), "{backend:?}");
        // The admin rejects one over HTTP without a reason: refused, with
        // one: it is decided.
        let reject = format!("{url}/ui/approvals/{id}/reject");
        let csrf = csrf_of(&html);
        assert_eq!(post_ui_form(&reject, &admin, &[("csrf", &csrf)]).await, 422);
        assert_eq!(
            post_ui_form(&reject, &admin, &[("csrf", &csrf), ("reason", "no")]).await,
            303
        );
        assert_eq!(
            approval_state(&cluster, id).await,
            "rejected",
            "{backend:?}"
        );
        let (_, html) = page(&format!("{url}/ui/approvals?show=decided"), &admin).await;
        assert_eq!(html.matches("data-approval=").count(), 1, "{backend:?}");

        // Audit: the same entries as the API's, filtered, a page at a time.
        let (_, all) = api(
            &cluster,
            "GET",
            "/audit?actor=alice&limit=1000",
            &cluster.admin_token,
            None,
        )
        .await;
        let want: Vec<i64> = all
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_i64().unwrap())
            .collect();
        assert!(want.len() >= 4, "{backend:?}: {all}");
        let mut seen = Vec::new();
        let mut next = Some("/ui/audit?actor=alice&limit=2".to_owned());
        while let Some(path) = next {
            let (status, html) =
                page(&format!("{url}{}", path.replace("&amp;", "&")), &admin).await;
            assert_eq!(status, 200, "{backend:?}");
            for row in html.split("<tr data-entry=\"").skip(1) {
                seen.push(row.split('"').next().unwrap().parse::<i64>().unwrap());
                assert!(row.contains("<td class=\"actor\">alice</td>"), "{row}");
            }
            next = html
                .split("rel=\"next\" href=\"")
                .nth(1)
                .map(|r| r.split('"').next().unwrap().to_owned());
        }
        assert_eq!(seen, want, "{backend:?}");
        let (_, html) = page(&format!("{url}/ui/audit?action=approval.reject"), &admin).await;
        assert_eq!(
            html.matches("data-entry=").count(),
            2,
            "{backend:?}: refused and ok"
        );
        let (status, _) = page(&format!("{url}/ui/audit?since=yesterday"), &admin).await;
        assert_eq!(status, 422, "{backend:?}");
        let (status, html) = page(&format!("{url}/ui/audit/verify"), &admin).await;
        assert_eq!(status, 200, "{backend:?}");
        assert!(html.contains("data-chain=\"ok\""), "{backend:?}: {html}");

        // Not an admin: no audit log.
        let alice_cookie = cookie(&url, "alice", &alice_password).await;
        for path in ["/ui/audit", "/ui/audit/verify"] {
            let (status, _) = page(&format!("{url}{path}"), &alice_cookie).await;
            assert_eq!(status, 403, "{backend:?} {path}");
        }
        // The catalog for her, with Run links (an operator).
        let (status, html) = page(&format!("{url}/ui/catalog"), &alice_cookie).await;
        assert_eq!(status, 200);
        assert!(
            html.contains("href=\"/ui/jobs/new?action=deploy\""),
            "{backend:?}"
        );
    }
}
