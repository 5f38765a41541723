-- The dashboard's job list pages newest first, by (created_at, id), and an
-- agent's page lists its latest attempts (issue 15). The new jobs index
-- makes the one on created_at alone redundant.
CREATE INDEX jobs_created_id ON jobs (created_at, id);
DROP INDEX jobs_created;
CREATE INDEX attempts_agent_created ON attempts (agent_id, created_at);
