//! The audit log as a hash chain (issue 13, point 4).
//!
//! Every row carries `prev_hash`, the hash of the row before it (the
//! genesis hash, 64 zeros, for the first), and `hash`, the SHA-256 (lower
//! case hex) of its canonical encoding: the concatenation of the netstrings
//! (`<byte length in decimal>:<bytes>,`) of, in this order,
//!
//! ```text
//! "drover-audit-v1", id, at, actor, action, target, status, outcome, prev_hash
//! ```
//!
//! where `id`, `at` (milliseconds since the Unix epoch) and `status` are
//! written in decimal ASCII and the texts as UTF-8. Example: the row `id 1,
//! at 1700000000000, actor admin, action "POST /api/v1/jobs", target
//! /api/v1/jobs, status 201, outcome ok` after the genesis hashes
//! `15:drover-audit-v1,1:1,13:1700000000000,5:admin,17:POST /api/v1/jobs,12:/api/v1/jobs,3:201,2:ok,64:000…000,`.
//!
//! Rows written since entries say what was done to what (they have a
//! `request`, the HTTP call behind them) use version 2, which adds the
//! request, the caller's address (`source`) and the details (`detail`, a
//! JSON object as stored; an absent one is the empty text) after the
//! outcome:
//!
//! ```text
//! "drover-audit-v2", id, at, actor, action, target, status, outcome, request, source, detail, prev_hash
//! ```
//!
//! Key design decision: appending bumps the one-row `audit_head` first
//! (`UPDATE … RETURNING`), which hands out the row's id and the previous
//! hash and locks the head until the transaction ends. Appenders are thus
//! serialised on that row: on SQLite there is one writer anyway, on
//! PostgreSQL concurrent transactions and replicas queue on the row lock,
//! so their rows form one chain with gapless ids in commit order. An entry
//! should be the last write of its transaction, so the lock is held only
//! until the commit.
//!
//! The chain makes an edit, a deletion or an insertion by someone with
//! write access to the database visible to `verify`; it does not stop
//! someone who rewrites every row from the edit onwards and the head (the
//! hashes are unkeyed, so that anyone can re-verify an export). An exported
//! or noted head hash, kept elsewhere, catches that too.

use std::collections::VecDeque;

use sha2::{Digest, Sha256};

use crate::jobs::AuditEntry;
use crate::tx::on_tx;
use crate::{on_pool, to_ms, Backend, Result, Store, Tx};

/// `prev_hash` of the first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Rows read per query while verifying, exporting or chaining old rows.
const PAGE: i64 = 1000;

/// An audit row with its links, as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ChainRow {
    pub id: i64,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub status: i64,
    pub outcome: String,
    /// The call behind the entry, e.g. `POST /api/v1/jobs/{id}/cancel`
    /// (empty for one made outside the API); `None` on rows written
    /// before version 2 of the encoding.
    pub request: Option<String>,
    /// The caller's address.
    pub source: Option<String>,
    /// Details (reason, action, selector …) as a JSON object.
    pub detail: Option<String>,
    /// `None` only for a row written outside the chain.
    pub prev_hash: Option<String>,
    pub hash: Option<String>,
}

const CHAIN_COLUMNS: &str =
    "id, at, actor, action, target, status, outcome, request, source, detail, prev_hash, hash";

/// The fields version 2 of the encoding adds.
#[derive(Debug, Clone, Copy)]
pub struct V2<'a> {
    pub request: &'a str,
    pub source: &'a str,
    pub detail: &'a str,
}

