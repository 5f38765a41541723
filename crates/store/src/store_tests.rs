//! Store tests. Every test runs on SQLite and on PostgreSQL.

use chrono::{Duration, Utc};
use drover_proto::agent::Inventory;
use drover_proto::api::Role;
use drover_proto::labels::Labels;

use crate::testing::{TestDb, BACKENDS};
use crate::*;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn bootstrap(store: &Store, hash: &str, ttl: Duration) -> BootstrapToken {
    let user = match store.user_by_username("admin").await.unwrap() {
        Some(u) => u,
        None => store
            .create_user("admin", "x", Role::Admin, &Default::default(), Utc::now())
            .await
            .unwrap(),
    };
    let l = labels(&[("role", "web")]);
    store
        .insert_bootstrap_token(
            NewBootstrapToken {
                token_hash: hash,
                labels: &l,
                group: Some("eu"),
                name: None,
                created_by: &user.id,
                expires_at: Utc::now() + ttl,
            },
            Utc::now(),
        )
        .await
        .unwrap()
}

fn new_agent<'a>(id: &'a str, refresh: &'a str) -> NewAgent<'a> {
    NewAgent {
        id,
        hostname: "host-1",
        agent_version: "0.1.0",
        session_id: "s1",
        refresh_token_hash: refresh,
        refresh_expires_at: Utc::now() + Duration::days(1),
    }
}

async fn enrolled(store: &Store, id: &str) -> AgentRecord {
    let b = format!("boot-{id}");
    let r = format!("r0-{id}");
    bootstrap(store, &b, Duration::hours(1)).await;
    match store
        .enroll_agent(&b, new_agent(id, &r), Utc::now())
        .await
        .unwrap()
    {
        EnrollOutcome::Enrolled(a) => *a,
        other => panic!("not enrolled: {other:?}"),
    }
}

/// A job running `/bin/true` on `agents`, with one queued attempt each.
async fn true_job(
    store: &Store,
    agents: &[String],
    retry: &drover_proto::jobs::RetryPolicy,
    sandbox: &drover_proto::sandbox::Sandbox,
    workspace: Option<&drover_proto::sandbox::WorkspaceSpec>,
) -> String {
    let argv = vec!["/bin/true".to_owned()];
    store
        .create_job(
            crate::jobs::NewJob {
                action: "true",
                action_hash: "h",
                target: "*",
                params_json: "{}",
                argv: &argv,
                env: &std::collections::BTreeMap::new(),
                timeout_ms: 1000,
                kill_grace_ms: 100,
                retry,
                created_by: "admin",
                agent_ids: agents,
                artifacts: &[],
                sandbox,
                workspace,
                approval: None,
            },
            Utc::now(),
        )
        .await
        .unwrap()
}

/// A lease that runs 30 s from now.
fn lease() -> chrono::DateTime<Utc> {
    Utc::now() + Duration::seconds(30)
}

#[tokio::test]
async fn migrations_apply_once_and_reopen() {
    for backend in BACKENDS {
        let db = TestDb::new(backend).await;
        let store = db.open().await;
        store
            .create_user("admin", "h", Role::Admin, &Default::default(), Utc::now())
            .await
            .unwrap();
        store.close().await;
        let again = db.open().await;
        assert_eq!(again.count_users().await.unwrap(), 1, "{backend}");
        assert_eq!(again.backend(), backend);
    }
}

#[tokio::test]
async fn users_are_unique_and_found_by_name_and_token() {
    for backend in BACKENDS {
        let db = TestDb::new(backend).await;
        let store = db.open().await;
        let u = store
            .create_user("ops", "hash", Role::Admin, &Default::default(), Utc::now())
            .await
            .unwrap();
        let dup = store
            .create_user(
                "ops",
                "hash2",
                Role::Viewer,
                &Default::default(),
                Utc::now(),
            )
            .await;
        assert!(dup.unwrap_err().is_unique_violation(), "{backend}");
        let found = store.user_by_username("ops").await.unwrap().unwrap();
        assert_eq!(found.id, u.id);
        assert_eq!(found.role, Role::Admin);
        let tid = store
            .insert_user_token(
                NewUserToken {
                    user_id: &u.id,
                    kind: "api",
                    token_hash: "th",
                    name: Some("ci"),
                    role: None,
                    scope: &Default::default(),
                    expires_at: None,
                },
                Utc::now(),
            )
            .await
            .unwrap();
        let (t, tu) = store.user_token_by_hash("th").await.unwrap().unwrap();
        assert_eq!((t.id.as_str(), tu.username.as_str()), (tid.as_str(), "ops"));
        assert!(store.user_token_by_hash("nope").await.unwrap().is_none());
    }
}

#[tokio::test]
async fn bootstrap_token_enrolls_once() {
    for backend in BACKENDS {
        let db = TestDb::new(backend).await;
        let store = db.open().await;
        bootstrap(&store, "b1", Duration::hours(1)).await;
        let out = store
            .enroll_agent("b1", new_agent("a1", "r1"), Utc::now())
            .await
            .unwrap();
        let EnrollOutcome::Enrolled(agent) = out else {
            panic!("{backend}: {out:?}")
        };
        assert_eq!(agent.labels, labels(&[("role", "web")]));
        assert_eq!(agent.group.as_deref(), Some("eu"));

        let again = store
            .enroll_agent("b1", new_agent("a2", "r2"), Utc::now())
            .await
            .unwrap();
        assert!(
            matches!(again, EnrollOutcome::TokenUsed { .. }),
            "{backend}: {again:?}"
        );
        let unknown = store
            .enroll_agent("zz", new_agent("a3", "r3"), Utc::now())
            .await
            .unwrap();
        assert!(matches!(unknown, EnrollOutcome::TokenUnknown), "{backend}");
        bootstrap(&store, "old", Duration::seconds(-1)).await;
        let expired = store
            .enroll_agent("old", new_agent("a4", "r4"), Utc::now())
            .await
            .unwrap();
        assert!(
            matches!(expired, EnrollOutcome::TokenExpired { .. }),
            "{backend}"
        );
        // Only the first enrollment made an agent.
        assert_eq!(store.list_agents().await.unwrap().len(), 1);
    }
}

/// The successor of a refresh token (by hash), derived from it as the
/// server does, so that presenting a token again names the same successor.
fn next(hash: &str) -> String {
    format!("{hash}>")
}

const GRACE: std::time::Duration = std::time::Duration::from_secs(300);

/// Presents `old` as the server does: its successor derived, the usual grace.
async fn present(store: &Store, old: &str, now: chrono::DateTime<Utc>) -> RefreshOutcome {
    present_with(store, old, &next(old), GRACE, now).await
}

async fn present_with(
    store: &Store,
    old: &str,
    new: &str,
    grace: std::time::Duration,
    now: chrono::DateTime<Utc>,
) -> RefreshOutcome {
    store
        .rotate_refresh_token(
            RefreshRotation {
                old_hash: old,
                new_hash: new,
                new_expires_at: now + Duration::days(1),
                grace,
            },
            now,
        )
        .await
        .unwrap()
}

fn rotated(agent: &AgentRecord) -> RefreshOutcome {
    RefreshOutcome::Rotated {
        agent_id: agent.id.clone(),
        session_id: "s1".into(),
    }
}

fn repeated(agent: &AgentRecord) -> RefreshOutcome {
    RefreshOutcome::Repeated {
        agent_id: agent.id.clone(),
        session_id: "s1".into(),
    }
}

fn reused(agent: &AgentRecord) -> RefreshOutcome {
    RefreshOutcome::Reused {
        agent_id: agent.id.clone(),
    }
}

async fn assert_session_ended_by_reuse(store: &Store, agent: &AgentRecord, backend: Backend) {
    let stored = store.agent(&agent.id).await.unwrap().unwrap();
    assert_eq!(stored.session_id, None, "{backend}");
    assert_eq!(
        stored.session_ended_reason.as_deref(),
        Some("refresh token reuse detected"),
        "{backend}"
    );
}

#[tokio::test]
async fn refresh_rotates_and_reuse_ends_the_session() {
    for backend in BACKENDS {
        let db = TestDb::new(backend).await;
        let store = db.open().await;
        let a = enrolled(&store, "a1").await;
        let now = Utc::now();
        let r0 = "r0-a1".to_owned();
        let r1 = next(&r0);
        let r2 = next(&r1);
        assert_eq!(present(&store, &r0, now).await, rotated(&a), "{backend}");
        assert_eq!(present(&store, &r1, now).await, rotated(&a), "{backend}");
        assert_eq!(present(&store, &r2, now).await, rotated(&a), "{backend}");
        // r1 was rotated already and its successor used since: presenting
        // it again ends the session.
        assert_eq!(present(&store, &r1, now).await, reused(&a), "{backend}");
        // Even the current token (r3) no longer works, nor is the grace
        // given to r2 any more.
        let after = present(&store, &next(&r2), now).await;
        assert!(
            matches!(after, RefreshOutcome::SessionEnded { .. }),
            "{backend}: {after:?}"
        );
        let late = present(&store, &r2, now).await;
        assert!(
            matches!(late, RefreshOutcome::SessionEnded { .. }),
            "{backend}: {late:?}"
        );
        assert_session_ended_by_reuse(&store, &a, backend).await;
        assert_eq!(
            present(&store, "nope", now).await,
            RefreshOutcome::Unknown,
            "{backend}"
        );
    }
}

/// The answer to a rotation is lost: the agent presents the same token again
/// and gets the same successor, as often as the answer is lost, until it
/// uses that successor.
#[tokio::test]
async fn refresh_lost_answer_gets_the_same_successor_within_the_grace() {
    for backend in BACKENDS {
        let db = TestDb::new(backend).await;
        let store = db.open().await;
        let a = enrolled(&store, "a1").await;
        let t0 = Utc::now();
        let r0 = "r0-a1".to_owned();
        let r1 = next(&r0);
        assert_eq!(present(&store, &r0, t0).await, rotated(&a), "{backend}");
        // Lost: the same token again, twice, the last just inside the grace.
        let t1 = t0 + Duration::seconds(10);
        assert_eq!(present(&store, &r0, t1).await, repeated(&a), "{backend}");
        let edge = t0 + Duration::seconds(300);
        assert_eq!(present(&store, &r0, edge).await, repeated(&a), "{backend}");
        // The session is whole and the successor works.
        let stored = store.agent(&a.id).await.unwrap().unwrap();
        assert_eq!(stored.session_id.as_deref(), Some("s1"), "{backend}");
        assert_eq!(present(&store, &r1, edge).await, rotated(&a), "{backend}");
        assert_eq!(
            present(&store, &next(&r1), edge).await,
            rotated(&a),
            "{backend}"
        );
    }
}

/// The grace covers only the immediately previous token, within the grace,
/// whose successor is the one the caller derives and was never used, in a
/// current session of an agent not revoked.
#[tokio::test]
async fn refresh_grace_is_narrow() {
    for backend in BACKENDS {
        let db = TestDb::new(backend).await;
        let store = db.open().await;
        let t0 = Utc::now();

        // An older token: r0's successor r1 was used (r2 is current, unused).
        let a = enrolled(&store, "a1").await;
        let r0 = "r0-a1".to_owned();
        assert_eq!(present(&store, &r0, t0).await, rotated(&a), "{backend}");
        assert_eq!(present(&store, &next(&r0), t0).await, rotated(&a));
        assert_eq!(present(&store, &r0, t0).await, reused(&a), "{backend}");
        assert_session_ended_by_reuse(&store, &a, backend).await;

        // After the grace.
        let b = enrolled(&store, "b1").await;
        let r0 = "r0-b1".to_owned();
        assert_eq!(present(&store, &r0, t0).await, rotated(&b), "{backend}");
        let late = t0 + Duration::seconds(301);
        assert_eq!(present(&store, &r0, late).await, reused(&b), "{backend}");
        assert_session_ended_by_reuse(&store, &b, backend).await;

        // Grace turned off.
        let c = enrolled(&store, "c1").await;
        let r0 = "r0-c1".to_owned();
        assert_eq!(present(&store, &r0, t0).await, rotated(&c), "{backend}");
        let off = present_with(&store, &r0, &next(&r0), std::time::Duration::ZERO, t0).await;
        assert_eq!(off, reused(&c), "{backend}");
        assert_session_ended_by_reuse(&store, &c, backend).await;

        // Another successor than the one recorded at the rotation.
        let d = enrolled(&store, "d1").await;
        let r0 = "r0-d1".to_owned();
        assert_eq!(present(&store, &r0, t0).await, rotated(&d), "{backend}");
        let other = present_with(&store, &r0, "forged", GRACE, t0).await;
        assert_eq!(other, reused(&d), "{backend}");
        assert_session_ended_by_reuse(&store, &d, backend).await;

        // A revoked agent gets no grace, nor does its session come back.
        let e = enrolled(&store, "e1").await;
        let r0 = "r0-e1".to_owned();
        assert_eq!(present(&store, &r0, t0).await, rotated(&e), "{backend}");
        store.revoke_agent(&e.id, "stolen", t0).await.unwrap();
        let revoked = present(&store, &r0, t0).await;
        assert!(
            matches!(revoked, RefreshOutcome::AgentRevoked { .. }),
            "{backend}: {revoked:?}"
        );
        let stored = store.agent(&e.id).await.unwrap().unwrap();
        assert_eq!(stored.session_id, None, "{backend}");
    }
}

