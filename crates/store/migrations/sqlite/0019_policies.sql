-- Policies (issue 16): a script version or an action bound to the agents a
-- selector reaches, run by each agent on its own clock. `spec` is the
-- resolved policy (JSON), `hash` names it: agents see a changed set by it.
CREATE TABLE policies (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    hash       TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    updated_by TEXT NOT NULL
);

-- A force-run of a policy, for the agents (of `target`, when given) that
-- poll within an hour.
CREATE TABLE policy_forces (
    id         TEXT PRIMARY KEY,
    policy     TEXT NOT NULL,
    target     TEXT,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX policy_forces_by_time ON policy_forces (created_at);

-- Every run an agent reported, once: `id` is the agent's own UUIDv7, so
-- a report delivered again after a lost answer is not stored twice.
CREATE TABLE policy_runs (
    id           TEXT PRIMARY KEY,
    agent_id     TEXT NOT NULL,
    policy       TEXT NOT NULL,
    version      TEXT NOT NULL,
    trigger_kind TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    exit_code    INTEGER,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER NOT NULL,
    duration_ms  INTEGER NOT NULL,
    output       TEXT NOT NULL,
    error        TEXT,
    received_at  INTEGER NOT NULL
);
CREATE INDEX policy_runs_by_time ON policy_runs (started_at, id);
CREATE INDEX policy_runs_by_agent ON policy_runs (agent_id, started_at);
CREATE INDEX policy_runs_by_policy ON policy_runs (policy, started_at);

-- Settings of a group of agents (`drover groups set`).
CREATE TABLE group_settings (
    name             TEXT PRIMARY KEY,
    poll_interval_ms INTEGER,
    updated_by       TEXT NOT NULL,
    updated_at       INTEGER NOT NULL
);

-- When the agent last asked for its desired state (kept to a few seconds).
ALTER TABLE agents ADD COLUMN desired_polled_at INTEGER;