/// The hash of one row's fields and the hash before it (see the module
/// documentation for the encoding).
#[allow(clippy::too_many_arguments)]
pub fn row_hash(
    id: i64,
    at: i64,
    actor: &str,
    action: &str,
    target: &str,
    status: i64,
    outcome: &str,
    v2: Option<V2<'_>>,
    prev_hash: &str,
) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update(bytes.len().to_string().as_bytes());
        h.update(b":");
        h.update(bytes);
        h.update(b",");
    };
    field(if v2.is_some() {
        b"drover-audit-v2"
    } else {
        b"drover-audit-v1"
    });
    field(id.to_string().as_bytes());
    field(at.to_string().as_bytes());
    field(actor.as_bytes());
    field(action.as_bytes());
    field(target.as_bytes());
    field(status.to_string().as_bytes());
    field(outcome.as_bytes());
    if let Some(v2) = v2 {
        field(v2.request.as_bytes());
        field(v2.source.as_bytes());
        field(v2.detail.as_bytes());
    }
    field(prev_hash.as_bytes());
    hex::encode(h.finalize())
}

impl ChainRow {
    /// The hash this row's fields and its `prev_hash` call for.
    pub fn expected_hash(&self) -> String {
        self.hash_after(self.prev_hash.as_deref().unwrap_or(""))
    }

    /// The hash of this row's fields after `prev_hash`.
    fn hash_after(&self, prev_hash: &str) -> String {
        row_hash(
            self.id,
            self.at,
            &self.actor,
            &self.action,
            &self.target,
            self.status,
            &self.outcome,
            self.v2(),
            prev_hash,
        )
    }

    /// The version 2 fields, for a row that has them.
    pub fn v2(&self) -> Option<V2<'_>> {
        self.request.as_deref().map(|request| V2 {
            request,
            source: self.source.as_deref().unwrap_or(""),
            detail: self.detail.as_deref().unwrap_or(""),
        })
    }
}

/// Where and how the chain is broken: the first problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Break {
    /// The row's fields (or its `prev_hash`) no longer match its hash.
    Edited { id: i64 },
    /// The row matches its own hash, but the next row does not link to
    /// it: it was edited and its hash recomputed.
    Rehashed { id: i64 },
    /// Rows are missing between `after` (none: at the start) and `before`.
    Deleted { after: Option<i64>, before: i64 },
    /// The chain ends before its head: the last rows were deleted.
    DeletedAtEnd { after: Option<i64>, head: i64 },
    /// The row is not part of the chain: the rows around it link to each
    /// other.
    Inserted { id: i64 },
    /// A row beyond the head, which no server wrote.
    InsertedAfterHead { id: i64, head: i64 },
    /// The last row is not the one the head names.
    Head { id: i64 },
}

impl Break {
    /// The row named (the first row at or after the damage).
    pub fn row(&self) -> i64 {
        match *self {
            Break::Edited { id }
            | Break::Rehashed { id }
            | Break::Inserted { id }
            | Break::InsertedAfterHead { id, .. }
            | Break::Head { id } => id,
            Break::Deleted { before, .. } => before,
            Break::DeletedAtEnd { head, .. } => head,
        }
    }

    /// A short stable name of the kind of damage.
    pub fn kind(&self) -> &'static str {
        match self {
            Break::Edited { .. } | Break::Rehashed { .. } => "edited",
            Break::Head { .. } => "inserted or edited",
            Break::Deleted { .. } | Break::DeletedAtEnd { .. } => "deleted",
            Break::Inserted { .. } | Break::InsertedAfterHead { .. } => "inserted",
        }
    }
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Break::Edited { id } => write!(f, "row {id} was edited"),
            Break::Rehashed { id } => {
                write!(f, "row {id} was edited (and its hash recomputed)")
            }
            Break::Deleted {
                after: Some(after),
                before,
            } => write!(f, "a row between {after} and {before} was deleted"),
            Break::Deleted {
                after: None,
                before,
            } => write!(f, "a row before {before} was deleted"),
            Break::DeletedAtEnd {
                after: Some(after),
                head,
            } => write!(
                f,
                "a row after {after} was deleted (the chain ends at row {head})"
            ),
            Break::DeletedAtEnd { after: None, head } => {
                write!(f, "every row up to {head} was deleted")
            }
            Break::Inserted { id } => write!(f, "row {id} was inserted"),
            Break::InsertedAfterHead { id, head } => write!(
                f,
                "row {id} was inserted (after row {head}, the chain's last)"
            ),
            Break::Head { id } => write!(
                f,
                "row {id} was inserted or edited (the chain's head holds another hash)"
            ),
        }
    }
}

