-- A task's writes as it runs (taskomatic/db/task_writes.py).
-- A block starts with "-- name --", then one line saying what it is for, then the
-- SQL with %(named)s parameters; names are unique across taskomatic/db/sql/*.sql.

-- task_states --
-- Current state, holder and running slot of some tasks.
SELECT id, state, claimed_by, run_by_shard FROM tasks WHERE id = ANY(%(ids)s);

-- mark_running --
-- A shard is about to start these tasks (one, or a batch of different keys).
-- Returns those it may start (with when each was submitted, for the
-- enqueue-to-start metric at no extra query): a task canceled meanwhile, or no
-- longer ours, is left out, so it never starts. run_by_shard: only this slot
-- may reconcile it after a crash.
UPDATE tasks
SET state = 'running', time_started = %(time_started)s, attempts = attempts + 1,
    run_by_shard = %(shard)s
WHERE id = ANY(%(task_ids)s::bigint[]) AND claimed_by = %(instance_id)s AND state = 'queued'
RETURNING id, created_at;

-- mark_rerun --
-- A task found "not started" by reconciliation runs again in its place.
UPDATE tasks
SET time_started = %(time_started)s, attempts = attempts + 1, run_by_shard = %(shard)s
WHERE id = %(task_id)s AND claimed_by = %(instance_id)s AND state = 'running'
RETURNING id;

-- record_outcome --
-- Write one task's end. Only the holder can, and only once. (The shards write
-- through record_outcomes; this is the same rule for one task.)
UPDATE tasks
SET state = %(state)s, message = %(message)s,
    time_started = coalesce(%(time_started)s, time_started), time_ended = %(time_ended)s
WHERE id = %(task_id)s AND claimed_by = %(instance_id)s AND state = 'running'
RETURNING id;

-- record_outcomes --
-- Write the ends of some tasks (the arrays are parallel). Only the holder can,
-- and only once: the ids it returns are those written. time_started is the
-- moment the action really started (NULL: keep the one marked).
-- No join: the ids are the index condition (so the scan is O(ids) whatever the
-- statistics say, migration 0010), and each row finds its values by its
-- position in the ids array. Joined to unnest(...), the planner put the tasks
-- outside and rescanned the unnest for each of them (n^2 rows through a join
-- filter: 4,032 for a batch of 64, 1.5 of the statement's 1.9 ms); without the
-- ids as a condition it hashed every claimed task instead.
UPDATE tasks t
SET state = (%(states)s::text[])[array_position(%(task_ids)s::bigint[], t.id)],
    message = (%(messages)s::text[])[array_position(%(task_ids)s::bigint[], t.id)],
    time_started = coalesce((%(starts)s::timestamptz[])[array_position(%(task_ids)s::bigint[], t.id)],
                            t.time_started),
    time_ended = (%(ends)s::timestamptz[])[array_position(%(task_ids)s::bigint[], t.id)]
WHERE t.id = ANY(%(task_ids)s::bigint[]) AND t.claimed_by = %(instance_id)s AND t.state = 'running'
RETURNING t.id;

-- fail_unstartable --
-- A queued task we hold fails before it starts (for example it cannot be parsed).
UPDATE tasks
SET state = 'failed', message = %(message)s,
    time_started = %(time)s, time_ended = %(time)s, attempts = attempts + 1
WHERE id = %(task_id)s AND claimed_by = %(instance_id)s AND state IN ('queued', 'running')
RETURNING id;

-- children_of --
-- The tasks a task queued (clear_vms's migrations), to know when it is done.
SELECT id, action, task_target_type, task_target_id, state, message
FROM tasks WHERE parent_task_id = %(task_id)s ORDER BY id;

-- insert_child_task --
-- A task queued by another task; it goes to the back of its key's queue.
INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by, parent_task_id)
VALUES (%(target_type)s, %(target_id)s, %(action)s, %(args)s, %(submitted_by)s, %(parent_task_id)s)
RETURNING id;

-- task_claim --
-- The claim under which a task was marked running (read in that transaction).
SELECT claimed_by, attempts FROM tasks WHERE id = %(task_id)s;

-- hold_running_task --
-- Fencing for writes made in perform: the task is still running under that claim.
SELECT id FROM tasks
WHERE id = %(task_id)s AND state = 'running'
  AND claimed_by = %(claimed_by)s AND attempts = %(attempts)s
FOR UPDATE;

-- end_and_start --
-- record_outcomes and mark_running in one statement, for a shard whose held
-- ends have no row changes: they are written by the statement that starts its
-- next tasks. Alone in its transaction it is one round trip, commit included.
-- The two sets are disjoint (an ended task is running, a starting one queued),
-- and neither update needs to see the other's rows (both see the rows as they
-- were before the statement). Same rules as the two statements: only the
-- holder writes, only once. Returns each id written (started false) or
-- started (true, with when it was submitted).
WITH ended AS (
    UPDATE tasks t
    SET state = (%(states)s::text[])[array_position(%(end_ids)s::bigint[], t.id)],
        message = (%(messages)s::text[])[array_position(%(end_ids)s::bigint[], t.id)],
        time_started = coalesce((%(starts)s::timestamptz[])[array_position(%(end_ids)s::bigint[], t.id)],
                                t.time_started),
        time_ended = (%(ends)s::timestamptz[])[array_position(%(end_ids)s::bigint[], t.id)]
    WHERE t.id = ANY(%(end_ids)s::bigint[]) AND t.claimed_by = %(instance_id)s AND t.state = 'running'
    RETURNING t.id
), started AS (
    UPDATE tasks t
    SET state = 'running', time_started = %(time_started)s, attempts = t.attempts + 1, run_by_shard = %(shard)s
    WHERE t.id = ANY(%(start_ids)s::bigint[]) AND t.claimed_by = %(instance_id)s AND t.state = 'queued'
    RETURNING t.id, t.created_at
)
SELECT id, NULL::timestamptz AS created_at, false AS started FROM ended
UNION ALL
SELECT id, created_at, true FROM started;
