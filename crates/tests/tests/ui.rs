//! The dashboard (`/ui`), driven in a real headless Chromium through
//! chromedriver: logging in and out, the overview, the agents list and an
//! agent's page, an XSS payload shown as text, a viewer who gets no
//! controls and whose forged POSTs are refused, an admin who drains an
//! agent. Screenshots of each page are saved under
//! target/ui-screenshots/. Plus the same login and overview over plain
//! HTTP on every store backend (cookie flags, headers, CSRF, Origin).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use drover_proto::api::DispatchState;
use drover_tests::*;
use fantoccini::Locator;

const XSS: &str = "<script>alert(1)</script>";

/// An HTTP client that shows redirects instead of following them.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The session cookie Chromium holds, checked for its flags.
async fn checked_session_cookie(b: &Browser) -> String {
    let c = b.client.get_named_cookie("drover_session").await.unwrap();
    assert_eq!(c.http_only(), Some(true), "{c}");
    assert_eq!(
        c.same_site().map(|s| s.to_string()).as_deref(),
        Some("Strict"),
        "{c}"
    );
    assert_eq!(c.path(), Some("/"), "{c}");
    c.value().to_owned()
}

#[tokio::test]
async fn dashboard_in_a_real_browser() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    let url = cluster.url.clone();
    let agent = cluster.enroll_agent(&[]).await;
    cluster.wait_online(&agent.id).await;
    // An XSS payload as the hostname a real enrollment gives, and as a
    // label value written behind the server's back (labels set through
    // the API cannot hold '<').
    let token = cluster.bootstrap_token(&[]);
    let (code, enrolled) = post_json(
        &cluster.http,
        format!("{url}/api/v1/agent/enroll"),
        None,
        serde_json::json!({"token": token, "hostname": XSS, "agent_version": "0.1.0"}),
    )
    .await;
    assert_eq!(code, 200, "{enrolled}");
    let xss_id = enrolled["agent_id"].as_str().unwrap().to_owned();
    let changed = cluster
        .tamper(&format!(
            "UPDATE agents SET labels = '{{\"note\":\"{XSS}\"}}' WHERE id = '{xss_id}'"
        ))
        .await;
    assert_eq!(changed, 1);
    let viewer_password = cluster.add_user("vera", "viewer", &[]);

    let b = Browser::start("dashboard").await;

    // Not logged in: any page leads to the login form.
    b.goto(&format!("{url}/ui/agents")).await;
    assert_eq!(b.path().await, "/ui/login");
    b.screenshot("login").await;
    // A wrong password is told, with the form again.
    let form = b.client.form(Locator::Css("form.login")).await.unwrap();
    form.set_by_name("username", "admin").await.unwrap();
    form.set_by_name("password", "wrong").await.unwrap();
    form.submit().await.unwrap();
    assert_eq!(
        b.wait_text("[role=alert]").await,
        "wrong username or password"
    );
    b.screenshot("login-refused").await;

    // The admin logs in: the overview counts the fleet.
    b.login(&url, "admin", ADMIN_PASSWORD).await;
    let online = cluster
        .agents()
        .iter()
        .filter(|a| a.status == AgentStatus::Online)
        .count();
    assert_eq!(online, 1);
    assert_eq!(b.text("[data-count=online] dd").await, online.to_string());
    assert_eq!(b.text("[data-count=revoked] dd").await, "0");
    assert!(b.text("#fleet-stop + p").await.contains("active"));
    assert_eq!(b.text(".who .user").await, "admin");
    assert_eq!(
        b.count("nav[aria-label=Main] a").await,
        7,
        "only pages that exist (overview, agents, jobs, workflows, approvals, audit, catalog)"
    );
    b.screenshot("overview").await;
    let admin_cookie = checked_session_cookie(&b).await;

    // Every dashboard answer carries the CSP and friends.
    let resp = no_redirects()
        .get(format!("{url}/ui/agents"))
        .header("Cookie", format!("drover_session={admin_cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(
        h["content-security-policy"],
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "same-origin");
    assert_eq!(h["cache-control"], "no-store");
    // The API does not take the cookie: bearer tokens only.
    let api = no_redirects()
        .get(format!("{url}/api/v1/agents"))
        .header("Cookie", format!("drover_session={admin_cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 401);

    // The agents page shows the payload as text, and runs nothing.
    b.goto(&format!("{url}/ui/agents")).await;
    let row = format!("tr[data-agent='{xss_id}']");
    assert_eq!(b.text(&format!("{row} th")).await, XSS);
    assert_eq!(
        b.text(&format!("{row} .labels")).await,
        format!("note={XSS}")
    );
    assert_eq!(b.count("main script").await, 0);
    assert!(!b.client.source().await.unwrap().contains(XSS));
    b.no_dialog().await;
    assert_eq!(b.count("#agents tbody tr").await, 2);
    b.screenshot("agents").await;
    // Filtered by a target: only what it selects.
    b.goto(&format!("{url}/ui/agents?target={}", agent.id))
        .await;
    assert_eq!(b.count("#agents tbody tr").await, 1);
    // Paginated on the server.
    b.goto(&format!("{url}/ui/agents?limit=1&page=2")).await;
    assert_eq!(b.count("#agents tbody tr").await, 1);
    assert!(b.text(".pagination").await.contains("2–2 of 2"));
    b.goto(&format!("{url}/ui/agents/{xss_id}")).await;
    assert_eq!(b.text("h1").await, format!("Agent {XSS}"));
    b.no_dialog().await;
    b.screenshot("agent-xss").await;

    // Logging out ends the session on the server: the old cookie leads
    // to the login page again.
    b.click_to(".who button", "/ui/login").await;
    let resp = no_redirects()
        .get(format!("{url}/ui/"))
        .header("Cookie", format!("drover_session={admin_cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/ui/login");

    // A viewer sees the agent but no controls, and forged POSTs are
    // refused whether they carry the viewer's CSRF token or none.
    b.login(&url, "vera", &viewer_password).await;
    b.goto(&format!("{url}/ui/agents/{}", agent.id)).await;
    assert!(b.text("#dispatch").await.contains("active"));
    assert_eq!(b.count("#controls").await, 0);
    assert_eq!(b.count("button[value=drain]").await, 0);
    b.screenshot("agent-as-viewer").await;
    let viewer_cookie = checked_session_cookie(&b).await;
    let viewer_csrf = b
        .client
        .find(Locator::Css("input[name=csrf]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap();
    let drain = format!("{url}/ui/agents/{}/drain", agent.id);
    assert_eq!(
        post_ui_form(&drain, &viewer_cookie, &[("reason", "x")]).await,
        403
    );
    assert_eq!(
        post_ui_form(
            &drain,
            &viewer_cookie,
            &[("csrf", &viewer_csrf), ("reason", "x")]
        )
        .await,
        403
    );
    assert_eq!(cluster.agent(&agent.id).dispatch, DispatchState::Active);
    b.click_to(".who button", "/ui/login").await;

    // The admin: a POST without the session's CSRF token is refused too;
    // the form on the agent's page drains it.
    b.login(&url, "admin", ADMIN_PASSWORD).await;
    let admin_cookie = checked_session_cookie(&b).await;
    assert_eq!(
        post_ui_form(&drain, &admin_cookie, &[("reason", "x")]).await,
        403
    );
    assert_eq!(
        post_ui_form(&drain, &admin_cookie, &[("csrf", &viewer_csrf)]).await,
        403,
        "another session's token"
    );
    assert_eq!(cluster.agent(&agent.id).dispatch, DispatchState::Active);
    b.goto(&format!("{url}/ui/agents/{}", agent.id)).await;
    b.client
        .find(Locator::Css("#drain-reason"))
        .await
        .unwrap()
        .send_keys("kernel update")
        .await
        .unwrap();
    b.client
        .find(Locator::Css("button[value=drain]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The form answers with the agent's page again.
    let main = wait_for("the agent draining", Duration::from_secs(10), || async {
        let t = b.wait_text("main").await;
        t.contains("draining").then_some(t)
    })
    .await;
    assert_eq!(b.path().await, format!("/ui/agents/{}", agent.id), "{main}");
    let shown = b.text("#dispatch").await;
    assert!(shown.contains("draining"), "{shown}");
    assert!(shown.contains("drained by admin: kernel update"), "{shown}");
    assert_eq!(cluster.agent(&agent.id).dispatch, DispatchState::Draining);
    b.screenshot("agent-drained").await;
    // The drain is audited like the API's.
    let audit: Vec<serde_json::Value> =
        cluster.cli_json(&["audit", "list", "--action", "/ui/agents"]);
    let ok: Vec<_> = audit.iter().filter(|e| e["outcome"] == "ok").collect();
    assert_eq!(ok.len(), 1, "{audit:?}");
    assert_eq!(ok[0]["action"], "agent.drain", "{audit:?}");
    assert_eq!(ok[0]["actor"], "admin", "{audit:?}");
    assert_eq!(ok[0]["target"], format!("agent:{}", agent.id), "{audit:?}");
    assert_eq!(ok[0]["request"], "POST /ui/agents/{id}/drain", "{audit:?}");
    // The refused ones are there too, as refused.
    assert!(
        audit
            .iter()
            .any(|e| e["actor"] == "vera" && e["outcome"] == "refused"),
        "{audit:?}"
    );
    b.no_dialog().await;
}

/// Logs in through the form over HTTP as the admin.
async fn form_login(url: &str, origin: Option<&str>, password: &str) -> reqwest::Response {
    form_login_as(url, origin, "admin", password).await
}

/// Logs in through the form over HTTP.
async fn form_login_as(
    url: &str,
    origin: Option<&str>,
    user: &str,
    password: &str,
) -> reqwest::Response {
    let mut req = no_redirects()
        .post(format!("{url}/ui/login"))
        .form(&[("username", user), ("password", password)]);
    if let Some(o) = origin {
        req = req.header("Origin", o);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn login_and_overview_over_http_on_each_backend() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        let url = cluster.url.clone();
        let agent = cluster.enroll_agent(&[]).await;
        cluster.wait_online(&agent.id).await;

        // `/` leads to the dashboard.
        let resp = no_redirects().get(format!("{url}/")).send().await.unwrap();
        assert_eq!(resp.headers()["location"], "/ui/", "{backend:?}");

        // A login from another site is refused before any password check.
        let resp = form_login(&url, Some("http://evil.example"), ADMIN_PASSWORD).await;
        assert_eq!(resp.status(), 403, "{backend:?}");
        assert!(resp.headers().get("set-cookie").is_none());

        // A wrong password: 401, the form again, no cookie.
        let resp = form_login(&url, Some(&url), "wrong").await;
        assert_eq!(resp.status(), 401, "{backend:?}");
        assert!(resp.headers().get("set-cookie").is_none());

        let resp = form_login(&url, Some(&url), ADMIN_PASSWORD).await;
        assert_eq!(resp.status(), 303, "{backend:?}");
        assert_eq!(resp.headers()["location"], "/ui/");
        let set = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
        assert!(set.starts_with("drover_session=drv_s_"), "{set}");
        assert!(
            set.contains("; HttpOnly; SameSite=Strict; Path=/; Max-Age="),
            "{set}"
        );
        assert!(!set.contains("Secure"), "plain HTTP: {set}");
        let cookie = set
            .split(';')
            .next()
            .unwrap()
            .trim_start_matches("drover_session=")
            .to_owned();

        let page = no_redirects()
            .get(format!("{url}/ui/"))
            .header("Cookie", format!("drover_session={cookie}"))
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200);
        let html = page.text().await.unwrap();
        assert!(
            html.contains(
                "<div data-count=\"online\"><dt><span class=\"badge badge-good\" data-state=\"online\">"
            ),
            "{html}"
        );
        assert!(
            html.contains("<dd><a href=\"/ui/agents?status=online\">1</a></dd>"),
            "{backend:?}: {html}"
        );
        // An unknown page is an HTML 404 with the same headers.
        let missing = no_redirects()
            .get(format!("{url}/ui/nope"))
            .header("Cookie", format!("drover_session={cookie}"))
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
        assert!(missing.headers().contains_key("content-security-policy"));
        // The stylesheet and script come with a long cache life and an ETag.
        let css = no_redirects()
            .get(format!("{url}/ui/static/app.css"))
            .send()
            .await
            .unwrap();
        assert_eq!(css.status(), 200);
        assert!(css.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("immutable"));
        let etag = css.headers()["etag"].clone();
        let again = no_redirects()
            .get(format!("{url}/ui/static/app.css"))
            .header("If-None-Match", etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304);

        // Logging out without the CSRF token does not log out.
        let status = post_ui_form(&format!("{url}/ui/logout"), &cookie, &[]).await;
        assert_eq!(status, 403, "{backend:?}");
        let still = no_redirects()
            .get(format!("{url}/ui/"))
            .header("Cookie", format!("drover_session={cookie}"))
            .send()
            .await
            .unwrap();
        assert_eq!(still.status(), 200);
        // The login is in the audit log, like the API's.
        let audit: Vec<serde_json::Value> =
            cluster.cli_json(&["audit", "list", "--action", "/ui/login"]);
        let outcomes: Vec<_> = audit
            .iter()
            .map(|e| {
                (
                    e["action"].as_str().unwrap(),
                    e["outcome"].as_str().unwrap(),
                )
            })
            .collect();
        assert!(outcomes.contains(&("user.login", "ok")), "{audit:?}");
        assert!(outcomes.contains(&("user.login", "refused")), "{audit:?}");

        // Operators: controls only on agents in their scope, and a POST
        // on one outside it is refused even with a valid CSRF token.
        let page = format!("{url}/ui/agents/{}", agent.id);
        let drain = format!("{page}/drain");
        for (name, scope, allowed) in [
            ("otto", "role=elsewhere", false),
            ("olga", agent.id.as_str(), true),
        ] {
            let password = cluster.add_user(name, "operator", &["--scope-target", scope]);
            let resp = form_login_as(&url, None, name, &password).await;
            assert_eq!(resp.status(), 303, "{name}");
            let set = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
            let cookie = set
                .split(';')
                .next()
                .unwrap()
                .trim_start_matches("drover_session=")
                .to_owned();
            let html = no_redirects()
                .get(&page)
                .header("Cookie", format!("drover_session={cookie}"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let csrf = html
                .split("name=\"csrf\" value=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap()
                .to_owned();
            assert_eq!(html.contains("value=\"drain\""), allowed, "{name}: {html}");
            let status = post_ui_form(&drain, &cookie, &[("csrf", &csrf)]).await;
            let want = if allowed {
                DispatchState::Draining
            } else {
                DispatchState::Active
            };
            assert_eq!(status, if allowed { 303 } else { 403 }, "{name}");
            assert_eq!(cluster.agent(&agent.id).dispatch, want, "{name}");
        }
    }
}
