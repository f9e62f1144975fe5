-- A fleet's history for capacity planning (taskomatic plan): what was
-- submitted over a window, how long each action ran, how tasks spread over
-- the ordering keys. Functions in taskomatic/db/history.py run them, in one
-- read-only transaction. A window is created_at in [since, until); canceled
-- tasks are left out (they took no shard time). Tasks moved to tasks_archive
-- by retention count too (a move is one statement: a snapshot sees each task
-- once); tasks is read through its created_at block range index, the archive
-- through its created_at index. A block starts with
-- "-- name --", then one line saying what it is for, then the SQL.

-- history_window --
-- The window's tasks: how many, the first and last submission, the database's clock.
SELECT count(*) AS tasks, min(created_at) AS first_created, max(created_at) AS last_created,
       now() AS database_now
FROM (SELECT created_at FROM tasks
      WHERE created_at >= %(since)s AND created_at < %(until)s AND state <> 'canceled'
      UNION ALL
      SELECT created_at FROM tasks_archive
      WHERE created_at >= %(since)s AND created_at < %(until)s AND state <> 'canceled') AS t;

-- history_actions --
-- Per action: tasks submitted, how many ran to an end, their run time (mean, sd, max) and their wait from submission to start (mean, p95), seconds.
SELECT action,
       count(*) AS tasks,
       count(*) FILTER (WHERE time_started IS NOT NULL AND time_ended IS NOT NULL) AS ran,
       avg(extract(epoch FROM time_ended - time_started))::float8 AS run_mean_s,
       coalesce(stddev_pop(extract(epoch FROM time_ended - time_started)), 0)::float8 AS run_sd_s,
       max(extract(epoch FROM time_ended - time_started))::float8 AS run_max_s,
       avg(extract(epoch FROM time_started - created_at))::float8 AS wait_mean_s,
       (percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM time_started - created_at)))::float8
           AS wait_p95_s
FROM (SELECT action, created_at, time_started, time_ended FROM tasks
      WHERE created_at >= %(since)s AND created_at < %(until)s AND state <> 'canceled'
      UNION ALL
      SELECT action, created_at, time_started, time_ended FROM tasks_archive
      WHERE created_at >= %(since)s AND created_at < %(until)s AND state <> 'canceled') AS t
GROUP BY action
ORDER BY count(*) DESC, action;

-- history_rate_buckets --
-- Tasks submitted per bucket of bucket_s seconds (buckets with tasks only): the mean and the peak arrival rate.
SELECT to_timestamp(floor(extract(epoch FROM created_at) / %(bucket_s)s) * %(bucket_s)s) AS bucket_start,
       count(*) AS tasks
FROM (SELECT created_at FROM tasks
      WHERE created_at >= %(since)s AND created_at < %(until)s AND state <> 'canceled'
      UNION ALL
      SELECT created_at FROM tasks_archive
      WHERE created_at >= %(since)s AND created_at < %(until)s AND state <> 'canceled') AS t
GROUP BY 1
ORDER BY 1;

-- history_key_actions --
-- Tasks per ordering key and action: how the work concentrates on keys (each key runs one task at a time).
SELECT coalesce(key_type, task_target_type) AS key_type, key_id, action, count(*) AS tasks
FROM (SELECT key_type, task_target_type, key_id, action FROM tasks
      WHERE created_at >= %(since)s AND created_at < %(until)s AND state <> 'canceled'
      UNION ALL
      SELECT key_type, task_target_type, key_id, action FROM tasks_archive
      WHERE created_at >= %(since)s AND created_at < %(until)s AND state <> 'canceled') AS t
GROUP BY 1, 2, 3
ORDER BY 4 DESC, 1, 2, 3;
