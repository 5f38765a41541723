-- Users, their sessions and API tokens, bootstrap tokens, agents and their
-- refresh tokens. Times are milliseconds since the Unix epoch; ids are text.

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);

CREATE TABLE user_tokens (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users (id),
    kind       TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    name       TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT
);

CREATE TABLE bootstrap_tokens (
    id            TEXT PRIMARY KEY,
    token_hash    TEXT NOT NULL UNIQUE,
    labels        TEXT NOT NULL,
    grp           TEXT,
    name          TEXT,
    created_by    TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    used_at       BIGINT,
    used_by_agent TEXT
);

CREATE TABLE agents (
    id                   TEXT PRIMARY KEY,
    hostname             TEXT NOT NULL,
    labels               TEXT NOT NULL,
    grp                  TEXT,
    agent_version        TEXT,
    enrolled_at          BIGINT NOT NULL,
    last_seen_at         BIGINT,
    inventory            TEXT,
    -- The refresh-token family the agent may use; NULL once it was ended.
    session_id           TEXT,
    session_ended_reason TEXT,
    revoked_at           BIGINT,
    revoked_reason       TEXT
);

CREATE TABLE agent_refresh_tokens (
    token_hash TEXT PRIMARY KEY,
    agent_id   TEXT NOT NULL REFERENCES agents (id),
    session_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at    BIGINT
);

CREATE INDEX agent_refresh_tokens_agent ON agent_refresh_tokens (agent_id);
