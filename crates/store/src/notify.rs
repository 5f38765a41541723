//! Wake-ups across replicas on PostgreSQL: every commit that changed
//! something also sends its [`Changes`] on one `LISTEN/NOTIFY` channel (in
//! the transaction, so it is delivered only if the commit is), and each
//! replica's listener hands what others committed to its own commit hook.
//! A notification only says "look again"; a lost one costs latency, never
//! correctness (the engine's safety sweep and the polls' timeouts remain).

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;

use crate::{Changes, Result, Store};

/// The channel every replica listens on.
pub const CHANNEL: &str = "drover_changes";

/// PostgreSQL refuses payloads of 8,000 bytes or more.
const MAX_PAYLOAD: usize = 7_900;

#[derive(Serialize, Deserialize)]
struct Wire {
    /// The replica that committed (its own notifications are skipped).
    o: String,
    #[serde(default)]
    j: Vec<String>,
    /// Jobs that ended.
    #[serde(default)]
    n: Vec<String>,
    #[serde(default)]
    l: Vec<String>,
    #[serde(default)]
    a: Vec<String>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    r: Vec<String>,
    #[serde(default)]
    e: Vec<String>,
    #[serde(default)]
    d: bool,
    /// Too much changed to list: look at everything.
    #[serde(default)]
    x: bool,
}

/// The payload that announces `changes`, or `None` when there is nothing
/// to say. Too large a set is sent as "look at everything".
pub(crate) fn payload(origin: &str, changes: &Changes) -> Option<String> {
    if changes.is_empty() {
        return None;
    }
    let wire = Wire {
        o: origin.to_owned(),
        j: changes.jobs.iter().cloned().collect(),
        n: changes.ended.iter().cloned().collect(),
        l: changes.logs.iter().cloned().collect(),
        a: changes.agents.iter().cloned().collect(),
        all: changes.all_agents,
        r: changes.runs.iter().cloned().collect(),
        e: changes.run_events.iter().cloned().collect(),
        d: changes.deliveries,
        x: changes.everything,
    };
    let text = serde_json::to_string(&wire).ok()?;
    if text.len() <= MAX_PAYLOAD {
        return Some(text);
    }
    serde_json::to_string(&Wire {
        o: origin.to_owned(),
        j: Vec::new(),
        n: Vec::new(),
        l: Vec::new(),
        a: Vec::new(),
        all: true,
        r: Vec::new(),
        e: Vec::new(),
        d: changes.deliveries,
        x: true,
    })
    .ok()
}

/// What another replica changed, from a payload; `None` for our own.
fn parse(own: &str, text: &str) -> Option<Changes> {
    let wire: Wire = serde_json::from_str(text).ok()?;
    if wire.o == own {
        return None;
    }
    Some(Changes {
        jobs: wire.j.into_iter().collect(),
        ended: wire.n.into_iter().collect(),
        logs: wire.l.into_iter().collect(),
        agents: wire.a.into_iter().collect(),
        all_agents: wire.all,
        runs: wire.r.into_iter().collect(),
        run_events: wire.e.into_iter().collect(),
        deliveries: wire.d,
        everything: wire.x,
    })
}

/// Hears what other replicas commit.
#[derive(Debug)]
pub struct Listener {
    inner: PgListener,
    own: String,
}

impl Listener {
    /// The next batch of another replica's changes. An error means the
    /// connection broke: sqlx reconnects on the next call, and the caller
    /// should treat everything as changed, since notifications sent in
    /// between are lost.
    pub async fn next(&mut self) -> Result<Changes> {
        loop {
            let n = self.inner.recv().await?;
            if let Some(c) = parse(&self.own, n.payload()) {
                return Ok(c);
            }
        }
    }
}

impl Store {
    /// Listens for other replicas' changes. `None` on SQLite, where one
    /// process is the only writer.
    pub async fn listen(&self) -> Result<Option<Listener>> {
        match &self.pool {
            crate::Pool::Postgres(p) => {
                let mut inner = PgListener::connect_with(p).await?;
                inner.listen(CHANNEL).await?;
                Ok(Some(Listener {
                    inner,
                    own: self.shared.origin.clone(),
                }))
            }
            crate::Pool::Sqlite { .. } => Ok(None),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_skip_our_own() {
        let mut c = Changes::default();
        c.jobs.insert("j1".into());
        c.agents.insert("a1".into());
        c.runs.insert("r1".into());
        c.deliveries = true;
        let text = payload("me", &c).unwrap();
        assert_eq!(parse("me", &text), None);
        assert_eq!(parse("other", &text), Some(c));
        assert_eq!(payload("me", &Changes::default()), None);
    }

    #[test]
    fn too_many_changes_become_look_at_everything() {
        let mut c = Changes::default();
        for i in 0..1000 {
            c.jobs.insert(format!("job-{i:04}-0000000000000000"));
        }
        let text = payload("me", &c).unwrap();
        assert!(text.len() < MAX_PAYLOAD);
        let got = parse("other", &text).unwrap();
        assert!(got.everything && got.all_agents && got.jobs.is_empty());
    }
}