/// Walks rows in id order and finds the first break. Pure: the store feeds
/// it pages; the tests feed it tables.
#[derive(Debug, Clone)]
pub struct Walker {
    prev_id: Option<i64>,
    prev_hash: String,
    count: u64,
}

impl Default for Walker {
    fn default() -> Self {
        Walker {
            prev_id: None,
            prev_hash: GENESIS.to_owned(),
            count: 0,
        }
    }
}

impl Walker {
    /// Checks `row`, the next in id order; `next` is the row after it, if
    /// any (needed to tell an inserted row from an edited one).
    pub fn step(&mut self, row: &ChainRow, next: Option<&ChainRow>) -> Result<(), Break> {
        let content_ok = row.hash.as_deref() == Some(row.expected_hash().as_str());
        let link_ok = row.prev_hash.as_deref() == Some(self.prev_hash.as_str());
        if content_ok && link_ok {
            self.prev_id = Some(row.id);
            self.prev_hash = row.hash.clone().unwrap_or_default();
            self.count += 1;
            return Ok(());
        }
        // The row after it links to the row before it: it was slipped in.
        if next.is_some_and(|n| n.prev_hash.as_deref() == Some(self.prev_hash.as_str())) {
            return Err(Break::Inserted { id: row.id });
        }
        if link_ok || !content_ok {
            return Err(Break::Edited { id: row.id });
        }
        // Sound itself but not linked to its predecessor: either rows
        // between them are gone, or the predecessor was rewritten whole.
        match self.prev_id {
            Some(p) if row.id == p + 1 => Err(Break::Rehashed { id: p }),
            after => Err(Break::Deleted {
                after,
                before: row.id,
            }),
        }
    }

    /// Checks the end of the walk against the head (`seq`, `hash`).
    pub fn finish(&self, head_seq: i64, head_hash: &str) -> Result<(), Break> {
        match self.prev_id {
            Some(last) if last == head_seq => {
                if self.prev_hash == head_hash {
                    Ok(())
                } else {
                    Err(Break::Head { id: last })
                }
            }
            Some(last) if last > head_seq => Err(Break::InsertedAfterHead {
                id: last,
                head: head_seq,
            }),
            None if head_seq == 0 => Ok(()),
            after => Err(Break::DeletedAtEnd {
                after,
                head: head_seq,
            }),
        }
    }

    /// Rows found sound so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The hash of the last sound row (the genesis before any).
    pub fn last_hash(&self) -> &str {
        &self.prev_hash
    }
}

/// The result of walking the whole chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Rows checked and found sound (up to the break, if any).
    pub count: u64,
    /// The chain's head: id and hash of its last row.
    pub head_id: i64,
    pub head_hash: String,
    pub broken: Option<Break>,
}

