-- Queries of the operator's commands (taskomatic/cli.py, taskomatic/demo.py), still called by name;
-- they move to their own database module (db/operator.py, sql/operator.sql).
-- A block starts with "-- name --", then one line saying what it is for, then the
-- SQL with %(named)s parameters; names are unique across taskomatic/db/sql/*.sql.

-- cancel_task --
-- Cancel a task that has not started. A claimed one is canceled too: the
-- shard's mark_running then refuses it.
UPDATE tasks
SET state = 'canceled', time_ended = clock_timestamp(),
    message = %(message)s
WHERE id = %(task_id)s AND state = 'queued'
RETURNING id;

-- submit_task --
-- Queue one task, as any other program would.
INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by)
VALUES (%(target_type)s, %(target_id)s, %(action)s, %(args)s, %(submitted_by)s)
RETURNING id;

-- list_tasks --
-- Recent tasks, newest first, with optional filters (NULL means any).
SELECT id, task_target_type, task_target_id, action, args, state, message, submitted_by,
       created_at, time_started, time_ended, claimed_by, attempts
FROM tasks
WHERE (%(state)s::text IS NULL OR state = %(state)s)
  AND (%(target_type)s::text IS NULL OR task_target_type = %(target_type)s)
  AND (%(target_id)s::bigint IS NULL OR task_target_id = %(target_id)s)
  AND (%(action)s::text IS NULL OR action = %(action)s)
ORDER BY id DESC
LIMIT %(limit)s;

-- retry_task --
-- Queue a copy of a failed or canceled task at the end of its key's queue.
INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by)
SELECT task_target_type, task_target_id, action, args, 'taskomatic retry of task ' || id
FROM tasks WHERE id = %(task_id)s AND state IN ('failed', 'canceled')
RETURNING id;

-- active_counts --
-- Queued and running tasks (partial indexes: cheap however large the table).
SELECT state, count(*) AS n FROM tasks WHERE state IN ('queued', 'running') GROUP BY state;

-- oldest_queued --
-- The task waiting longest.
SELECT id, action, task_target_type, task_target_id, created_at,
       extract(epoch FROM clock_timestamp() - created_at) AS age
FROM tasks WHERE state = 'queued' ORDER BY id LIMIT 1;

-- running_tasks --
-- What runs now, and for how long.
SELECT id, action, task_target_type, task_target_id, claimed_by, attempts, time_started,
       extract(epoch FROM clock_timestamp() - time_started) AS seconds
FROM tasks WHERE state = 'running' ORDER BY id;

-- live_instances --
-- Instances that have not stopped, with the age of their last heartbeat.
SELECT id, hostname, pid, version, mode, shards, started_at,
       extract(epoch FROM clock_timestamp() - heartbeat_at) AS heartbeat_age
FROM instances WHERE stopped_at IS NULL ORDER BY id DESC LIMIT 20;

-- tasks_changed_since --
-- For tasks --follow: tasks created or ended after a point.
SELECT id, task_target_type, task_target_id, action, state, message, time_started, time_ended, created_at
FROM tasks
WHERE id > %(last_id)s OR time_ended > %(since)s
ORDER BY coalesce(time_ended, created_at), id
LIMIT 1000;

-- all_instances --
-- Every instance, newest first, with its lease and what it holds.
SELECT i.id, i.hostname, i.pid, i.version, i.mode, i.shards, i.started_at, i.stopped_at,
       extract(epoch FROM clock_timestamp() - i.heartbeat_at)::double precision AS heartbeat_age,
       extract(epoch FROM i.lease_expires_at - clock_timestamp())::double precision AS lease_left,
       (SELECT count(*) FROM key_claims c WHERE c.instance_id = i.id) AS keys_held,
       (SELECT count(*) FROM tasks t WHERE t.claimed_by = i.id AND t.state = 'queued') AS tasks_claimed,
       (SELECT count(*) FROM tasks t WHERE t.claimed_by = i.id AND t.state = 'running') AS tasks_running
FROM instances i
ORDER BY i.id DESC
LIMIT %(limit)s;
