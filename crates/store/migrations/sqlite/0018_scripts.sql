-- The scripts library (issue 16, point 1): every upload of a script is an
-- immutable version named by the SHA-256 of its content. Rows are never
-- updated; a version is found by (name, sha256).
CREATE TABLE scripts (
    name        TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    content     TEXT NOT NULL,
    interpreter TEXT NOT NULL,
    size        INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (name, sha256)
);
CREATE INDEX scripts_by_name_time ON scripts (name, created_at);
