-- Durable workflows: definitions by hash, runs and their tasks, the event
-- stream of each run, artifacts, webhooks and their deliveries.

CREATE TABLE workflow_defs (
    hash       TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    body       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE workflow_runs (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL,
    def_hash            TEXT NOT NULL REFERENCES workflow_defs (hash),
    state               TEXT NOT NULL,
    reason              TEXT,
    inputs              TEXT NOT NULL,
    created_by          TEXT NOT NULL,
    created_at          BIGINT NOT NULL,
    finished_at         BIGINT,
    deadline_at         BIGINT,
    cancel_requested_at BIGINT,
    -- Last event number of this run; bumped in every transaction that adds
    -- an event, which also serialises those transactions per run.
    event_seq           BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX workflow_runs_state ON workflow_runs (state);
CREATE INDEX workflow_runs_created ON workflow_runs (created_at);

CREATE TABLE workflow_tasks (
    run_id      TEXT NOT NULL REFERENCES workflow_runs (id),
    task_id     TEXT NOT NULL,
    position    BIGINT NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT,
    job_id      TEXT,
    outputs     TEXT NOT NULL DEFAULT '{}',
    started_at  BIGINT,
    finished_at BIGINT,
    PRIMARY KEY (run_id, task_id)
);

CREATE TABLE workflow_events (
    run_id  TEXT NOT NULL,
    seq     BIGINT NOT NULL,
    at      BIGINT NOT NULL,
    kind    TEXT NOT NULL,
    task_id TEXT,
    state   TEXT,
    message TEXT,
    stream  TEXT,
    PRIMARY KEY (run_id, seq)
);

ALTER TABLE jobs ADD COLUMN run_id TEXT;
ALTER TABLE jobs ADD COLUMN task_id TEXT;
ALTER TABLE jobs ADD COLUMN artifacts TEXT NOT NULL DEFAULT '[]';
CREATE UNIQUE INDEX jobs_run_task ON jobs (run_id, task_id);

ALTER TABLE attempts ADD COLUMN outputs TEXT NOT NULL DEFAULT '{}';

CREATE TABLE artifacts (
    id         TEXT PRIMARY KEY,
    run_id     TEXT,
    task_id    TEXT,
    job_id     TEXT NOT NULL,
    attempt_id TEXT NOT NULL,
    path       TEXT NOT NULL,
    size       BIGINT NOT NULL,
    sha256     TEXT NOT NULL,
    store_key  TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (attempt_id, path)
);

CREATE INDEX artifacts_run ON artifacts (run_id);

CREATE TABLE webhooks (
    id         TEXT PRIMARY KEY,
    url        TEXT NOT NULL,
    secret     TEXT NOT NULL,
    events     TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE webhook_deliveries (
    id           TEXT PRIMARY KEY,
    run_id       TEXT NOT NULL,
    url          TEXT NOT NULL,
    secret       TEXT,
    event        TEXT NOT NULL,
    payload      TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     BIGINT NOT NULL DEFAULT 0,
    next_at      BIGINT,
    history      TEXT NOT NULL DEFAULT '[]',
    created_at   BIGINT NOT NULL,
    delivered_at BIGINT
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_at);
CREATE INDEX webhook_deliveries_run ON webhook_deliveries (run_id);
