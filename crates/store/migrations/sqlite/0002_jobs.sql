-- The action catalog, jobs with their attempts and output, and the audit log.

CREATE TABLE actions (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    hash       TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    updated_by TEXT NOT NULL
);

CREATE TABLE jobs (
    id                  TEXT PRIMARY KEY,
    action              TEXT NOT NULL,
    action_hash         TEXT NOT NULL,
    target              TEXT NOT NULL,
    params              TEXT NOT NULL,
    -- What every attempt runs, fixed at submission.
    argv                TEXT NOT NULL,
    env                 TEXT NOT NULL,
    timeout_ms          INTEGER NOT NULL,
    kill_grace_ms       INTEGER NOT NULL,
    retry               TEXT NOT NULL,
    state               TEXT NOT NULL,
    created_by          TEXT NOT NULL,
    created_at          INTEGER NOT NULL,
    finished_at         INTEGER,
    cancel_requested_at INTEGER
);

CREATE INDEX jobs_created ON jobs (created_at);
CREATE INDEX jobs_state ON jobs (state);

CREATE TABLE attempts (
    id               TEXT PRIMARY KEY,
    job_id           TEXT NOT NULL REFERENCES jobs (id),
    agent_id         TEXT NOT NULL REFERENCES agents (id),
    number           INTEGER NOT NULL,
    state            TEXT NOT NULL,
    reason           TEXT,
    created_at       INTEGER NOT NULL,
    not_before       INTEGER NOT NULL,
    dispatched_at    INTEGER,
    started_at       INTEGER,
    lease_expires_at INTEGER,
    finished_at      INTEGER,
    exit_code        INTEGER,
    signal           INTEGER,
    duration_ms      INTEGER,
    error            TEXT,
    stdout_truncated INTEGER NOT NULL DEFAULT 0,
    stderr_truncated INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    UNIQUE (job_id, agent_id, number)
);

CREATE INDEX attempts_agent_state ON attempts (agent_id, state, not_before);
CREATE INDEX attempts_job ON attempts (job_id);
CREATE INDEX attempts_lease ON attempts (state, lease_expires_at);

CREATE TABLE attempt_logs (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     TEXT NOT NULL,
    attempt_id TEXT NOT NULL,
    stream     TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    data       TEXT NOT NULL,
    UNIQUE (attempt_id, stream, seq)
);

CREATE INDEX attempt_logs_job ON attempt_logs (job_id, id);

CREATE TABLE audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    status  INTEGER NOT NULL,
    outcome TEXT NOT NULL
);

CREATE INDEX audit_at ON audit (at);