/// Many presentations of the same token at once, as from replicas: one
/// rotates, every other gets the same successor, and the session lives.
#[tokio::test]
async fn refresh_concurrent_presentations_of_one_token() {
    for backend in BACKENDS {
        let db = TestDb::new(backend).await;
        let store = db.open().await;
        let a = enrolled(&store, "a1").await;
        let now = Utc::now();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { present(&store, "r0-a1", now).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
        let firsts = outcomes.iter().filter(|o| **o == rotated(&a)).count();
        let repeats = outcomes.iter().filter(|o| **o == repeated(&a)).count();
        assert_eq!((firsts, repeats), (1, 7), "{backend}: {outcomes:?}");
        let stored = store.agent(&a.id).await.unwrap().unwrap();
        assert_eq!(stored.session_id.as_deref(), Some("s1"), "{backend}");
        assert_eq!(
            present(&store, &next("r0-a1"), now).await,
            rotated(&a),
            "{backend}"
        );
    }
}

#[tokio::test]
async fn expired_refresh_token_is_refused() {
    for backend in BACKENDS {
        let db = TestDb::new(backend).await;
        let store = db.open().await;
        bootstrap(&store, "b", Duration::hours(1)).await;
        let mut agent = new_agent("a1", "r0");
        agent.refresh_expires_at = Utc::now() - Duration::seconds(1);
        store.enroll_agent("b", agent, Utc::now()).await.unwrap();
        let out = present(&store, "r0", Utc::now()).await;
        assert_eq!(out, RefreshOutcome::Expired, "{backend}");
    }
}

#[tokio::test]
async fn heartbeat_revocation_and_counts() {
    for backend in BACKENDS {
        let db = TestDb::new(backend).await;
        let store = db.open().await;
        let a = enrolled(&store, "a1").await;
        let b = enrolled(&store, "b1").await;
        let _never_seen = enrolled(&store, "c1").await;
        let inv = Inventory {
            hostname: "web-1".into(),
            cpu_count: 2,
            agent_version: "0.1.0".into(),
            ..Inventory::default()
        };
        let now = Utc::now();
        assert!(store
            .record_heartbeat(&a.id, "s1", &inv, now)
            .await
            .unwrap());
        assert!(store
            .record_heartbeat(&b.id, "s1", &inv, now - Duration::seconds(60))
            .await
            .unwrap());
        // A heartbeat from another session does not count.
        assert!(!store
            .record_heartbeat(&a.id, "other", &inv, now)
            .await
            .unwrap());
        let got = store.agent(&a.id).await.unwrap().unwrap();
        assert_eq!(got.inventory.as_ref(), Some(&inv), "{backend}");
        assert_eq!(got.hostname, "web-1");

        let counts = store
            .count_agents(now - Duration::seconds(30), now - Duration::seconds(90))
            .await
            .unwrap();
        assert_eq!(
            counts,
            AgentCounts {
                online: 1,
                stale: 1,
                offline: 1,
                revoked: 0
            },
            "{backend}"
        );

        store
            .revoke_agent(&a.id, "stolen laptop", now)
            .await
            .unwrap();
        assert!(!store
            .record_heartbeat(&a.id, "s1", &inv, now)
            .await
            .unwrap());
        let revoked = store.agent(&a.id).await.unwrap().unwrap();
        assert_eq!(revoked.revoked_reason.as_deref(), Some("stolen laptop"));
        let counts = store
            .count_agents(now - Duration::seconds(30), now - Duration::seconds(90))
            .await
            .unwrap();
        assert_eq!(counts.revoked, 1);
        assert_eq!(counts.online, 0);
        let missing = store.revoke_agent("nope", "x", now).await.unwrap_err();
        assert!(matches!(missing, Error::NotFound { .. }));
    }
}

#[tokio::test]
async fn agents_page_in_sql_by_health() {
    for backend in BACKENDS {
        let db = TestDb::new(backend).await;
        let store = db.open().await;
        let now = Utc::now();
        let inv = Inventory::default();
        let mut ids = Vec::new();
        for i in 0..7 {
            let a = enrolled(&store, &format!("page-{i}")).await;
            // 0, 3, 6 online; 1, 4 stale; 2, 5 never seen (offline).
            let seen = match i % 3 {
                0 => Some(now),
                1 => Some(now - Duration::seconds(60)),
                _ => None,
            };
            if let Some(at) = seen {
                assert!(store.record_heartbeat(&a.id, "s1", &inv, at).await.unwrap());
            }
            ids.push(a.id);
        }
        store.revoke_agent(&ids[6], "gone", now).await.unwrap();
        let cut = HealthCut {
            online_since: now - Duration::seconds(30),
            stale_since: now - Duration::seconds(90),
        };
        let (all, total) = store.page_agents(None, cut, 0, 100).await.unwrap();
        assert_eq!(total, 7, "{backend}");
        let order: Vec<_> = all.iter().map(|a| a.id.clone()).collect();
        assert_eq!(order, ids, "{backend}: oldest enrollment first");
        let (page, total) = store.page_agents(None, cut, 5, 5).await.unwrap();
        assert_eq!((page.len(), total), (2, 7), "{backend}");
        assert_eq!(page[0].id, ids[5], "{backend}");
        let st = &store;
        let pick = |h| async move {
            let (rows, total) = st.page_agents(Some(h), cut, 0, 100).await.unwrap();
            assert_eq!(rows.len() as i64, total);
            rows.into_iter().map(|a| a.id).collect::<Vec<_>>()
        };
        assert_eq!(
            pick(AgentHealth::Online).await,
            [ids[0].clone(), ids[3].clone()],
            "{backend}"
        );
        assert_eq!(
            pick(AgentHealth::Stale).await,
            [ids[1].clone(), ids[4].clone()],
            "{backend}"
        );
        assert_eq!(
            pick(AgentHealth::Offline).await,
            [ids[2].clone(), ids[5].clone()],
            "{backend}"
        );
        assert_eq!(
            pick(AgentHealth::Revoked).await,
            [ids[6].clone()],
            "{backend}"
        );
    }
}

#[tokio::test]
async fn labels_and_id_prefixes() {
    for backend in BACKENDS {
        let db = TestDb::new(backend).await;
        let store = db.open().await;
        let a = enrolled(&store, "abcd-1111").await;
        enrolled(&store, "abcd-2222").await;
        store
            .set_agent_labels(&a.id, &labels(&[("env", "prod")]))
            .await
            .unwrap();
        assert_eq!(
            store.agent(&a.id).await.unwrap().unwrap().labels,
            labels(&[("env", "prod")])
        );
        assert_eq!(
            store.resolve_agent_id("abcd-1").await.unwrap(),
            a.id,
            "{backend}"
        );
        assert!(matches!(
            store.resolve_agent_id("abcd").await,
            Err(Error::Ambiguous { .. })
        ));
        assert!(matches!(
            store.resolve_agent_id("ffff").await,
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            store.resolve_agent_id("%").await,
            Err(Error::NotFound { .. })
        ));
    }
}

mod jobs {
    use super::*;
    use crate::jobs::*;
    use drover_proto::jobs::{AttemptResult, JobState, Outcome, RetryPolicy, Stream};
    use drover_proto::sandbox::Sandbox;

    fn result(attempt: &str, outcome: Outcome) -> AttemptResult {
        AttemptResult {
            attempt_id: attempt.to_owned(),
            outcome,
            exit_code: Some(if outcome == Outcome::Succeeded { 0 } else { 1 }),
            signal: None,
            started_at: None,
            finished_at: Utc::now(),
            duration_ms: 5,
            error: None,
            stdout_truncated: false,
            stderr_truncated: false,
            outputs: Default::default(),
            limit_exceeded: None,
        }
    }

    async fn job(store: &Store, agents: &[String], retry: RetryPolicy) -> String {
        true_job(store, agents, &retry, &Sandbox::default_process(), None).await
    }

    /// Results of a job's attempts on two agents recorded at the same
    /// moment: the job ends, whatever the interleaving (on PostgreSQL each
    /// transaction once read the other's attempt as running).
    #[tokio::test]
    async fn concurrent_results_of_one_job_end_it() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let a = enrolled(&store, "a1").await.id;
            let b = enrolled(&store, "b1").await.id;
            for round in 0..15 {
                let id = job(&store, &[a.clone(), b.clone()], RetryPolicy::default()).await;
                let ca = store
                    .claim_attempts(&a, 1, lease(), Utc::now())
                    .await
                    .unwrap();
                let cb = store
                    .claim_attempts(&b, 1, lease(), Utc::now())
                    .await
                    .unwrap();
                let (ra, rb) = (
                    result(&ca[0].attempt_id, Outcome::Succeeded),
                    result(&cb[0].attempt_id, Outcome::Succeeded),
                );
                let (x, y) = tokio::join!(
                    store.record_result(&a, &ra, 0.5, Utc::now()),
                    store.record_result(&b, &rb, 0.5, Utc::now()),
                );
                x.unwrap();
                y.unwrap();
                assert_eq!(
                    store.job(&id).await.unwrap().unwrap().state,
                    JobState::Succeeded,
                    "{backend} round {round}"
                );
            }
        }
    }

    /// An assignment lost on its way (the agent's next poll does not list
    /// it) goes back to the queue; one the agent holds, or has started,
    /// stays.
    #[tokio::test]
    async fn assignments_that_never_arrived_are_queued_again() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let a = enrolled(&store, "a1").await.id;
            let agents = std::slice::from_ref(&a);
            let lost = job(&store, agents, RetryPolicy::default()).await;
            let held = job(&store, agents, RetryPolicy::default()).await;
            let started = job(&store, agents, RetryPolicy::default()).await;
            let claimed = store
                .claim_attempts(&a, 8, lease(), Utc::now())
                .await
                .unwrap();
            assert_eq!(claimed.len(), 3, "{backend}");
            let att = |job: &str| {
                claimed
                    .iter()
                    .find(|c| c.job_id == job)
                    .unwrap()
                    .attempt_id
                    .clone()
            };
            store
                .mark_started(&att(&started), &a, Utc::now(), Utc::now())
                .await
                .unwrap();
            let later = Utc::now() + Duration::milliseconds(5);
            let requeued = store
                .requeue_unreceived(&a, &[att(&held)], later)
                .await
                .unwrap();
            assert_eq!(requeued, vec![(att(&lost), lost.clone())], "{backend}");
            assert_eq!(
                store.job(&lost).await.unwrap().unwrap().state,
                JobState::Queued
            );
            assert_eq!(
                store.job(&held).await.unwrap().unwrap().state,
                JobState::Dispatched
            );
            assert_eq!(
                store.job(&started).await.unwrap().unwrap().state,
                JobState::Running
            );
            // Claimed again, same attempt (no retry used up).
            let again = store.claim_attempts(&a, 8, lease(), later).await.unwrap();
            assert_eq!(again.len(), 1, "{backend}");
            assert_eq!(again[0].attempt_id, att(&lost));
            // Nothing dispatched at or after the poll's start is touched.
            assert!(store
                .requeue_unreceived(&a, &[att(&held)], later)
                .await
                .unwrap()
                .is_empty());
        }
    }

    #[tokio::test]
    async fn dispatch_result_once_and_ownership() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let a = enrolled(&store, "a1").await.id;
            let b = enrolled(&store, "b1").await.id;
            let id = job(&store, std::slice::from_ref(&a), RetryPolicy::default()).await;
            assert!(store
                .claim_attempts(&b, 4, lease(), Utc::now())
                .await
                .unwrap()
                .is_empty());
            let claimed = store
                .claim_attempts(&a, 4, lease(), Utc::now())
                .await
                .unwrap();
            assert_eq!(claimed.len(), 1, "{backend}");
            assert_eq!(claimed[0].argv, ["/bin/true"]);
            // Claimed once only.
            assert!(store
                .claim_attempts(&a, 4, lease(), Utc::now())
                .await
                .unwrap()
                .is_empty());
            assert_eq!(
                store.job(&id).await.unwrap().unwrap().state,
                JobState::Dispatched
            );
            let att = claimed[0].attempt_id.clone();
            assert_eq!(
                store
                    .mark_started(&att, &b, Utc::now(), Utc::now())
                    .await
                    .unwrap(),
                Ownership::Foreign
            );
            assert!(matches!(
                store
                    .mark_started(&att, &a, Utc::now(), Utc::now())
                    .await
                    .unwrap(),
                Ownership::Owned { .. }
            ));
            assert_eq!(
                store.job(&id).await.unwrap().unwrap().state,
                JobState::Running
            );

            let r = result(&att, Outcome::Succeeded);
            assert_eq!(
                store.record_result(&b, &r, 0.5, Utc::now()).await.unwrap(),
                Recorded::Foreign
            );
            assert!(matches!(
                store.record_result(&a, &r, 0.5, Utc::now()).await.unwrap(),
                Recorded::Recorded {
                    retry_agent: None,
                    ..
                }
            ));
            assert!(matches!(
                store.record_result(&a, &r, 0.5, Utc::now()).await.unwrap(),
                Recorded::Duplicate { .. }
            ));
            let done = store.job(&id).await.unwrap().unwrap();
            assert_eq!(done.state, JobState::Succeeded, "{backend}");
            assert!(done.finished_at.is_some());
            assert_eq!(store.attempts(&id).await.unwrap().len(), 1);
            let unknown = store
                .record_result(&a, &result("nope", Outcome::Failed), 0.5, Utc::now())
                .await
                .unwrap();
            assert_eq!(unknown, Recorded::NotFound);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_claim_never_exceeds_its_limit() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let a = enrolled(&store, "a1").await.id;
            for _ in 0..12 {
                job(&store, std::slice::from_ref(&a), RetryPolicy::default()).await;
            }
            let mut total = 0;
            for limit in [3, 1, 5] {
                let got = store
                    .claim_attempts(&a, limit, lease(), Utc::now())
                    .await
                    .unwrap();
                assert_eq!(got.len(), limit as usize, "{backend}: limit {limit}");
                total += got.len();
            }
            let rest = store
                .claim_attempts(&a, 100, lease(), Utc::now())
                .await
                .unwrap();
            assert_eq!(total + rest.len(), 12, "{backend}");
            assert_eq!(store.busy_attempts(&a).await.unwrap(), 12);

            // Concurrent claims (as from several replicas) stay within their
            // limits and never hand out an attempt twice.
            let b = enrolled(&store, "b1").await.id;
            for _ in 0..40 {
                job(&store, std::slice::from_ref(&b), RetryPolicy::default()).await;
            }
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let (store, b) = (store.clone(), b.clone());
                tasks.push(tokio::spawn(async move {
                    let mut mine = Vec::new();
                    for _ in 0..10 {
                        let got = store
                            .claim_attempts(&b, 2, lease(), Utc::now())
                            .await
                            .unwrap();
                        assert!(got.len() <= 2, "claimed {} with limit 2", got.len());
                        mine.extend(got.into_iter().map(|c| c.attempt_id));
                    }
                    mine
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            let n = all.len();
            all.sort();
            all.dedup();
            assert_eq!((n, all.len()), (40, 40), "{backend}");
        }
    }

    #[tokio::test]
    async fn failures_retry_and_leases_expire() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let a = enrolled(&store, "a1").await.id;
            let policy = RetryPolicy {
                max: 1,
                backoff: std::time::Duration::from_millis(10),
                ..RetryPolicy::default()
            };
            let id = job(&store, std::slice::from_ref(&a), policy).await;
            let first = store
                .claim_attempts(&a, 1, lease(), Utc::now())
                .await
                .unwrap();
            let rec = store
                .record_result(
                    &a,
                    &result(&first[0].attempt_id, Outcome::Failed),
                    1.0,
                    Utc::now(),
                )
                .await
                .unwrap();
            assert!(
                matches!(
                    rec,
                    Recorded::Recorded {
                        retry_agent: Some(_),
                        ..
                    }
                ),
                "{backend}: {rec:?}"
            );
            // Back in the queue, awaiting the retry.
            assert_eq!(
                store.job(&id).await.unwrap().unwrap().state,
                JobState::Queued
            );
            assert!(store.next_ready_at(&a).await.unwrap().is_some());
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            // The retry, dispatched with a lease already in the past, is lost.
            let second = store
                .claim_attempts(&a, 1, Utc::now() - Duration::seconds(1), Utc::now())
                .await
                .unwrap();
            assert_eq!(second.len(), 1);
            let expired = store.expire_leases(0.5, Utc::now()).await.unwrap();
            assert_eq!(expired.len(), 1);
            assert!(!expired[0].retried, "out of retries");
            let states: Vec<JobState> = store
                .attempts(&id)
                .await
                .unwrap()
                .iter()
                .map(|a| a.state)
                .collect();
            assert_eq!(states, [JobState::Failed, JobState::Lost]);
            assert_eq!(store.job(&id).await.unwrap().unwrap().state, JobState::Lost);
            // A late result of the lost attempt is kept as information:
            // the attempt stays lost and the job keeps its final state.
            let late = store
                .record_result(
                    &a,
                    &result(&second[0].attempt_id, Outcome::Succeeded),
                    0.5,
                    Utc::now(),
                )
                .await
                .unwrap();
            assert!(matches!(late, Recorded::Late { .. }), "{backend}: {late:?}");
            assert_eq!(store.job(&id).await.unwrap().unwrap().state, JobState::Lost);
            let attempts = store.attempts(&id).await.unwrap();
            let lost = attempts
                .iter()
                .find(|x| x.id == second[0].attempt_id)
                .unwrap();
            assert_eq!(lost.state, JobState::Lost);
            assert_eq!(lost.exit_code, None);
            let kept = lost.late_result.as_ref().expect("late result kept");
            assert_eq!(kept.outcome, Outcome::Succeeded);
            // Reported again (the agent retried): acknowledged, kept once.
            let again = store
                .record_result(
                    &a,
                    &result(&second[0].attempt_id, Outcome::Failed),
                    0.5,
                    Utc::now(),
                )
                .await
                .unwrap();
            assert!(matches!(again, Recorded::Duplicate { .. }), "{again:?}");
            let attempts = store.attempts(&id).await.unwrap();
            let lost = attempts
                .iter()
                .find(|x| x.id == second[0].attempt_id)
                .unwrap();
            assert_eq!(
                lost.late_result.as_ref().unwrap().outcome,
                Outcome::Succeeded
            );
        }
    }

    #[tokio::test]
    async fn cancel_logs_and_audit() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let a = enrolled(&store, "a1").await.id;
            let b = enrolled(&store, "b1").await.id;
            let id = job(&store, &[a.clone(), b.clone()], RetryPolicy::default()).await;
            let running = store
                .claim_attempts(&a, 1, lease(), Utc::now())
                .await
                .unwrap();
            let att = running[0].attempt_id.clone();

            assert_eq!(
                store
                    .append_log(&a, &att, Stream::Stdout, 0, "hello ", 100)
                    .await
                    .unwrap(),
                Appended::Stored { job_id: id.clone() }
            );
            assert_eq!(
                store
                    .append_log(&a, &att, Stream::Stdout, 0, "hello ", 100)
                    .await
                    .unwrap(),
                Appended::Duplicate { job_id: id.clone() }
            );
            assert_eq!(
                store
                    .append_log(&b, &att, Stream::Stdout, 1, "x", 100)
                    .await
                    .unwrap(),
                Appended::Foreign
            );
            assert_eq!(
                store
                    .append_log(&a, &att, Stream::Stdout, 1, &"x".repeat(200), 100)
                    .await
                    .unwrap(),
                Appended::OverCap
            );
            store
                .append_log(&a, &att, Stream::Stderr, 0, "oops", 100)
                .await
                .unwrap();
            let logs = store.logs_after(&id, 0, 10).await.unwrap();
            assert_eq!(logs.len(), 2, "{backend}");
            assert_eq!(
                store.logs_after(&id, logs[0].id, 10).await.unwrap().len(),
                1
            );

            let woken = store
                .cancel_job(&id, "cancelled by admin", Utc::now())
                .await
                .unwrap();
            assert_eq!(woken, vec![a.clone()]);
            let gate = store.gate(&a).await.unwrap();
            assert_eq!(
                store.cancels_for_agent(&a, &gate).await.unwrap(),
                vec![(att.clone(), false)]
            );
            let r = store
                .renew_leases(&a, std::slice::from_ref(&att), lease(), &gate)
                .await
                .unwrap();
            assert!(r.renewed.is_empty() && r.cancel == vec![att.clone()] && r.kill.is_empty());
            store
                .record_result(&a, &result(&att, Outcome::Cancelled), 0.5, Utc::now())
                .await
                .unwrap();
            assert_eq!(
                store.job(&id).await.unwrap().unwrap().state,
                JobState::Cancelled
            );
            assert!(matches!(
                store.cancel_job("nope", "x", Utc::now()).await,
                Err(Error::NotFound { .. })
            ));

            store
                .audit(
                    &AuditEntry {
                        actor: "admin",
                        action: "job.create",
                        target: "job:01ABC",
                        status: 201,
                        outcome: "ok",
                        request: "POST /api/v1/jobs",
                        source: "127.0.0.1",
                        detail: r#"{"action":"echo"}"#,
                    },
                    Utc::now(),
                )
                .await
                .unwrap();
            store
                .audit(
                    &AuditEntry {
                        actor: "bob",
                        action: "token.create",
                        target: "token",
                        status: 403,
                        outcome: "refused",
                        request: "POST /api/v1/tokens",
                        ..AuditEntry::default()
                    },
                    Utc::now(),
                )
                .await
                .unwrap();
            let all = store
                .list_audit(&AuditFilter {
                    limit: 10,
                    ..AuditFilter::default()
                })
                .await
                .unwrap();
            assert_eq!(all.len(), 2);
            assert_eq!(all[0].actor, "bob", "newest first");
            let jobs = store
                .list_audit(&AuditFilter {
                    action: Some("jobs".into()),
                    limit: 10,
                    ..AuditFilter::default()
                })
                .await
                .unwrap();
            assert_eq!(jobs.len(), 1);
            assert_eq!(jobs[0].source.as_deref(), Some("127.0.0.1"));
            assert_eq!(jobs[0].detail.as_deref(), Some(r#"{"action":"echo"}"#));
            // The action's name matches as well as the request.
            let by_name = store
                .list_audit(&AuditFilter {
                    action: Some("job.create".into()),
                    limit: 10,
                    ..AuditFilter::default()
                })
                .await
                .unwrap();
            assert_eq!(by_name.len(), 1);
            // A target by an id prefix; LIKE's wildcards in it are text.
            for (target, want) in [
                ("job:01A", 1),
                ("job:", 1),
                ("token", 1),
                ("job:%", 0),
                ("job_", 0),
            ] {
                let found = store
                    .list_audit(&AuditFilter {
                        target: Some(target.into()),
                        limit: 10,
                        ..AuditFilter::default()
                    })
                    .await
                    .unwrap();
                assert_eq!(found.len(), want, "{target}");
            }
            let bob = store
                .list_audit(&AuditFilter {
                    actor: Some("bob".into()),
                    limit: 10,
                    ..AuditFilter::default()
                })
                .await
                .unwrap();
            assert_eq!(bob[0].status, 403);
        }
    }

    #[tokio::test]
    async fn revoked_agents_attempts_end_lost() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let a = enrolled(&store, "a1").await.id;
            let b = enrolled(&store, "b1").await.id;
            let queued = job(&store, std::slice::from_ref(&a), RetryPolicy::default()).await;
            let both = job(&store, &[a.clone(), b.clone()], RetryPolicy::default()).await;
            store
                .claim_attempts(&a, 1, lease(), Utc::now())
                .await
                .unwrap();
            let changed = store
                .abandon_agent_attempts(&a, "agent revoked: stolen", Utc::now())
                .await
                .unwrap();
            assert_eq!(changed.len(), 2, "{backend}");
            let j = store.job(&queued).await.unwrap().unwrap();
            assert_eq!(j.state, JobState::Lost);
            let atts = store.attempts(&queued).await.unwrap();
            assert_eq!(atts[0].reason.as_deref(), Some("agent revoked: stolen"));
            // The other agent's attempt of the same job is untouched.
            let states: Vec<(String, JobState)> = store
                .attempts(&both)
                .await
                .unwrap()
                .into_iter()
                .map(|x| (x.agent_id, x.state))
                .collect();
            assert!(
                states.contains(&(b.clone(), JobState::Queued)),
                "{states:?}"
            );
            let gate = store.gate(&a).await.unwrap();
            assert!(store.cancels_for_agent(&a, &gate).await.unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn actions_upsert_by_hash() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            assert_eq!(
                store
                    .upsert_action("echo", "{}", "h1", "admin", Utc::now())
                    .await
                    .unwrap(),
                Upsert::Created
            );
            assert_eq!(
                store
                    .upsert_action("echo", "{}", "h1", "admin", Utc::now())
                    .await
                    .unwrap(),
                Upsert::Unchanged
            );
            assert_eq!(
                store
                    .upsert_action("echo", "{\"a\":1}", "h2", "admin", Utc::now())
                    .await
                    .unwrap(),
                Upsert::Updated
            );
            let a = store.action("echo").await.unwrap().unwrap();
            assert_eq!(a.hash, "h2", "{backend}");
            assert_eq!(store.list_actions().await.unwrap().len(), 1);
        }
    }
}

