-- Audit entries that say what was done to what (issue 14, point 9): the
-- request behind the entry ("POST /api/v1/jobs/{id}/cancel"), the caller's
-- address and the details (reason, action, selector) as a JSON object.
-- Rows with `request` set are hashed with the v2 encoding (see
-- `drover_store::audit`); older rows keep their v1 hashes.
ALTER TABLE audit ADD COLUMN request TEXT;
ALTER TABLE audit ADD COLUMN source TEXT;
ALTER TABLE audit ADD COLUMN detail TEXT;
CREATE INDEX audit_target ON audit (target);
