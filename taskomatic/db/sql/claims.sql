-- Claiming tasks and handing them back (taskomatic/db/claims.py).
-- A block starts with "-- name --", then one line saying what it is for, then the
-- SQL with %(named)s parameters; names are unique across taskomatic/db/sql/*.sql.

-- claim_settings --
-- First in a standalone claim's transaction.
-- synchronous_commit off: the commit does not wait for its WAL to reach the
-- disk (one fsync less between a task's insert and its start). Safe because a
-- claim is bookkeeping: if the server crashes before the WAL is flushed, the
-- claim is lost with everything after it that depended on it (a shard's
-- synchronous commit of 'running' flushes the claim first), and the task is
-- simply claimed again.
-- enable_bitmapscan and enable_sort off: claim_tasks must walk
-- tasks_claimable_idx in id order and stop after its batch. Right after a bulk
-- insert, before autovacuum has analysed the table, the planner expects a
-- handful of queued rows and prefers a bitmap scan of all of them and a sort:
-- a million queued tasks made every claim read them all (100 ms instead of 3).
SELECT set_config('synchronous_commit', 'off', true), set_config('enable_bitmapscan', 'off', true),
       set_config('enable_sort', 'off', true);

-- claim_tasks --
-- Take the oldest unclaimed queued tasks in one statement. Reads the partial
-- index tasks_claimable_idx only, so it is O(limit) whatever the table holds.
WITH picked AS (
    SELECT id FROM tasks
    WHERE state = 'queued' AND claimed_by IS NULL
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks t
SET claimed_by = %(instance_id)s, claimed_at = clock_timestamp()
FROM picked
WHERE t.id = picked.id
RETURNING t.id, t.task_target_type, t.task_target_id, t.action, t.args, t.key_type, t.key_id, t.state,
          t.partition, NULL::bigint AS token;

-- held_tasks --
-- What this instance holds: claimed but unfinished tasks, in id order.
-- run_by_shard: the slot that marked a running one (only it may settle it).
-- token: the partition's fencing token when a multihost lease of ours covers it, else NULL.
SELECT t.id, t.task_target_type, t.task_target_id, t.action, t.args, t.key_type, t.key_id, t.state,
       t.run_by_shard, t.partition, pl.token
FROM tasks t
LEFT JOIN partition_leases pl ON pl.partition = t.partition AND pl.instance_id = t.claimed_by
WHERE t.claimed_by = %(instance_id)s AND t.state IN ('queued', 'running')
ORDER BY t.id;

-- held_tasks_by_id --
-- Those of some tasks this instance still holds unfinished (a shard's lost tasks).
SELECT t.id, t.task_target_type, t.task_target_id, t.action, t.args, t.key_type, t.key_id, t.state,
       t.run_by_shard, t.partition, pl.token
FROM tasks t
LEFT JOIN partition_leases pl ON pl.partition = t.partition AND pl.instance_id = t.claimed_by
WHERE t.id = ANY(%(ids)s) AND t.claimed_by = %(instance_id)s AND t.state IN ('queued', 'running')
ORDER BY t.id;

-- release_unstarted --
-- Hand back claimed tasks that never started (drain, stop); they keep their place.
UPDATE tasks
SET claimed_by = NULL, claimed_at = NULL
WHERE claimed_by = %(instance_id)s AND state = 'queued';

-- tasks_changes_since_analyze --
-- Rows of the tasks table inserted, updated or deleted since it was last
-- analysed, and how many rows its statistics think it has.
SELECT s.n_mod_since_analyze AS changed, greatest(c.reltuples, 0)::bigint AS estimated
FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
WHERE s.relid = 'tasks'::regclass;

-- analyze_tasks --
-- Refresh the tasks table's planner statistics (samples it; a fraction of a second).
ANALYZE tasks;
