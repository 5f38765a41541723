-- Removed agents (issue 14, point 12): `drover agents rm` removes a revoked
-- agent from every listing and target but keeps its row, so the attempts
-- it ran (which reference it) and their job history stay readable.
ALTER TABLE agents ADD COLUMN removed_at INTEGER;
