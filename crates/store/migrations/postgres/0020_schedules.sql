-- Server-side schedules (issue 16, point 5): an action or a workflow
-- started on a cron clock by the server itself, as the schedule's creator.
-- `spec` is the JSON of what to start; `scope` the creator's limits when
-- it was made (JSON, NULL meaning everywhere); `next_slot` the first slot
-- not yet looked at (ms), NULL while paused.
CREATE TABLE schedules (
    name        TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    spec        TEXT NOT NULL,
    cron        TEXT NOT NULL,
    timezone    TEXT NOT NULL,
    overlap     TEXT NOT NULL,
    missed      TEXT NOT NULL,
    paused      BIGINT NOT NULL DEFAULT 0,
    scope       TEXT,
    created_by  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    next_slot   BIGINT
);
CREATE INDEX schedules_due ON schedules (next_slot);

-- One row per slot a schedule fired (or skipped): the primary key is the
-- unique slot key. A server fires a slot only when its INSERT of the row
-- wins, in the transaction that creates the job or run, so replicas on
-- one database fire each slot once. `target` is `job:ID` or `run:ID`;
-- `missed` counts the earlier slots a catch-up run stands for.
CREATE TABLE schedule_slots (
    schedule    TEXT NOT NULL,
    slot_at     BIGINT NOT NULL,
    outcome     TEXT NOT NULL,
    target      TEXT,
    detail      TEXT NOT NULL DEFAULT '',
    missed      BIGINT NOT NULL DEFAULT 0,
    claimed_at  BIGINT NOT NULL,
    PRIMARY KEY (schedule, slot_at)
);