mod workflows {
    use super::*;
    use crate::jobs::NewJob;
    use crate::workflows::*;
    use drover_proto::jobs::RetryPolicy;
    use drover_proto::sandbox::{ProcessSandbox, Sandbox};
    use drover_proto::workflows::{DeliveryAttempt, RunState, TaskState, WebhookEvent};
    use std::collections::BTreeMap;

    static SANDBOX: Sandbox = Sandbox::Process(ProcessSandbox {
        name: String::new(),
        description: String::new(),
        cpu_time: None,
        address_space: None,
        open_files: None,
        processes: None,
        user: None,
    });

    /// Claims due runs now with a lease ending at `until`.
    async fn claim(store: &Store, until: chrono::DateTime<Utc>) -> Vec<String> {
        store.claim_due_runs(Utc::now(), until, 10).await.unwrap()
    }

    /// The engine's end of a pass: sets the next look of a claimed run.
    async fn set_next(
        store: &Store,
        run: &str,
        next: Option<chrono::DateTime<Utc>>,
        claimed: chrono::DateTime<Utc>,
    ) -> Changes {
        let mut tx = store.begin().await.unwrap();
        tx.set_next_check(run, next, claimed).await.unwrap();
        tx.commit().await.unwrap()
    }

    /// A commit that names the run as changed.
    async fn touch(store: &Store, run: &str) {
        let mut tx = store.begin().await.unwrap();
        tx.note(Changes {
            runs: [run.to_owned()].into(),
            ..Changes::default()
        });
        tx.commit().await.unwrap();
    }

