-- When a run next needs the engine's look (milliseconds; NULL: never
-- again). Set to the commit time by every commit that changes something
-- the run waits for; an engine claims due runs by pushing it ahead (a
-- lease), and sets the next look when its pass is done.
ALTER TABLE workflow_runs ADD COLUMN next_check_at BIGINT;
UPDATE workflow_runs SET next_check_at = 0 WHERE state = 'running' OR workspace_state = 'removing';
CREATE INDEX workflow_runs_next_check ON workflow_runs (next_check_at) WHERE next_check_at IS NOT NULL;
