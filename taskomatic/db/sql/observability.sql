-- The queries of taskomatic/db/observability.py: what the Prometheus endpoint reads.
-- A block starts with "-- name --", then one line saying what it is for, then the SQL.

-- queue_summary --
-- Tasks waiting and running, and the age of the oldest waiting one (0 when none), in one read.
SELECT count(*) FILTER (WHERE state = 'queued') AS queued,
       count(*) FILTER (WHERE state = 'running') AS running,
       coalesce(extract(epoch FROM clock_timestamp() - min(created_at) FILTER (WHERE state = 'queued')), 0)
           AS oldest_queued_seconds
FROM tasks
-- state IN ('queued', 'running'), as its two indexes hold it (migration 0010): a bitmap OR of both.
WHERE (state = 'queued' AND claimed_by IS NULL) OR (claimed_by IS NOT NULL AND state IN ('queued', 'running'));

