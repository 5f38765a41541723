-- Roles and scopes (issue 13, point 1). A user's scope limits where an
-- operator may act: a target selector and action globs (JSON array), NULL
-- meaning everywhere. A disabled user can neither log in nor use a token.
ALTER TABLE users ADD COLUMN scope_target TEXT;
ALTER TABLE users ADD COLUMN scope_actions TEXT;
ALTER TABLE users ADD COLUMN disabled_at INTEGER;

-- A token acts with its own role and scope, never more than its user's at
-- the time of each request. NULL role: the user's (sessions).
ALTER TABLE user_tokens ADD COLUMN role TEXT;
ALTER TABLE user_tokens ADD COLUMN scope_target TEXT;
ALTER TABLE user_tokens ADD COLUMN scope_actions TEXT;
CREATE INDEX user_tokens_user ON user_tokens (user_id);

-- API tokens made before tokens expired get 90 days from their creation.
UPDATE user_tokens SET expires_at = created_at + 7776000000
    WHERE expires_at IS NULL;

-- A bootstrap token can be revoked before it is used.
ALTER TABLE bootstrap_tokens ADD COLUMN revoked_at INTEGER;

-- The scope of whoever submitted a run: its tasks' jobs stay inside it.
ALTER TABLE workflow_runs ADD COLUMN scope TEXT;