    /// Runs a commit changed are due; an engine's claim leases them, so a
    /// second claim gets nothing; its next look never overrides a commit
    /// that marked the run due meanwhile; concurrent claimers share the
    /// runs without taking one twice.
    #[tokio::test]
    async fn due_runs_are_claimed_once() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let now = || Utc::now();
            let lease = |n: i64| Utc::now() + Duration::seconds(n);
            let run = new_run(&store, &["a"]).await;
            let l1 = lease(30);
            assert_eq!(
                claim(&store, l1).await,
                std::slice::from_ref(&run),
                "{backend}"
            );
            assert!(
                claim(&store, lease(30)).await.is_empty(),
                "{backend}: leased"
            );
            // The engine's pass is done: next look in an hour.
            let changes = set_next(&store, &run, Some(lease(3600)), l1).await;
            assert!(
                !changes.runs.contains(&run),
                "{backend}: the engine's own look wakes nobody"
            );
            assert!(claim(&store, lease(30)).await.is_empty(), "{backend}");
            // A commit that changes the run makes it due at once.
            store
                .request_run_cancel(&run, "admin", now())
                .await
                .unwrap();
            let l2 = lease(30);
            assert_eq!(
                claim(&store, l2).await,
                std::slice::from_ref(&run),
                "{backend}"
            );
            set_next(&store, &run, Some(lease(3600)), l2).await;
            // A commit that names the run makes it due again.
            touch(&store, &run).await;
            let l3 = lease(30);
            assert_eq!(
                claim(&store, l3).await,
                std::slice::from_ref(&run),
                "{backend}"
            );
            // Another transaction marks it due while the engine holds it...
            touch(&store, &run).await;
            set_next(&store, &run, None, l3).await;
            // ... so the engine's "never again" did not stick.
            assert_eq!(
                claim(&store, lease(30)).await,
                std::slice::from_ref(&run),
                "{backend}"
            );

