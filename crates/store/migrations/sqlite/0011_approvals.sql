-- Approvals (issue 13, point 2). A protection rule names actions, sandbox
-- profiles or workflows (a name glob) or agents (a target selector); work
-- that touches one waits in awaiting_approval until enough people approve
-- the request, which is bound to the sha256 of the canonical spec.
CREATE TABLE protections (
    id         TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    pattern    TEXT NOT NULL,
    approvers  INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (kind, pattern)
);

CREATE TABLE approvals (
    id               TEXT PRIMARY KEY,
    job_id           TEXT,
    run_id           TEXT,
    spec_hash        TEXT NOT NULL,
    spec             TEXT NOT NULL,
    reasons          TEXT NOT NULL,
    approvers_needed INTEGER NOT NULL,
    requested_by     TEXT NOT NULL,
    requested_at     INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    state            TEXT NOT NULL,
    decided_at       INTEGER,
    decided_by       TEXT,
    reason           TEXT
);
CREATE INDEX approvals_state ON approvals (state, expires_at);
CREATE INDEX approvals_job ON approvals (job_id);
CREATE INDEX approvals_run ON approvals (run_id);

CREATE TABLE approval_votes (
    approval_id TEXT NOT NULL REFERENCES approvals (id),
    username    TEXT NOT NULL,
    at          INTEGER NOT NULL,
    PRIMARY KEY (approval_id, username)
);

-- The spec hash a granted approval holds for; checked again when the
-- work is handed out, so a spec changed after approval waits again.
ALTER TABLE jobs ADD COLUMN approved_hash TEXT;
ALTER TABLE workflow_runs ADD COLUMN approved_hash TEXT;
