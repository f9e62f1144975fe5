-- Retention of ended tasks (taskomatic/db/retention.py, taskomatic/retention.py).
-- A task leaves tasks once it ended (finished, failed, canceled) more than
-- keep_s seconds ago, by the database's clock (now(), not clock_timestamp():
-- a volatile cutoff cannot be an index condition, and each batch read the
-- whole table: 4.2 s with 10,000,000 rows), and no task it queued is still
-- in tasks (children go first: parent_task_id references tasks). Batches
-- follow tasks_ended_idx, oldest end first. A block starts with "-- name --",
-- then one line saying what it is for, then the SQL with %(named)s parameters.

-- retention_lock --
-- Only one instance (or command) runs retention at a time: this transaction's lock, or false.
SELECT pg_try_advisory_xact_lock(%(lock_id)s) AS locked;

-- retention_lock_wait --
-- The same lock, waiting for it (taskomatic db prune waits for a daemon's batch to end).
SELECT pg_advisory_xact_lock(%(lock_id)s);

-- archive_ended_tasks --
-- Move a batch of tasks ended before keep_s seconds ago into tasks_archive; returns how many moved.
WITH doomed AS (
    SELECT t.id FROM tasks t
    WHERE t.state IN ('finished', 'failed', 'canceled')
      AND t.time_ended < now() - make_interval(secs => %(keep_s)s::double precision)
      AND NOT EXISTS (SELECT 1 FROM tasks c WHERE c.parent_task_id = t.id)
    ORDER BY t.time_ended
    LIMIT %(batch)s
    FOR UPDATE OF t SKIP LOCKED
), moved AS (
    DELETE FROM tasks t USING doomed WHERE t.id = doomed.id
    RETURNING t.*
), archived AS (
    INSERT INTO tasks_archive SELECT * FROM moved
    RETURNING id
)
SELECT count(*) AS moved FROM archived;

-- prune_ended_tasks --
-- Delete a batch of tasks ended before keep_s seconds ago (archive = no); returns how many.
WITH doomed AS (
    SELECT t.id FROM tasks t
    WHERE t.state IN ('finished', 'failed', 'canceled')
      AND t.time_ended < now() - make_interval(secs => %(keep_s)s::double precision)
      AND NOT EXISTS (SELECT 1 FROM tasks c WHERE c.parent_task_id = t.id)
    ORDER BY t.time_ended
    LIMIT %(batch)s
    FOR UPDATE OF t SKIP LOCKED
), gone AS (
    DELETE FROM tasks t USING doomed WHERE t.id = doomed.id
    RETURNING t.id
)
SELECT count(*) AS moved FROM gone;

-- prune_archive --
-- Delete a batch of archived tasks that ended before keep_s seconds ago; returns how many.
WITH doomed AS (
    SELECT id FROM tasks_archive
    WHERE time_ended < now() - make_interval(secs => %(keep_s)s::double precision)
    ORDER BY time_ended
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM tasks_archive a USING doomed WHERE a.id = doomed.id
    RETURNING a.id
)
SELECT count(*) AS moved FROM gone;

-- count_ended_tasks --
-- How many tasks a pass would take out of tasks now (--dry-run), and the oldest one's end.
SELECT count(*) AS eligible, min(t.time_ended) AS oldest_end
FROM tasks t
WHERE t.state IN ('finished', 'failed', 'canceled')
  AND t.time_ended < now() - make_interval(secs => %(keep_s)s::double precision)
  AND NOT EXISTS (SELECT 1 FROM tasks c WHERE c.parent_task_id = t.id);

-- count_held_back_parents --
-- Ended tasks old enough to go but kept because a task they queued is still in tasks (--dry-run).
SELECT count(*) AS held_back
FROM tasks t
WHERE t.state IN ('finished', 'failed', 'canceled')
  AND t.time_ended < now() - make_interval(secs => %(keep_s)s::double precision)
  AND EXISTS (SELECT 1 FROM tasks c WHERE c.parent_task_id = t.id);

-- count_archive_expired --
-- How many archived tasks a pass would delete now (--dry-run).
SELECT count(*) AS eligible, min(time_ended) AS oldest_end
FROM tasks_archive
WHERE time_ended < now() - make_interval(secs => %(keep_s)s::double precision);

-- list_archived_tasks --
-- Archived tasks, newest first, with optional filters (NULL means any): taskomatic tasks --archive.
SELECT id, task_target_type, task_target_id, action, args, state, message, submitted_by,
       created_at, time_started, time_ended, claimed_by, attempts
FROM tasks_archive
WHERE (%(state)s::text IS NULL OR state = %(state)s)
  AND (%(target_type)s::text IS NULL OR task_target_type = %(target_type)s)
  AND (%(target_id)s::bigint IS NULL OR task_target_id = %(target_id)s)
  AND (%(action)s::text IS NULL OR action = %(action)s)
ORDER BY id DESC
LIMIT %(limit)s;

-- archived_task_details --
-- One archived task whole, for taskomatic show (the columns task_details gives, no holder: it ended).
SELECT a.id, a.task_target_type, a.task_target_id, a.action, a.args, a.state, a.message,
       a.submitted_by, a.created_at, a.time_started, a.time_ended, a.attempts,
       a.key_type, a.key_id, a.parent_task_id, a.claimed_by, a.claimed_at, a.run_by_shard,
       extract(epoch FROM a.time_started - a.created_at)::double precision AS waited_seconds,
       extract(epoch FROM a.time_ended - a.time_started)::double precision AS ran_seconds,
       ARRAY(SELECT c.id FROM tasks_archive c WHERE c.parent_task_id = a.id ORDER BY c.id) AS child_task_ids
FROM tasks_archive a
WHERE a.id = %(task_id)s;
