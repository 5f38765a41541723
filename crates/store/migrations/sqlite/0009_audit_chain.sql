-- The audit log as a hash chain (issue 13, point 4). Each row carries the
-- hash of the row before it and its own (see `drover_store::audit` for the
-- encoding). Rows written before this migration are chained once, at the
-- next start, in id order (`Store::open`, while `chained = 0`).
ALTER TABLE audit ADD COLUMN prev_hash TEXT;
ALTER TABLE audit ADD COLUMN hash TEXT;

-- The end of the chain: the id and hash of its last row. Every append
-- bumps `seq` first, which serialises appenders (on PostgreSQL across
-- transactions and replicas alike) and gives the new row its id.
CREATE TABLE audit_head (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    seq     INTEGER NOT NULL,
    hash    TEXT NOT NULL,
    chained INTEGER NOT NULL
);

INSERT INTO audit_head (id, seq, hash, chained)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000', 0);
