-- A result that arrived after its attempt was declared lost: kept as
-- information (JSON: outcome, exit code, signal, duration, error, when it
-- finished and when it arrived), never changing a final state.
ALTER TABLE attempts ADD COLUMN late_result TEXT;