            // Concurrent claimers over many due runs: each taken once.
            let mut runs = Vec::new();
            for _ in 0..24 {
                runs.push(new_run(&store, &["a"]).await);
            }
            let mut claimers = tokio::task::JoinSet::new();
            for _ in 0..6 {
                let store = store.clone();
                claimers.spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let got = store
                            .claim_due_runs(Utc::now(), Utc::now() + Duration::seconds(30), 3)
                            .await
                            .unwrap();
                        if got.is_empty() {
                            return mine;
                        }
                        mine.extend(got);
                    }
                });
            }
            let mut all = Vec::new();
            while let Some(got) = claimers.join_next().await {
                all.extend(got.unwrap());
            }
            all.sort();
            runs.sort();
            assert_eq!(all, runs, "{backend}: every due run claimed exactly once");
        }
    }

    async fn new_run(store: &Store, tasks: &[&str]) -> String {
        let tasks: Vec<String> = tasks.iter().map(|t| (*t).to_owned()).collect();
        store
            .create_run(
                NewRun {
                    name: "wf",
                    def_hash: "h1",
                    def_body: "{\"name\":\"wf\"}",
                    inputs: &BTreeMap::from([("v".to_owned(), "1".to_owned())]),
                    created_by: "admin",
                    deadline: None,
                    tasks: &tasks,
                    workspace: false,
                    scope: None,
                    approval: None,
                },
                Utc::now(),
            )
            .await
            .unwrap()
    }

    fn new_job<'a>(
        agents: &'a [String],
        argv: &'a [String],
        env: &'a BTreeMap<String, String>,
        retry: &'a RetryPolicy,
    ) -> NewJob<'a> {
        NewJob {
            action: "true",
            action_hash: "x",
            target: "*",
            params_json: "{}",
            argv,
            env,
            timeout_ms: 1000,
            kill_grace_ms: 100,
            retry,
            created_by: "admin",
            agent_ids: agents,
            artifacts: &[],
            sandbox: &SANDBOX,
            workspace: None,
            approval: None,
        }
    }

    /// Each step happens once however often it is replayed; events are
    /// numbered without gaps; the definition is stored once per hash.
    #[tokio::test]
    async fn steps_happen_once_and_events_have_no_gaps() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let agent = enrolled(&store, "a1").await.id;
            let agents = vec![agent.clone()];
            let (argv, env, retry) = (
                vec!["/bin/true".to_owned()],
                BTreeMap::new(),
                RetryPolicy::default(),
            );
            let run = new_run(&store, &["a", "b"]).await;
            let second = new_run(&store, &["a"]).await;
            assert_eq!(
                store.definition("h1").await.unwrap().as_deref(),
                Some("{\"name\":\"wf\"}")
            );
            assert_eq!(store.active_runs().await.unwrap().len(), 2, "{backend}");

            let job = store
                .start_task(&run, "a", new_job(&agents, &argv, &env, &retry), Utc::now())
                .await
                .unwrap()
                .expect("started");
            // Replayed: no second job.
            assert!(store
                .start_task(&run, "a", new_job(&agents, &argv, &env, &retry), Utc::now())
                .await
                .unwrap()
                .is_none());
            assert_eq!(
                store.run_of_job(&job).await.unwrap().as_deref(),
                Some(run.as_str())
            );
            let tasks = store.run_tasks(&run).await.unwrap();
            assert_eq!(tasks[0].state, TaskState::Queued);
            assert_eq!(tasks[0].job_id.as_deref(), Some(job.as_str()));
            assert!(tasks[0].job_state.is_some());

            let outputs = BTreeMap::from([("image".to_owned(), "app:1".to_owned())]);
            let now = Utc::now();
            assert!(store
                .set_task_state(&run, "a", TaskState::Running, None, None, now)
                .await
                .unwrap());
            assert!(!store
                .set_task_state(&run, "a", TaskState::Running, None, None, now)
                .await
                .unwrap());
            assert!(store
                .set_task_state(&run, "a", TaskState::Succeeded, None, Some(&outputs), now)
                .await
                .unwrap());
            // Final is final.
            assert!(!store
                .set_task_state(&run, "a", TaskState::Failed, Some("late"), None, now)
                .await
                .unwrap());
            assert!(store
                .set_task_state(&run, "b", TaskState::Skipped, Some("needs a"), None, now)
                .await
                .unwrap());
            let tasks = store.run_tasks(&run).await.unwrap();
            assert_eq!(tasks[0].outputs, outputs, "{backend}");
            assert_eq!(tasks[1].state, TaskState::Skipped);

            let delivery = NewDelivery {
                url: "http://127.0.0.1:1/hook".into(),
                secret: Some("s".into()),
                event: WebhookEvent::Completed,
                payload: "{}".into(),
                id: new_id(),
            };
            assert!(store
                .finish_run(
                    &run,
                    RunState::Succeeded,
                    None,
                    std::slice::from_ref(&delivery),
                    WorkspaceEnd::None,
                    now
                )
                .await
                .unwrap());
            assert!(!store
                .finish_run(
                    &run,
                    RunState::Failed,
                    Some("again"),
                    std::slice::from_ref(&delivery),
                    WorkspaceEnd::None,
                    now
                )
                .await
                .unwrap());
            assert_eq!(
                store.run(&run).await.unwrap().unwrap().state,
                RunState::Succeeded
            );
            assert_eq!(
                store.deliveries(Some(&run), 10).await.unwrap().len(),
                1,
                "{backend}"
            );
            assert!(!store.request_run_cancel(&run, "admin", now).await.unwrap());
            assert!(store
                .request_run_cancel(&second, "admin", now)
                .await
                .unwrap());
            assert!(!store
                .request_run_cancel(&second, "admin", now)
                .await
                .unwrap());

            let events = store.events_after(&run, 0, 100).await.unwrap();
            let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
            assert_eq!(ids, (1..=ids.len() as i64).collect::<Vec<_>>(), "{backend}");
            assert!(events.last().unwrap().ends_run());
            let kinds: Vec<(&str, Option<&str>)> = events
                .iter()
                .map(|e| (e.kind.as_str(), e.state.as_deref()))
                .collect();
            assert_eq!(
                kinds,
                vec![
                    ("run", Some("running")),
                    ("task", Some("queued")),
                    ("task", Some("running")),
                    ("task", Some("succeeded")),
                    ("task", Some("skipped")),
                    ("run", Some("succeeded")),
                ],
                "{backend}"
            );
            assert_eq!(store.events_after(&run, 4, 100).await.unwrap().len(), 2);
            // The other run's stream is its own.
            assert_eq!(store.events_after(&second, 0, 100).await.unwrap().len(), 2);
        }
    }

    /// A delivery moves on with every attempt: retry, then delivered; the
    /// history keeps each attempt. Artifacts are recorded per attempt and
    /// path.
    #[tokio::test]
    async fn deliveries_and_artifacts() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let run = new_run(&store, &["a"]).await;
            let id = new_id();
            let now = Utc::now();
            store
                .finish_run(
                    &run,
                    RunState::Failed,
                    Some("x"),
                    &[NewDelivery {
                        url: "http://127.0.0.1:1/h".into(),
                        secret: None,
                        event: WebhookEvent::Failed,
                        payload: "{\"a\":1}".into(),
                        id: id.clone(),
                    }],
                    WorkspaceEnd::None,
                    now,
                )
                .await
                .unwrap();
            let due = store.due_deliveries(now, 10).await.unwrap();
            assert_eq!(due.len(), 1, "{backend}");
            let attempt = |status| DeliveryAttempt {
                at: now,
                status,
                error: None,
                duration_ms: 3,
            };
            let later = now + Duration::seconds(60);
            store
                .record_delivery_attempt(&id, &attempt(Some(500)), &DeliveryOutcome::RetryAt(later))
                .await
                .unwrap();
            assert!(store.due_deliveries(now, 10).await.unwrap().is_empty());
            assert_eq!(
                store
                    .next_delivery_at()
                    .await
                    .unwrap()
                    .map(|t| t.timestamp()),
                Some(later.timestamp())
            );
            store
                .record_delivery_attempt(&id, &attempt(Some(200)), &DeliveryOutcome::Delivered)
                .await
                .unwrap();
            // Once delivered, nothing more is recorded.
            store
                .record_delivery_attempt(&id, &attempt(Some(200)), &DeliveryOutcome::Delivered)
                .await
                .unwrap();
            let d = &store.deliveries(None, 10).await.unwrap()[0];
            assert_eq!(
                (d.state.as_str(), d.attempts, d.history.len()),
                ("delivered", 2, 2),
                "{backend}"
            );
            assert_eq!(d.history[0].status, Some(500));

            let hook = store
                .create_webhook(
                    "http://127.0.0.1:1/g",
                    "secret-0123456789",
                    &[WebhookEvent::Completed],
                    "admin",
                    now,
                )
                .await
                .unwrap();
            assert_eq!(
                store.list_webhooks().await.unwrap()[0].events,
                vec![WebhookEvent::Completed]
            );
            assert!(store.delete_webhook(&hook).await.unwrap());
            assert!(!store.delete_webhook(&hook).await.unwrap());

            let mut art = ArtifactRecord {
                id: new_id(),
                run_id: Some(run.clone()),
                task_id: Some("a".into()),
                job_id: "j".into(),
                attempt_id: "att".into(),
                path: "out/x.txt".into(),
                size: 3,
                sha256: "aa".into(),
                store_key: "runs/r/a/att/out/x.txt".into(),
                created_at: 1,
            };
            store.record_artifact(&art).await.unwrap();
            art.id = new_id();
            art.size = 4;
            art.sha256 = "bb".into();
            store.record_artifact(&art).await.unwrap();
            let list = store.run_artifacts(&run).await.unwrap();
            assert_eq!(list.len(), 1, "{backend}: one record per attempt and path");
            assert_eq!((list[0].size, list[0].sha256.as_str()), (4, "bb"));
        }
    }

    /// A page of runs: newest first, filtered by state and workflow name
    /// in SQL, with the total that matches and each run's task counts.
    #[tokio::test]
    async fn runs_are_paged_and_filtered_in_sql() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let t0 = Utc::now();
            let mut ids = Vec::new();
            // Five runs: deploy x3, build x2, one second apart.
            for (i, name) in ["deploy", "build", "deploy", "build", "deploy"]
                .into_iter()
                .enumerate()
            {
                let tasks = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
                let id = store
                    .create_run(
                        NewRun {
                            name,
                            def_hash: "h1",
                            def_body: "{}",
                            inputs: &BTreeMap::new(),
                            created_by: "admin",
                            deadline: None,
                            tasks: &tasks,
                            workspace: false,
                            scope: None,
                            approval: None,
                        },
                        t0 + Duration::seconds(i as i64),
                    )
                    .await
                    .unwrap();
                ids.push(id);
            }
            // The second deploy ran one task and failed.
            store
                .set_task_state(&ids[2], "a", TaskState::Succeeded, None, None, t0)
                .await
                .unwrap();
            store
                .finish_run(
                    &ids[2],
                    RunState::Failed,
                    Some("x"),
                    &[],
                    WorkspaceEnd::None,
                    t0,
                )
                .await
                .unwrap();

            let all = RunFilter::default();
            let (page, total) = store.page_runs(&all, 0, 2).await.unwrap();
            assert_eq!(total, 5, "{backend}");
            let got: Vec<&str> = page.iter().map(|r| r.run.id.as_str()).collect();
            assert_eq!(
                got,
                [ids[4].as_str(), ids[3].as_str()],
                "{backend}: newest first"
            );
            let (page, total) = store.page_runs(&all, 4, 2).await.unwrap();
            assert_eq!((page.len(), total), (1, 5), "{backend}: the last page");
            assert_eq!(page[0].run.id, ids[0], "{backend}");
            let (page, total) = store.page_runs(&all, 10, 2).await.unwrap();
            assert_eq!((page.len(), total), (0, 5), "{backend}: past the end");

            let deploys = RunFilter {
                name: Some("deploy"),
                ..RunFilter::default()
            };
            let (page, total) = store.page_runs(&deploys, 1, 10).await.unwrap();
            assert_eq!(total, 3, "{backend}");
            let got: Vec<&str> = page.iter().map(|r| r.run.id.as_str()).collect();
            assert_eq!(got, [ids[2].as_str(), ids[0].as_str()], "{backend}");
            assert_eq!(
                (page[0].tasks_done, page[0].tasks_total),
                (1, 3),
                "{backend}"
            );
            assert_eq!(
                (page[1].tasks_done, page[1].tasks_total),
                (0, 3),
                "{backend}"
            );

            let failed = RunFilter {
                state: Some(RunState::Failed),
                ..RunFilter::default()
            };
            let (page, total) = store.page_runs(&failed, 0, 10).await.unwrap();
            assert_eq!(total, 1, "{backend}");
            assert_eq!(page[0].run.id, ids[2], "{backend}");
            assert_eq!(page[0].run.state, RunState::Failed, "{backend}");
            let both = RunFilter {
                state: Some(RunState::Failed),
                name: Some("build"),
            };
            let (page, total) = store.page_runs(&both, 0, 10).await.unwrap();
            assert_eq!((page.len(), total), (0, 0), "{backend}");
            let running = RunFilter {
                state: Some(RunState::Running),
                name: Some("build"),
            };
            assert_eq!(
                store.page_runs(&running, 0, 10).await.unwrap().1,
                2,
                "{backend}"
            );

            // The latest event's number: one per created run, one per
            // task change, one for the end.
            let seq = store.run_event_seq(&ids[2]).await.unwrap().unwrap();
            let events = store.events_after(&ids[2], 0, 100).await.unwrap();
            assert_eq!(events.last().map(|e| e.id), Some(seq), "{backend}");
            assert_eq!(
                store.run_event_seq("nope").await.unwrap(),
                None,
                "{backend}"
            );
        }
    }
}

mod fleet {
    use super::*;
    use crate::fleet::*;
    use crate::jobs::*;
    use crate::workflows::*;
    use drover_proto::api::DispatchState;
    use drover_proto::jobs::{AttemptResult, JobState, Outcome, RetryPolicy};
    use drover_proto::sandbox::{LimitExceeded, Sandbox, WorkspaceSpec};
    use drover_proto::workflows::{RunState, WorkspaceState};
    use std::collections::BTreeMap;

    fn docker_sandbox() -> Sandbox {
        serde_json::from_value(serde_json::json!({
            "type": "docker", "name": "tight", "image": "busybox", "memory": "64m"
        }))
        .unwrap()
    }

    async fn job_with(
        store: &Store,
        agents: &[String],
        sandbox: &Sandbox,
        workspace: Option<&WorkspaceSpec>,
    ) -> String {
        true_job(store, agents, &RetryPolicy::default(), sandbox, workspace).await
    }

    async fn claim(store: &Store, agent: &str) -> Vec<Claimed> {
        store
            .claim_attempts(agent, 10, lease(), Utc::now())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn sandboxes_upsert_by_hash_and_jobs_keep_theirs() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let now = Utc::now();
            let json = serde_json::to_string(&docker_sandbox()).unwrap();
            let up = |h: &'static str| {
                let store = &store;
                let json = json.clone();
                async move {
                    store
                        .upsert_sandbox("tight", &json, h, "admin", now)
                        .await
                        .unwrap()
                }
            };
            assert_eq!(up("h1").await, Upsert::Created, "{backend}");
            assert_eq!(up("h1").await, Upsert::Unchanged);
            assert_eq!(up("h2").await, Upsert::Updated);
            assert_eq!(store.list_sandboxes().await.unwrap().len(), 1);
            assert_eq!(store.sandbox("tight").await.unwrap().unwrap().hash, "h2");
            assert!(store.sandbox("nope").await.unwrap().is_none());

            // A job keeps the resolved profile and workspace it was made with.
            let a = enrolled(&store, "a1").await.id;
            let ws = WorkspaceSpec {
                id: "run-1".into(),
                sandbox: docker_sandbox(),
                git: None,
            };
            let id = job_with(
                &store,
                std::slice::from_ref(&a),
                &docker_sandbox(),
                Some(&ws),
            )
            .await;
            let job = store.job(&id).await.unwrap().unwrap();
            assert_eq!(job.sandbox, docker_sandbox());
            assert_eq!(job.workspace.as_ref(), Some(&ws));
            let claimed = claim(&store, &a).await;
            assert_eq!(claimed[0].sandbox, docker_sandbox(), "{backend}");
            assert_eq!(claimed[0].workspace.as_ref(), Some(&ws));