impl Tx {
    /// Appends one entry to the chain. The head row is locked from here to
    /// the end of the transaction: make it the transaction's last write.
    pub(crate) async fn append_audit(&mut self, entry: &AuditEntry<'_>, at: i64) -> Result<()> {
        let (id, prev): (i64, String) = on_tx!(self, c => sqlx::query_as(
            "UPDATE audit_head SET seq = seq + 1 WHERE id = 1 RETURNING seq, hash",
        )
        .fetch_one(&mut *c)
        .await)?;
        let status = i64::from(entry.status);
        let v2 = V2 {
            request: entry.request,
            source: entry.source,
            detail: entry.detail,
        };
        let hash = row_hash(
            id,
            at,
            entry.actor,
            entry.action,
            entry.target,
            status,
            entry.outcome,
            Some(v2),
            &prev,
        );
        // PostgreSQL: one round trip for the row and the head; SQLite runs
        // in process, two statements cost nothing more.
        let insert = "INSERT INTO audit (id, at, actor, action, target, status, outcome, \
                      request, source, detail, prev_hash, hash) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";
        let sql = match self.backend() {
            Backend::Postgres => {
                format!("WITH row AS ({insert}) UPDATE audit_head SET hash = $12 WHERE id = 1")
            }
            Backend::Sqlite => insert.to_owned(),
        };
        on_tx!(self, c => sqlx::query(&sql)
            .bind(id)
            .bind(at)
            .bind(entry.actor)
            .bind(entry.action)
            .bind(entry.target)
            .bind(status)
            .bind(entry.outcome)
            .bind(entry.request)
            .bind(entry.source)
            .bind(entry.detail)
            .bind(&prev)
            .bind(&hash)
            .execute(&mut *c)
            .await.map(|r| r.rows_affected()))?;
        if self.backend() == Backend::Sqlite {
            on_tx!(self, c => sqlx::query("UPDATE audit_head SET hash = $1 WHERE id = 1")
                .bind(&hash)
                .execute(&mut *c)
                .await.map(|r| r.rows_affected()))?;
        }
        Ok(())
    }
}

impl Store {
    /// Chains the rows written before the chain existed (once: the head
    /// records that it was done), in id order. Runs at open, before the
    /// server takes calls; replicas starting together queue on the head.
    pub(crate) async fn chain_audit_backlog(&self) -> Result<()> {
        let mut tx = self.begin().await?;
        let (chained,): (i64,) = on_tx!(&mut tx, c => sqlx::query_as(
            "UPDATE audit_head SET chained = chained WHERE id = 1 RETURNING chained",
        )
        .fetch_one(&mut *c)
        .await)?;
        if chained != 0 {
            return tx.commit().await.map(|_| ());
        }
        let mut prev = GENESIS.to_owned();
        let mut last_id = 0i64;
        let mut rows = 0u64;
        loop {
            let sql =
                format!("SELECT {CHAIN_COLUMNS} FROM audit WHERE id > $1 ORDER BY id LIMIT $2");
            let page: Vec<ChainRow> = on_tx!(&mut tx, c => sqlx::query_as(&sql)
                .bind(last_id)
                .bind(PAGE)
                .fetch_all(&mut *c)
                .await)?;
            if page.is_empty() {
                break;
            }
            for row in page {
                let hash = row.hash_after(&prev);
                on_tx!(&mut tx, c => sqlx::query(
                    "UPDATE audit SET prev_hash = $1, hash = $2 WHERE id = $3",
                )
                .bind(&prev)
                .bind(&hash)
                .bind(row.id)
                .execute(&mut *c)
                .await.map(|r| r.rows_affected()))?;
                prev = hash;
                last_id = row.id;
                rows += 1;
            }
        }
        on_tx!(&mut tx, c => sqlx::query(
            "UPDATE audit_head SET seq = $1, hash = $2, chained = 1 WHERE id = 1",
        )
        .bind(last_id)
        .bind(&prev)
        .execute(&mut *c)
        .await.map(|r| r.rows_affected()))?;
        tx.commit().await?;
        if rows > 0 {
            tracing::info!(rows, "chained the audit rows written before the chain");
        }
        Ok(())
    }

    /// The chain's head: id and hash of its last row (0 and the genesis
    /// hash while empty).
    pub async fn audit_head(&self) -> Result<(i64, String)> {
        let sql = "SELECT seq, hash FROM audit_head WHERE id = 1";
        Ok(on_pool!(self, p => sqlx::query_as(sql).fetch_one(p).await)?)
    }

