-- The hash of the token a refresh token was traded for. The server derives
-- a successor from its predecessor, so when a rotation's answer is lost and
-- the agent presents the same token again shortly after, the server can
-- recognise the successor it made (still never used) and hand it over again
-- instead of calling it reuse. NULL: never traded, or traded before this
-- column existed (such a token presented again is reuse, as before).
ALTER TABLE agent_refresh_tokens ADD COLUMN successor_hash TEXT;