            // The limit that stopped an attempt is kept with it.
            let result = AttemptResult {
                attempt_id: claimed[0].attempt_id.clone(),
                outcome: Outcome::Failed,
                exit_code: Some(137),
                signal: Some(9),
                started_at: None,
                finished_at: Utc::now(),
                duration_ms: 5,
                error: Some("killed: exceeded its memory limit of 64m".into()),
                stdout_truncated: false,
                stderr_truncated: false,
                outputs: Default::default(),
                limit_exceeded: Some(LimitExceeded::Memory),
            };
            store
                .record_result(&a, &result, 0.5, Utc::now())
                .await
                .unwrap();
            let attempts = store.attempts(&id).await.unwrap();
            assert_eq!(attempts[0].limit_exceeded, Some(LimitExceeded::Memory));
            assert_eq!(attempts[0].state, JobState::Failed);
        }
    }

    /// A drained agent gets no new work but keeps what it runs; resumed,
    /// it gets the work that waited.
    #[tokio::test]
    async fn drained_agents_get_no_new_work() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let a = enrolled(&store, "a1").await.id;
            let running = job_with(
                &store,
                std::slice::from_ref(&a),
                &Sandbox::default_process(),
                None,
            )
            .await;
            let held = claim(&store, &a).await;
            assert_eq!(held.len(), 1);
            store
                .set_agent_dispatch(&a, DispatchState::Draining, Some("drained by admin"))
                .await
                .unwrap();
            let rec = store.agent(&a).await.unwrap().unwrap();
            assert_eq!(rec.dispatch, DispatchState::Draining, "{backend}");
            assert_eq!(rec.dispatch_reason.as_deref(), Some("drained by admin"));
            let waiting = job_with(
                &store,
                std::slice::from_ref(&a),
                &Sandbox::default_process(),
                None,
            )
            .await;
            assert!(
                claim(&store, &a).await.is_empty(),
                "{backend}: claimed while draining"
            );
            let gate = store.gate(&a).await.unwrap();
            assert!(!gate.stopping());
            // What runs is neither cancelled nor cut off from its lease.
            assert!(store.cancels_for_agent(&a, &gate).await.unwrap().is_empty());
            let r = store
                .renew_leases(
                    &a,
                    std::slice::from_ref(&held[0].attempt_id),
                    lease(),
                    &gate,
                )
                .await
                .unwrap();
            assert_eq!(r.renewed, vec![held[0].attempt_id.clone()]);
            assert_eq!(
                store.job(&running).await.unwrap().unwrap().state,
                JobState::Dispatched
            );

            store
                .set_agent_dispatch(&a, DispatchState::Active, None)
                .await
                .unwrap();
            let now_claimed = claim(&store, &a).await;
            assert_eq!(now_claimed.len(), 1);
            assert_eq!(now_claimed[0].job_id, waiting);
            assert!(matches!(
                store
                    .set_agent_dispatch("nope", DispatchState::Draining, None)
                    .await,
                Err(Error::NotFound { .. })
            ));
        }
    }

    /// A stopped agent's attempts are told to stop (killed at once when
    /// forced), also one it was given after the stop was marked, and its
    /// queued work waits.
    #[tokio::test]
    async fn stopping_an_agent_cancels_what_it_runs() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let a = enrolled(&store, "a1").await.id;
            let b = enrolled(&store, "b1").await.id;
            let on_a = job_with(
                &store,
                std::slice::from_ref(&a),
                &Sandbox::default_process(),
                None,
            )
            .await;
            let on_b = job_with(
                &store,
                std::slice::from_ref(&b),
                &Sandbox::default_process(),
                None,
            )
            .await;
            let att_a = claim(&store, &a).await[0].attempt_id.clone();
            let att_b = claim(&store, &b).await[0].attempt_id.clone();
            let queued = job_with(
                &store,
                std::slice::from_ref(&a),
                &Sandbox::default_process(),
                None,
            )
            .await;

            let stopped = store
                .stop_agent(&a, false, "stopped by admin")
                .await
                .unwrap();
            assert_eq!(
                stopped.attempts,
                vec![(att_a.clone(), a.clone(), on_a.clone())],
                "{backend}"
            );
            let gate = store.gate(&a).await.unwrap();
            assert!(gate.stopping() && !gate.killing());
            assert_eq!(
                store.cancels_for_agent(&a, &gate).await.unwrap(),
                vec![(att_a.clone(), false)]
            );
            // The other agent is untouched.
            let gate_b = store.gate(&b).await.unwrap();
            assert!(store
                .cancels_for_agent(&b, &gate_b)
                .await
                .unwrap()
                .is_empty());
            assert_eq!(
                store.job(&on_b).await.unwrap().unwrap().state,
                JobState::Dispatched
            );
            // Its queued work waits, unclaimed and not cancelled.
            assert!(claim(&store, &a).await.is_empty());
            assert_eq!(
                store.job(&queued).await.unwrap().unwrap().state,
                JobState::Queued
            );
            let _ = att_b;

            // Forced: killed at once.
            store
                .stop_agent(&a, true, "stopped by admin (forced)")
                .await
                .unwrap();
            let gate = store.gate(&a).await.unwrap();
            assert!(gate.killing());
            let r = store
                .renew_leases(&a, std::slice::from_ref(&att_a), lease(), &gate)
                .await
                .unwrap();
            assert!(r.renewed.is_empty());
            assert_eq!(r.cancel, vec![att_a.clone()]);
            assert_eq!(r.kill, vec![att_a.clone()]);

            // An attempt it holds without the marking (claimed in a race
            // with the stop) is still told to stop while the flag is up.
            store
                .set_agent_dispatch(&a, DispatchState::Active, None)
                .await
                .unwrap();
            let late = claim(&store, &a).await[0].attempt_id.clone();
            store
                .set_agent_dispatch(&a, DispatchState::Stopped, Some("stopped"))
                .await
                .unwrap();
            let gate = store.gate(&a).await.unwrap();
            let cancels = store.cancels_for_agent(&a, &gate).await.unwrap();
            assert!(
                cancels.contains(&(late.clone(), false)),
                "{backend}: {cancels:?}"
            );
        }
    }

    /// The emergency stop pauses dispatch on every agent and stops every
    /// attempt; resuming lets the queued work go.
    #[tokio::test]
    async fn fleet_stop_pauses_everything_until_resumed() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let a = enrolled(&store, "a1").await.id;
            let b = enrolled(&store, "b1").await.id;
            job_with(
                &store,
                &[a.clone(), b.clone()],
                &Sandbox::default_process(),
                None,
            )
            .await;
            let att_a = claim(&store, &a).await[0].attempt_id.clone();
            let att_b = claim(&store, &b).await[0].attempt_id.clone();
            let queued = job_with(
                &store,
                &[a.clone(), b.clone()],
                &Sandbox::default_process(),
                None,
            )
            .await;
            assert_eq!(store.fleet().await.unwrap(), FleetRecord::default());

            let stopped = store
                .stop_fleet("admin", true, "emergency stop by admin", Utc::now())
                .await
                .unwrap();
            assert_eq!(stopped.attempts.len(), 2, "{backend}");
            assert_eq!(stopped.agents(), {
                let mut v = vec![a.clone(), b.clone()];
                v.sort();
                v
            });
            let fleet = store.fleet().await.unwrap();
            assert!(fleet.stopped_at.is_some() && fleet.force);
            assert_eq!(fleet.stopped_by.as_deref(), Some("admin"));
            for (agent, att) in [(&a, &att_a), (&b, &att_b)] {
                let gate = store.gate(agent).await.unwrap();
                assert!(gate.stopping() && gate.killing());
                assert_eq!(
                    store.cancels_for_agent(agent, &gate).await.unwrap(),
                    vec![(att.clone(), true)]
                );
                assert!(
                    claim(&store, agent).await.is_empty(),
                    "{backend}: claimed while stopped"
                );
            }
            // A second, graceful stop keeps the first time and the force.
            let first = fleet.stopped_at;
            store
                .stop_fleet("admin", false, "again", Utc::now())
                .await
                .unwrap();
            let again = store.fleet().await.unwrap();
            assert_eq!(again.stopped_at, first);
            assert!(again.force);

            store.resume_fleet().await.unwrap();
            assert_eq!(store.fleet().await.unwrap(), FleetRecord::default());
            assert_eq!(claim(&store, &a).await[0].job_id, queued);
            assert_eq!(claim(&store, &b).await[0].job_id, queued);
            let by_dispatch = store.count_agents_by_dispatch().await.unwrap();
            assert_eq!(by_dispatch, vec![("active".to_owned(), 2)]);
        }
    }

    /// A run's workspace: pending → creating (with its job, once) → ready
    /// → removing (queued with the run's end) → removed; kept ones can be
    /// removed later; every step is an event of the run.
    #[tokio::test]
    async fn workspace_lifecycle_steps_happen_once() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let a = enrolled(&store, "a1").await.id;
            let tasks = vec!["t".to_owned()];
            let new_run = |workspace| {
                let store = &store;
                let tasks = &tasks;
                async move {
                    store
                        .create_run(
                            NewRun {
                                name: "wf",
                                def_hash: "h1",
                                def_body: "{}",
                                inputs: &BTreeMap::new(),
                                created_by: "admin",
                                deadline: None,
                                tasks,
                                workspace,
                                scope: None,
                                approval: None,
                            },
                            Utc::now(),
                        )
                        .await
                        .unwrap()
                }
            };
            let plain = new_run(false).await;
            assert_eq!(
                store.run(&plain).await.unwrap().unwrap().workspace_state,
                None
            );
            let run = new_run(true).await;
            assert_eq!(
                store.run(&run).await.unwrap().unwrap().workspace_state,
                Some(WorkspaceState::Pending)
            );
            let ws = WorkspaceSpec {
                id: run.clone(),
                sandbox: Sandbox::default_process(),
                git: None,
            };
            let argv = vec![drover_proto::sandbox::BUILTIN_WORKSPACE_CREATE.to_owned()];
            let env = BTreeMap::new();
            let retry = RetryPolicy::default();
            let agents = vec![a.clone()];
            let job = |argv| NewJob {
                action: "workspace",
                action_hash: "builtin",
                target: &a,
                params_json: "{}",
                argv,
                env: &env,
                timeout_ms: 1000,
                kill_grace_ms: 100,
                retry: &retry,
                created_by: "admin",
                agent_ids: &agents,
                artifacts: &[],
                sandbox: &ws.sandbox,
                workspace: Some(&ws),
                approval: None,
            };
            let now = Utc::now();
            let created = store
                .start_workspace(&run, &a, job(&argv), now)
                .await
                .unwrap()
                .expect("started");
            assert!(store
                .start_workspace(&run, &a, job(&argv), now)
                .await
                .unwrap()
                .is_none());
            let rec = store.run(&run).await.unwrap().unwrap();
            assert_eq!(
                rec.workspace_state,
                Some(WorkspaceState::Creating),
                "{backend}"
            );
            assert_eq!(rec.workspace_agent.as_deref(), Some(a.as_str()));
            assert_eq!(rec.workspace_job.as_deref(), Some(created.as_str()));
            // The job belongs to the run (its changes wake the engine).
            assert_eq!(
                store.run_of_job(&created).await.unwrap().as_deref(),
                Some(run.as_str())
            );

            assert!(store
                .set_workspace_state(
                    &run,
                    &[WorkspaceState::Creating],
                    WorkspaceState::Ready,
                    None,
                    now
                )
                .await
                .unwrap());
            assert!(!store
                .set_workspace_state(
                    &run,
                    &[WorkspaceState::Creating],
                    WorkspaceState::Failed,
                    Some("x"),
                    now
                )
                .await
                .unwrap());

            let remove_argv = vec![drover_proto::sandbox::BUILTIN_WORKSPACE_REMOVE.to_owned()];
            assert!(store
                .finish_run(
                    &run,
                    RunState::Succeeded,
                    None,
                    &[],
                    WorkspaceEnd::Remove(job(&remove_argv)),
                    now
                )
                .await
                .unwrap());
            let rec = store.run(&run).await.unwrap().unwrap();
            assert_eq!(rec.workspace_state, Some(WorkspaceState::Removing));
            let remove_job = rec.workspace_remove_job.clone().expect("remove job");
            assert_eq!(
                store.job(&remove_job).await.unwrap().unwrap().argv,
                remove_argv
            );
            // Ended, but still swept until the workspace is gone.
            assert!(store.active_runs().await.unwrap().contains(&run));
            assert!(store
                .set_workspace_state(
                    &run,
                    &[WorkspaceState::Removing],
                    WorkspaceState::Removed,
                    Some("job ok"),
                    now
                )
                .await
                .unwrap());
            assert!(!store.active_runs().await.unwrap().contains(&run));
            // Nothing to remove any more.
            assert!(store
                .remove_workspace(&run, job(&remove_argv), now)
                .await
                .unwrap()
                .is_none());

            // Kept: stays until asked for.
            let kept = new_run(true).await;
            store
                .set_workspace_state(
                    &kept,
                    &[WorkspaceState::Pending],
                    WorkspaceState::Ready,
                    None,
                    now,
                )
                .await
                .unwrap();
            store
                .finish_run(
                    &kept,
                    RunState::Failed,
                    Some("x"),
                    &[],
                    WorkspaceEnd::Keep,
                    now,
                )
                .await
                .unwrap();
            assert_eq!(
                store.run(&kept).await.unwrap().unwrap().workspace_state,
                Some(WorkspaceState::Kept)
            );
            assert!(!store.active_runs().await.unwrap().contains(&kept));
            let later = store
                .remove_workspace(&kept, job(&remove_argv), now)
                .await
                .unwrap();
            assert!(later.is_some());
            assert_eq!(
                store.run(&kept).await.unwrap().unwrap().workspace_state,
                Some(WorkspaceState::Removing)
            );

            // Never created: nothing to remove.
            let early = new_run(true).await;
            store
                .finish_run(
                    &early,
                    RunState::Cancelled,
                    Some("x"),
                    &[],
                    WorkspaceEnd::NeverCreated,
                    now,
                )
                .await
                .unwrap();
            assert_eq!(
                store.run(&early).await.unwrap().unwrap().workspace_state,
                Some(WorkspaceState::Removed)
            );

            let kinds: Vec<(String, Option<String>)> = store
                .events_after(&run, 0, 100)
                .await
                .unwrap()
                .into_iter()
                .filter(|e| e.kind == "workspace")
                .map(|e| (e.kind, e.state))
                .collect();
            let states: Vec<&str> = kinds.iter().filter_map(|(_, s)| s.as_deref()).collect();
            assert_eq!(
                states,
                ["creating", "ready", "removing", "removed"],
                "{backend}"
            );
        }
    }
}