    /// Up to `limit` audit rows with their hashes, in id order, after
    /// `after_id` and at or after `since` (milliseconds).
    pub async fn audit_rows(
        &self,
        after_id: i64,
        since: Option<chrono::DateTime<chrono::Utc>>,
        limit: i64,
    ) -> Result<Vec<ChainRow>> {
        let sql = format!(
            "SELECT {CHAIN_COLUMNS} FROM audit WHERE id > $1 AND ($2 IS NULL OR at >= $2) \
             ORDER BY id LIMIT $3"
        );
        Ok(on_pool!(self, p => sqlx::query_as(&sql)
            .bind(after_id)
            .bind(since.map(to_ms))
            .bind(limit)
            .fetch_all(p)
            .await)?)
    }

    /// Walks the whole chain, a page at a time, and reports the first
    /// break. Rows appended while it runs are beyond the head it read
    /// first and are left for the next walk.
    pub async fn verify_audit(&self) -> Result<Verification> {
        let (head_id, head_hash) = self.audit_head().await?;
        let mut walker = Walker::default();
        let mut buffer: VecDeque<ChainRow> = VecDeque::new();
        let mut after = 0i64;
        let mut exhausted = false;
        let broken = loop {
            // Keep the row after the one checked at hand.
            if buffer.len() < 2 && !exhausted {
                let page: Vec<ChainRow> = {
                    let sql = format!(
                        "SELECT {CHAIN_COLUMNS} FROM audit WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3"
                    );
                    on_pool!(self, p => sqlx::query_as(&sql)
                        .bind(after)
                        .bind(head_id)
                        .bind(PAGE)
                        .fetch_all(p)
                        .await)?
                };
                exhausted = (page.len() as i64) < PAGE;
                if let Some(last) = page.last() {
                    after = last.id;
                }
                buffer.extend(page);
                continue;
            }
            let Some(row) = buffer.pop_front() else {
                break walker.finish(head_id, &head_hash).err();
            };
            if let Err(b) = walker.step(&row, buffer.front()) {
                break Some(b);
            }
        };
        // A row beyond the head no server wrote (read with the head in
        // one statement, so a concurrent append is not mistaken for one).
        let broken = match broken {
            Some(b) => Some(b),
            None => {
                let sql = "SELECT a.id, h.seq FROM audit a, audit_head h \
                           WHERE h.id = 1 AND a.id > h.seq ORDER BY a.id LIMIT 1";
                let beyond: Option<(i64, i64)> =
                    on_pool!(self, p => sqlx::query_as(sql).fetch_optional(p).await)?;
                beyond.map(|(id, head)| Break::InsertedAfterHead { id, head })
            }
        };
        Ok(Verification {
            count: walker.count(),
            head_id,
            head_hash,
            broken,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<ChainRow> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|id| {
                let mut r = ChainRow {
                    id,
                    at: 1_700_000_000_000 + id,
                    actor: "admin".into(),
                    action: "POST /api/v1/jobs".into(),
                    target: "/api/v1/jobs".into(),
                    status: 201,
                    outcome: "ok".into(),
                    // Rows of both encodings in one chain.
                    request: (id % 2 == 0).then(|| "POST /api/v1/jobs".into()),
                    source: (id % 2 == 0).then(|| "127.0.0.1".into()),
                    detail: None,
                    prev_hash: Some(prev.clone()),
                    hash: None,
                };
                r.hash = Some(r.expected_hash());
                prev = r.hash.clone().unwrap();
                r
            })
            .collect()
    }

    fn walk(rows: &[ChainRow], head: (i64, &str)) -> Result<u64, Break> {
        let mut w = Walker::default();
        for (i, r) in rows.iter().enumerate() {
            w.step(r, rows.get(i + 1))?;
        }
        w.finish(head.0, head.1)?;
        Ok(w.count())
    }

    fn rehash(r: &mut ChainRow) {
        r.hash = Some(r.expected_hash());
    }

    #[test]
    fn the_encoding_is_the_documented_one() {
        let mut expected = Sha256::new();
        expected.update(format!(
            "15:drover-audit-v1,1:1,13:1700000000000,5:admin,17:POST /api/v1/jobs,12:/api/v1/jobs,3:201,2:ok,64:{GENESIS},"
        ));
        assert_eq!(
            row_hash(
                1,
                1_700_000_000_000,
                "admin",
                "POST /api/v1/jobs",
                "/api/v1/jobs",
                201,
                "ok",
                None,
                GENESIS
            ),
            hex::encode(expected.finalize())
        );
        let mut expected = Sha256::new();
        expected.update(format!(
            "15:drover-audit-v2,1:1,13:1700000000000,5:admin,10:job.create,9:job:01ABC,3:201,2:ok,17:POST /api/v1/jobs,9:127.0.0.1,17:{{\"action\":\"echo\"}},64:{GENESIS},"
        ));
        assert_eq!(
            row_hash(
                1,
                1_700_000_000_000,
                "admin",
                "job.create",
                "job:01ABC",
                201,
                "ok",
                Some(V2 {
                    request: "POST /api/v1/jobs",
                    source: "127.0.0.1",
                    detail: r#"{"action":"echo"}"#,
                }),
                GENESIS
            ),
            hex::encode(expected.finalize())
        );
        // Lengths keep fields apart: moving a character across a border
        // changes the hash.
        assert_ne!(
            row_hash(1, 1, "ab", "c", "", 1, "", None, GENESIS),
            row_hash(1, 1, "a", "bc", "", 1, "", None, GENESIS)
        );
    }

    #[test]
    fn finds_the_first_break_by_row() {
        let rows = chain(6);
        let head = |rows: &[ChainRow]| {
            let l = rows.last().unwrap();
            (l.id, l.hash.clone().unwrap())
        };
        let (hid, hh) = head(&rows);
        assert_eq!(walk(&rows, (hid, &hh)), Ok(6));
        assert_eq!(walk(&[], (0, GENESIS)), Ok(0));

        type Tamper = fn(&mut Vec<ChainRow>);
        let cases: Vec<(&str, Tamper, Break)> = vec![
            (
                "field edited",
                |r| r[2].actor = "mallory".into(),
                Break::Edited { id: 3 },
            ),
            (
                "status edited",
                |r| r[5].status = 200,
                Break::Edited { id: 6 },
            ),
            (
                "hash removed",
                |r| r[1].hash = None,
                Break::Edited { id: 2 },
            ),
            (
                "edited and rehashed",
                |r| {
                    r[2].target = "/elsewhere".into();
                    rehash(&mut r[2]);
                },
                Break::Rehashed { id: 3 },
            ),
            (
                "middle deleted",
                |r| {
                    r.remove(3);
                },
                Break::Deleted {
                    after: Some(3),
                    before: 5,
                },
            ),
            (
                "first deleted",
                |r| {
                    r.remove(0);
                },
                Break::Deleted {
                    after: None,
                    before: 2,
                },
            ),
            (
                "inserted",
                |r| {
                    let mut forged = r[3].clone();
                    forged.id = 100;
                    forged.actor = "mallory".into();
                    r.insert(4, forged);
                    // ids stay in order for the walk: renumber the tail.
                    r[4].id = 5;
                    r[5].id = 6;
                    r[6].id = 7;
                },
                Break::Inserted { id: 5 },
            ),
            (
                "last deleted",
                |r| {
                    r.pop();
                },
                Break::DeletedAtEnd {
                    after: Some(5),
                    head: 6,
                },
            ),
            (
                "last edited and rehashed",
                |r| {
                    r[5].actor = "mallory".into();
                    rehash(&mut r[5]);
                },
                Break::Head { id: 6 },
            ),
        ];
        for (name, tamper, want) in cases {
            let mut rows = chain(6);
            tamper(&mut rows);
            assert_eq!(walk(&rows, (hid, &hh)), Err(want.clone()), "{name}");
            assert!(!want.to_string().is_empty());
        }
    }

    mod stored {
        use super::super::*;
        use crate::testing::{TestDb, BACKENDS};

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

        /// Runs one statement with up to two integer parameters.
        async fn exec(tx: &mut Tx, sql: &str, params: &[i64]) -> Result<u64> {
            on_tx!(tx, c => {
                let mut q = sqlx::query(sql);
                for p in params {
                    q = q.bind(*p);
                }
                q.execute(&mut *c).await.map(|r| r.rows_affected())
            })
            .map_err(Into::into)
        }

        /// Rows of an older version (no hashes, ids with gaps as a
        /// PostgreSQL sequence leaves them) are chained once at open;
        /// appends continue the chain after them.
        #[tokio::test]
        async fn rows_from_before_the_chain_are_chained_once() {
            for backend in BACKENDS {
                let db = TestDb::new(backend).await;
                let store = db.open().await;
                let mut tx = store.begin().await.unwrap();
                for id in [1i64, 2, 5, 9] {
                    exec(
                        &mut tx,
                        "INSERT INTO audit (id, at, actor, action, target, status, outcome) \
                         VALUES ($1, $2, 'old', 'POST /x', '/x', 200, 'ok')",
                        &[id, 1_600_000_000_000 + id],
                    )
                    .await
                    .unwrap();
                }
                exec(&mut tx, "UPDATE audit_head SET chained = 0, seq = 0", &[])
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                drop(store);
                let store = db.open().await;
                let v = store.verify_audit().await.unwrap();
                assert_eq!((v.count, v.head_id, &v.broken), (4, 9, &None), "{backend}");
                let mut tx = store.begin().await.unwrap();
                tx.audit(&entry("new"), chrono::Utc::now()).await.unwrap();
                tx.commit().await.unwrap();
                let v = store.verify_audit().await.unwrap();
                assert_eq!((v.count, v.head_id, &v.broken), (5, 10, &None), "{backend}");
                // Chained once: opening again changes nothing.
                let again = db.open().await.verify_audit().await.unwrap();
                assert_eq!(again, v, "{backend}");
            }
        }

        /// Concurrent transactions, a quarter of them dropped, leave one
        /// gapless chain: a rolled-back append gives its id back.
        #[tokio::test]
        async fn concurrent_appends_with_rollbacks_stay_one_chain() {
            for backend in BACKENDS {
                let db = TestDb::new(backend).await;
                let store = db.open().await;
                let mut tasks = tokio::task::JoinSet::new();
                for i in 0..40 {
                    let store = store.clone();
                    tasks.spawn(async move {
                        let actor = format!("writer-{i:02}");
                        let mut tx = store.begin().await.unwrap();
                        tx.audit(&entry(&actor), chrono::Utc::now()).await.unwrap();
                        if i % 4 == 3 {
                            tx.rollback().await.unwrap();
                        } else {
                            tx.commit().await.unwrap();
                        }
                    });
                }
                while let Some(joined) = tasks.join_next().await {
                    joined.unwrap();
                }
                let v = store.verify_audit().await.unwrap();
                assert_eq!(
                    (v.count, v.head_id, &v.broken),
                    (30, 30, &None),
                    "{backend}"
                );
                let rows = store.audit_rows(0, None, 1000).await.unwrap();
                let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
                assert_eq!(ids, (1..=30).collect::<Vec<_>>(), "{backend}");
            }
        }
    }

    #[test]
    fn messages_name_the_row() {
        assert_eq!(Break::Edited { id: 17 }.to_string(), "row 17 was edited");
        assert_eq!(
            Break::Deleted {
                after: None,
                before: 18
            }
            .to_string(),
            "a row before 18 was deleted"
        );
        assert_eq!(Break::Inserted { id: 4 }.to_string(), "row 4 was inserted");
    }
}
