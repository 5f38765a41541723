-- Sandbox profiles, the sandbox and workspace of each job, limits that
-- stopped attempts, forced cancels, whether agents and the fleet take
-- work, and the workspaces of workflow runs.

CREATE TABLE sandboxes (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    hash       TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    updated_by TEXT NOT NULL
);

-- The resolved profile (JSON) every attempt of the job runs in, and the
-- workspace (JSON) it runs in or creates or removes.
ALTER TABLE jobs ADD COLUMN sandbox TEXT;
ALTER TABLE jobs ADD COLUMN workspace TEXT;

ALTER TABLE attempts ADD COLUMN limit_exceeded TEXT;
-- Set with cancel_requested for a forced stop: SIGKILL without grace.
ALTER TABLE attempts ADD COLUMN cancel_force BIGINT NOT NULL DEFAULT 0;

-- active, draining or stopped.
ALTER TABLE agents ADD COLUMN dispatch TEXT NOT NULL DEFAULT 'active';
ALTER TABLE agents ADD COLUMN dispatch_reason TEXT;
ALTER TABLE agents ADD COLUMN dispatch_force BIGINT NOT NULL DEFAULT 0;

-- One row: whether dispatch is paused fleet-wide (an emergency stop).
CREATE TABLE fleet (
    id         BIGINT PRIMARY KEY CHECK (id = 1),
    stopped_at BIGINT,
    stopped_by TEXT,
    reason     TEXT,
    force      BIGINT NOT NULL DEFAULT 0
);
INSERT INTO fleet (id) VALUES (1);

ALTER TABLE workflow_runs ADD COLUMN workspace_state TEXT;
ALTER TABLE workflow_runs ADD COLUMN workspace_agent TEXT;
ALTER TABLE workflow_runs ADD COLUMN workspace_reason TEXT;
ALTER TABLE workflow_runs ADD COLUMN workspace_job TEXT;
ALTER TABLE workflow_runs ADD COLUMN workspace_remove_job TEXT;
CREATE INDEX workflow_runs_workspace ON workflow_runs (workspace_state);