/// The transaction a caller holds: steps compose, a dropped one leaves
/// nothing, commits say what changed, and SQLite groups concurrent commits.
mod tx {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::jobs::{AuditEntry, AuditFilter};

    fn entry(actor: &str) -> AuditEntry<'_> {
        AuditEntry {
            actor,
            action: "test.create",
            target: "t",
            status: 200,
            outcome: "ok",
            request: "POST /test",
            ..AuditEntry::default()
        }
    }

    async fn actors(store: &Store) -> Vec<String> {
        let mut a: Vec<String> = store
            .list_audit(&AuditFilter {
                limit: 1000,
                ..AuditFilter::default()
            })
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.actor)
            .collect();
        a.sort();
        a
    }

    #[tokio::test]
    async fn a_dropped_transaction_leaves_nothing_and_the_next_commits() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            {
                let mut tx = store.begin().await.unwrap();
                tx.audit(&entry("dropped"), Utc::now()).await.unwrap();
                // Dropped here without a commit.
            }
            let mut tx = store.begin().await.unwrap();
            tx.audit(&entry("kept-1"), Utc::now()).await.unwrap();
            tx.audit(&entry("kept-2"), Utc::now()).await.unwrap();
            tx.commit().await.unwrap();
            let mut tx = store.begin().await.unwrap();
            tx.audit(&entry("rolled-back"), Utc::now()).await.unwrap();
            tx.rollback().await.unwrap();
            assert_eq!(actors(&store).await, ["kept-1", "kept-2"], "{backend}");
        }
    }

    #[tokio::test]
    async fn commit_returns_what_changed_and_tells_the_hook() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let a1 = enrolled(&store, "agent-1").await.id;
            let a2 = enrolled(&store, "agent-2").await.id;
            let heard: Arc<Mutex<Vec<Changes>>> = Arc::default();
            store.on_commit({
                let heard = heard.clone();
                Arc::new(move |c| heard.lock().unwrap().push(c.clone()))
            });
            let job = true_job(
                &store,
                &[a1.clone(), a2.clone()],
                &drover_proto::jobs::RetryPolicy::default(),
                &drover_proto::sandbox::Sandbox::default_process(),
                None,
            )
            .await;
            let heard = heard.lock().unwrap().clone();
            assert_eq!(heard.len(), 1, "{backend}: {heard:?}");
            assert!(heard[0].jobs.contains(&job), "{backend}: {heard:?}");
            assert_eq!(
                heard[0].agents.iter().cloned().collect::<Vec<_>>(),
                [a1, a2],
                "{backend}"
            );
            assert!(
                heard[0].runs.is_empty() && !heard[0].all_agents,
                "{backend}"
            );
            // A commit that changed nothing tells nobody.
            let tx = store.begin().await.unwrap();
            assert!(tx.commit().await.unwrap().is_empty(), "{backend}");
        }
    }

    #[tokio::test]
    async fn concurrent_commits_all_land_and_share_syncs_on_sqlite() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let before = store.stats();
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..40 {
                let store = store.clone();
                tasks.spawn(async move {
                    let actor = format!("writer-{i:02}");
                    let mut tx = store.begin().await.unwrap();
                    tx.audit(&entry(&actor), Utc::now()).await.unwrap();
                    // Every fourth one gives up: it must take nothing of
                    // the others with it.
                    if i % 4 == 3 {
                        drop(tx);
                    } else {
                        tx.commit().await.unwrap();
                    }
                });
            }
            while let Some(joined) = tasks.join_next().await {
                joined.unwrap();
            }
            let expected: Vec<String> = (0..40)
                .filter(|i| i % 4 != 3)
                .map(|i| format!("writer-{i:02}"))
                .collect();
            // A dropped transaction is rolled back by a task of its own:
            // give it a moment before reading.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            assert_eq!(actors(&store).await, expected, "{backend}");
            let after = store.stats();
            assert_eq!(after.commits - before.commits, 30, "{backend}");
            assert_eq!(after.commit_failures, 0, "{backend}");
            if backend == Backend::Sqlite {
                assert!(
                    after.syncs - before.syncs < 30,
                    "30 concurrent commits took {} syncs: none was grouped",
                    after.syncs - before.syncs
                );
            }
        }
    }
}

/// The dashboard's pages: pending and decided requests a page at a time,
/// the audit log a page at a time (keyset by id).
mod pages {
    use super::*;
    use crate::approvals::NewApproval;
    use crate::jobs::{AuditEntry, AuditFilter};
    use drover_proto::approvals::ApprovalState;

    #[tokio::test]
    async fn approvals_are_paged_pending_apart_from_decided() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let agent = enrolled(&store, "a1").await.id;
            let argv = vec!["/bin/true".to_owned()];
            let sandbox = drover_proto::sandbox::Sandbox::default_process();
            let retry = drover_proto::jobs::RetryPolicy::default();
            let reasons = vec!["action 'true' is protected (true)".to_owned()];
            let mut jobs = Vec::new();
            for _ in 0..3 {
                let id = store
                    .create_job(
                        crate::jobs::NewJob {
                            action: "true",
                            action_hash: "h",
                            target: "*",
                            params_json: "{}",
                            argv: &argv,
                            env: &std::collections::BTreeMap::new(),
                            timeout_ms: 1000,
                            kill_grace_ms: 100,
                            retry: &retry,
                            created_by: "alice",
                            agent_ids: std::slice::from_ref(&agent),
                            artifacts: &[],
                            sandbox: &sandbox,
                            workspace: None,
                            approval: Some(&NewApproval {
                                spec_hash: "x",
                                spec: "{}",
                                reasons: &reasons,
                                approvers_needed: 1,
                                requested_by: "alice",
                                expires_at: Utc::now() + Duration::hours(1),
                            }),
                        },
                        Utc::now(),
                    )
                    .await
                    .unwrap();
                jobs.push(id);
            }
            let first = store.approval_of(&jobs[0]).await.unwrap().unwrap();
            assert_eq!(
                store
                    .reject(&first.id, "bob", "no", Utc::now())
                    .await
                    .unwrap(),
                None
            );
            let (page, total) = store.page_approvals(true, 0, 1).await.unwrap();
            assert_eq!((page.len(), total), (1, 2), "{backend}");
            assert_eq!(page[0].state, ApprovalState::Pending);
            let (rest, _) = store.page_approvals(true, 1, 10).await.unwrap();
            assert_eq!(rest.len(), 1);
            assert_ne!(rest[0].id, page[0].id, "{backend}: pages do not overlap");
            let (decided, total) = store.page_approvals(false, 0, 10).await.unwrap();
            assert_eq!(total, 1, "{backend}");
            assert_eq!(decided[0].id, first.id);
            assert_eq!(decided[0].state, ApprovalState::Rejected);
        }
    }

    #[tokio::test]
    async fn the_audit_log_is_paged_by_id() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            for i in 0..5 {
                let target = format!("job:{i}");
                store
                    .audit(
                        &AuditEntry {
                            actor: if i % 2 == 0 { "alice" } else { "bob" },
                            action: "job.create",
                            target: &target,
                            status: 201,
                            outcome: "ok",
                            ..AuditEntry::default()
                        },
                        Utc::now(),
                    )
                    .await
                    .unwrap();
            }
            let page = |before, actor: Option<&str>| {
                let store = &store;
                let actor = actor.map(str::to_owned);
                async move {
                    store
                        .list_audit(&AuditFilter {
                            actor,
                            before,
                            limit: 2,
                            ..AuditFilter::default()
                        })
                        .await
                        .unwrap()
                        .into_iter()
                        .map(|r| r.target)
                        .collect::<Vec<_>>()
                }
            };
            assert_eq!(page(None, None).await, ["job:4", "job:3"], "{backend}");
            let all = store
                .list_audit(&AuditFilter {
                    limit: 10,
                    ..AuditFilter::default()
                })
                .await
                .unwrap();
            let third = all[2].id;
            assert_eq!(page(Some(third), None).await, ["job:1", "job:0"]);
            assert_eq!(
                page(Some(third), Some("alice")).await,
                ["job:0"],
                "{backend}: filters hold across pages"
            );
        }
    }
}

#[tokio::test]
async fn script_versions_are_immutable_and_found_by_prefix() {
    use crate::scripts::NewScript;
    for backend in BACKENDS {
        let db = TestDb::new(backend).await;
        let store = db.open().await;
        let t0 = Utc::now();
        let add = |sha: &'static str, content: &'static str, at| NewScript {
            name: "motd",
            sha256: sha,
            content,
            interpreter: "/bin/sh",
            by: "ada",
            now: at,
        };
        let mut tx = store.begin().await.unwrap();
        let (v1, new) = tx
            .add_script(&add("aaaa1111", "echo one\n", t0))
            .await
            .unwrap();
        assert!(new, "{backend}");
        assert_eq!(v1.size, 9);
        // The same content again: the version there is, unchanged.
        let (again, new) = tx
            .add_script(&add("aaaa1111", "echo one\n", t0 + Duration::seconds(5)))
            .await
            .unwrap();
        assert!(!new, "{backend}");
        assert_eq!(again, v1, "{backend}");
        tx.add_script(&add("aaaa2222", "echo two\n", t0 + Duration::seconds(1)))
            .await
            .unwrap();
        tx.commit().await.unwrap();

        let versions = store.script_versions("motd").await.unwrap();
        let hashes: Vec<_> = versions.iter().map(|v| v.sha256.as_str()).collect();
        assert_eq!(hashes, ["aaaa2222", "aaaa1111"], "{backend}: newest first");
        let listed = store.list_scripts().await.unwrap();
        assert_eq!(listed.len(), 1, "{backend}");
        assert_eq!((listed[0].0.sha256.as_str(), listed[0].1), ("aaaa2222", 2));
        assert_eq!(
            store.resolve_script_version("motd", "aaaa2").await.unwrap(),
            "aaaa2222"
        );
        assert!(matches!(
            store.resolve_script_version("motd", "aaaa").await,
            Err(Error::Ambiguous { .. })
        ));
        assert!(matches!(
            store.resolve_script_version("motd", "bbbb").await,
            Err(Error::NotFound { .. })
        ));
        let (rec, content) = store
            .script_content("motd", "aaaa1111")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (rec.sha256.as_str(), content.as_str()),
            ("aaaa1111", "echo one\n")
        );
        assert!(store
            .script_content("nope", "aaaa1111")
            .await
            .unwrap()
            .is_none());
    }
}

/// The dashboard's job list and an agent's recent attempts.
mod ui_pages {
    use super::*;
    use crate::jobs::*;
    use drover_proto::jobs::{JobState, RetryPolicy};
    use drover_proto::sandbox::Sandbox;
    use std::collections::BTreeMap;

