-- The secrets vault (issue 13, point 3). Values are sealed with
-- XChaCha20-Poly1305 under a random data key; the data key is stored only
-- wrapped (sealed) under a master key that never enters the database,
-- named by its id (a hash of the key, not the key).

CREATE TABLE vault_keys (
    id            TEXT PRIMARY KEY,
    -- Which master key wraps it now (rotation rewrites both columns).
    master_key_id TEXT NOT NULL,
    -- base64(nonce || ciphertext || tag) of the 32-byte data key.
    wrapped       TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    rewrapped_at  INTEGER NOT NULL
);

CREATE TABLE secrets (
    name        TEXT PRIMARY KEY,
    -- "v1:<data key id>:base64(nonce || ciphertext || tag)", the name as
    -- associated data: a value moved to another name does not open.
    sealed      TEXT NOT NULL,
    -- JSON list of action globs the secret may be sent to (empty: any).
    actions     TEXT NOT NULL,
    -- Target selector of the agents that may receive it (NULL: any).
    target      TEXT,
    version     INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    updated_by  TEXT NOT NULL
);