    async fn job_at(
        store: &Store,
        agents: &[String],
        action: &str,
        by: &str,
        at: chrono::DateTime<Utc>,
    ) -> String {
        let argv = vec!["/bin/true".to_owned()];
        store
            .create_job(
                NewJob {
                    action,
                    action_hash: "h",
                    target: "*",
                    params_json: "{}",
                    argv: &argv,
                    env: &BTreeMap::new(),
                    timeout_ms: 1000,
                    kill_grace_ms: 100,
                    retry: &RetryPolicy::default(),
                    created_by: by,
                    agent_ids: agents,
                    artifacts: &[],
                    sandbox: &Sandbox::default_process(),
                    workspace: None,
                    approval: None,
                },
                at,
            )
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn jobs_are_paged_newest_first_with_filters_and_a_total() {
        for backend in BACKENDS {
            let db = TestDb::new(backend).await;
            let store = db.open().await;
            let a = enrolled(&store, "agent-a").await;
            let b = enrolled(&store, "agent-b").await;
            let both = [a.id.clone(), b.id.clone()];
            let t0 = Utc::now() - Duration::hours(1);
            // 25 jobs: every fifth is "deploy" by "olga", the rest "echo"
            // by "admin"; ids in creation order.
            let mut ids = Vec::new();
            for i in 0..25 {
                let (action, by) = if i % 5 == 0 {
                    ("deploy", "olga")
                } else {
                    ("echo", "admin")
                };
                let agents = if i == 24 { &both[..] } else { &both[..1] };
                ids.push(job_at(&store, agents, action, by, t0 + Duration::seconds(i)).await);
            }
            store
                .cancel_job(&ids[3], "by test", Utc::now())
                .await
                .unwrap();

            let all = JobFilter::default();
            let (page, total) = store.page_jobs(&all, 0, 10).await.unwrap();
            assert_eq!(total, 25, "{backend}");
            let got: Vec<&str> = page.iter().map(|j| j.id.as_str()).collect();
            let want: Vec<&str> = ids.iter().rev().take(10).map(String::as_str).collect();
            assert_eq!(got, want, "{backend}: newest first");
            let (page3, total) = store.page_jobs(&all, 20, 10).await.unwrap();
            assert_eq!((page3.len(), total), (5, 25), "{backend}: the last page");
            assert_eq!(page3[4].id, ids[0], "{backend}");
            let (past, total) = store.page_jobs(&all, 100, 10).await.unwrap();
            assert_eq!((past.len(), total), (0, 25), "{backend}");

            let deploys = JobFilter {
                action: Some("deploy".to_owned()),
                ..Default::default()
            };
            let (page, total) = store.page_jobs(&deploys, 0, 2).await.unwrap();
            assert_eq!((page.len(), total), (2, 5), "{backend}");
            assert!(page.iter().all(|j| j.action == "deploy"));
            let by_olga = JobFilter {
                created_by: Some("olga".to_owned()),
                action: Some("echo".to_owned()),
                ..Default::default()
            };
            assert_eq!(store.page_jobs(&by_olga, 0, 50).await.unwrap().1, 0);
            let cancelled = JobFilter {
                state: Some(JobState::Cancelled),
                ..Default::default()
            };
            let (page, total) = store.page_jobs(&cancelled, 0, 50).await.unwrap();
            assert_eq!(total, 1, "{backend}");
            assert_eq!(page[0].id, ids[3]);
            let queued = JobFilter {
                state: Some(JobState::Queued),
                created_by: Some("admin".to_owned()),
                ..Default::default()
            };
            assert_eq!(store.page_jobs(&queued, 0, 50).await.unwrap().1, 19);
            // An id prefix, in any case; LIKE's wildcards are literal.
            let prefix = JobFilter {
                id_prefix: Some(ids[7][..30].to_ascii_uppercase()),
                ..Default::default()
            };
            let (page, total) = store.page_jobs(&prefix, 0, 50).await.unwrap();
            assert_eq!(total, 1, "{backend}");
            assert_eq!(page[0].id, ids[7]);
            for wild in ["%", "_", "\\"] {
                let f = JobFilter {
                    id_prefix: Some(wild.to_owned()),
                    ..Default::default()
                };
                assert_eq!(store.page_jobs(&f, 0, 50).await.unwrap().1, 0, "{wild}");
            }

            let counts = store
                .attempt_counts(&[ids[24].clone(), ids[0].clone(), "nope".to_owned()])
                .await
                .unwrap();
            assert_eq!(counts[&ids[24]].agents, 2, "{backend}");
            assert_eq!(counts[&ids[24]].attempts, 2);
            assert_eq!(counts[&ids[0]].attempts, 1);
            assert_eq!(counts[&ids[0]].succeeded, 0);
            assert!(!counts.contains_key("nope"));
            assert!(store.attempt_counts(&[]).await.unwrap().is_empty());

            // Agent a holds an attempt of every job, b of the last one.
            let recent = store.attempts_of_agent(&a.id, 20).await.unwrap();
            assert_eq!(recent.len(), 20, "{backend}");
            assert_eq!(recent[0].job_id, ids[24], "{backend}: newest first");
            assert_eq!(recent[19].job_id, ids[5]);
            assert!(recent.iter().all(|r| r.agent_id == a.id));
            let of_b = store.attempts_of_agent(&b.id, 20).await.unwrap();
            assert_eq!(of_b.len(), 1);
            assert_eq!(of_b[0].job_id, ids[24]);
            assert!(store
                .attempts_of_agent("nobody", 20)
                .await
                .unwrap()
                .is_empty());
        }
    }
}

#[tokio::test]
async fn policies_forces_runs_and_groups() {
    use crate::jobs::Upsert;
    use crate::policies::{ForceRecord, GroupRecord, PolicyRunRecord, RunFilter};
    for backend in BACKENDS {
        let db = TestDb::new(backend).await;
        let store = db.open().await;
        let now = Utc::now();
        let up = store.upsert_policy("motd", "{}", "h1", "ada", now);
        assert_eq!(up.await.unwrap(), Upsert::Created, "{backend}");
        let again = store.upsert_policy("motd", "{}", "h1", "ada", now);
        assert_eq!(again.await.unwrap(), Upsert::Unchanged);
        let changed = store.upsert_policy("motd", "{\"a\":1}", "h2", "bob", now);
        assert_eq!(changed.await.unwrap(), Upsert::Updated);
        let p = store.policy("motd").await.unwrap().unwrap();
        assert_eq!((p.hash.as_str(), p.updated_by.as_str()), ("h2", "bob"));
        assert_eq!(store.list_policies().await.unwrap().len(), 1);

        store
            .add_force(&ForceRecord {
                id: "f1".into(),
                policy: "motd".into(),
                target: Some("group=web".into()),
                created_by: "ada".into(),
                created_at: now,
            })
            .await
            .unwrap();
        let forces = store.forces_since(now - Duration::hours(1)).await.unwrap();
        assert_eq!(forces.len(), 1, "{backend}");
        assert!(store
            .forces_since(now + Duration::seconds(1))
            .await
            .unwrap()
            .is_empty());

        let agent = enrolled(&store, "a1").await.id;
        let run = |id: &str, outcome: &str, at: chrono::DateTime<Utc>| PolicyRunRecord {
            id: id.into(),
            agent_id: String::new(),
            policy: "motd".into(),
            version: "abcdef".into(),
            trigger: "schedule".into(),
            outcome: outcome.into(),
            exit_code: Some(if outcome == "succeeded" { 0 } else { 1 }),
            started_at: at,
            finished_at: at + Duration::milliseconds(20),
            duration_ms: 20,
            output: "out".into(),
            error: None,
            received_at: at,
        };
        let t0 = now - Duration::minutes(10);
        let runs = [
            run("r1", "succeeded", t0),
            run("r2", "failed", t0 + Duration::minutes(1)),
            run("r3", "succeeded", t0 + Duration::minutes(2)),
        ];
        assert_eq!(
            store.record_policy_runs(&agent, &runs, now).await.unwrap(),
            3
        );
        // Delivered again (the answer was lost): stored once.
        assert_eq!(
            store.record_policy_runs(&agent, &runs, now).await.unwrap(),
            0,
            "{backend}"
        );
        let (page, total) = store
            .page_policy_runs(&RunFilter::default(), 0, 2)
            .await
            .unwrap();
        assert_eq!(total, 3);
        assert_eq!(
            page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["r3", "r2"]
        );
        assert_eq!(
            page[0].started_at.timestamp_millis(),
            runs[2].started_at.timestamp_millis()
        );
        let failed = RunFilter {
            outcome: Some("failed".into()),
            version: Some("abc".into()),
            agent_id: Some(agent.clone()),
            since: Some(t0),
            ..RunFilter::default()
        };
        let (page, total) = store.page_policy_runs(&failed, 0, 10).await.unwrap();
        assert_eq!((page.len(), total), (1, 1), "{backend}");
        let (_, none) = store
            .page_policy_runs(
                &RunFilter {
                    until: Some(t0),
                    ..RunFilter::default()
                },
                0,
                10,
            )
            .await
            .unwrap();
        assert_eq!(none, 0);

        store.touch_desired_poll(&agent, now, 5_000).await.unwrap();
        let counts = store
            .agent_run_counts(&agent, now - Duration::hours(24))
            .await
            .unwrap();
        assert_eq!((counts.runs, counts.failures), (3, 1), "{backend}");
        assert_eq!(
            counts.last_success_at.map(|t| t.timestamp_millis()),
            Some(runs[2].finished_at.timestamp_millis())
        );
        assert_eq!(
            counts.last_poll_at.map(|t| t.timestamp_millis()),
            Some(now.timestamp_millis())
        );

        store
            .set_group(&GroupRecord {
                name: "web".into(),
                poll_interval_ms: Some(10_000),
                updated_by: "ada".into(),
                updated_at: now,
            })
            .await
            .unwrap();
        store
            .set_group(&GroupRecord {
                name: "web".into(),
                poll_interval_ms: Some(2_000),
                updated_by: "ada".into(),
                updated_at: now,
            })
            .await
            .unwrap();
        let groups = store.list_groups().await.unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].poll_interval_ms, Some(2_000), "{backend}");

        assert!(store.delete_policy("motd").await.unwrap());
        assert!(!store.delete_policy("motd").await.unwrap());
        assert!(store
            .forces_since(now - Duration::hours(1))
            .await
            .unwrap()
            .is_empty());
    }
}

#[tokio::test]
async fn a_schedule_slot_is_claimed_once() {
    use crate::schedules::{NewSchedule, SlotClaim};
    for backend in BACKENDS {
        let db = TestDb::new(backend).await;
        let store = db.open().await;
        let t0 = Utc::now();
        let slot = t0 + Duration::seconds(10);
        let new = NewSchedule {
            name: "nightly",
            kind: "action",
            spec: r#"{"action":"echo"}"#,
            cron: "0 3 * * *",
            timezone: "UTC",
            overlap: "skip",
            missed: "skip",
            scope: None,
            by: "ada",
            next_slot: Some(slot),
            now: t0,
        };
        let mut tx = store.begin().await.unwrap();
        assert!(tx.put_schedule(&new).await.unwrap(), "{backend}: new");
        tx.commit().await.unwrap();
        let mut tx = store.begin().await.unwrap();
        let replaced = NewSchedule {
            overlap: "queue",
            now: t0 + Duration::seconds(1),
            ..new
        };
        assert!(
            !tx.put_schedule(&replaced).await.unwrap(),
            "{backend}: replaced"
        );
        tx.commit().await.unwrap();
        let rec = store.schedule("nightly").await.unwrap().unwrap();
        assert_eq!((rec.overlap.as_str(), rec.paused), ("queue", false));
        assert_eq!(rec.created_at.timestamp_millis(), t0.timestamp_millis());
        assert!(
            store.due_schedules(t0).await.unwrap().is_empty(),
            "{backend}"
        );
        assert_eq!(store.due_schedules(slot).await.unwrap().len(), 1);

        let claim = SlotClaim {
            schedule: "nightly",
            slot_at: slot,
            outcome: "started",
            target: Some("job:1"),
            detail: "",
            missed: 0,
            now: slot,
        };
        // A claim rolled back leaves the slot free.
        let mut tx = store.begin().await.unwrap();
        assert!(tx.claim_slot(&claim).await.unwrap());
        drop(tx);
        let mut tx = store.begin().await.unwrap();
        assert!(tx.claim_slot(&claim).await.unwrap(), "{backend}: first");
        tx.commit().await.unwrap();
        let mut tx = store.begin().await.unwrap();
        assert!(!tx.claim_slot(&claim).await.unwrap(), "{backend}: second");
        tx.commit().await.unwrap();
        let later = slot + Duration::seconds(60);
        assert!(store
            .advance_schedule("nightly", slot, later)
            .await
            .unwrap());
        assert!(
            !store
                .advance_schedule("nightly", slot, later)
                .await
                .unwrap(),
            "{backend}: moved already"
        );
        let last = store.last_started_slot("nightly").await.unwrap().unwrap();
        assert_eq!(last.target.as_deref(), Some("job:1"));
        assert_eq!(store.schedule_slots("nightly", 10).await.unwrap().len(), 1);

        let mut tx = store.begin().await.unwrap();
        assert!(tx
            .set_schedule_paused("nightly", true, None, t0)
            .await
            .unwrap());
        tx.commit().await.unwrap();
        assert!(
            store.due_schedules(later).await.unwrap().is_empty(),
            "{backend}: paused"
        );
        assert_eq!(store.earliest_slot().await.unwrap(), None);
        let mut tx = store.begin().await.unwrap();
        assert!(tx.delete_schedule("nightly").await.unwrap());
        assert!(!tx.delete_schedule("nightly").await.unwrap());
        tx.commit().await.unwrap();
        assert!(store
            .schedule_slots("nightly", 10)
            .await
            .unwrap()
            .is_empty());
    }
}
