-- The operator's queries: the taskomatic command line (submit, tasks, show,
-- cancel, retry, status, instances) and the demo. Functions in
-- taskomatic/db/operator.py run them. A block starts with "-- name --", then
-- one line saying what it is for, then the SQL with %(named)s parameters.

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

-- submit_task --
-- Queue one task, as any other program would.
INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by)
VALUES (%(target_type)s, %(target_id)s, %(action)s, %(args)s, %(submitted_by)s)
RETURNING id;

-- cancel_task --
-- Cancel a task that has not started. A claimed one is canceled too: the
-- shard's mark_running then refuses it.
UPDATE tasks
SET state = 'canceled', time_ended = clock_timestamp(),
    message = %(message)s
WHERE id = %(task_id)s AND state = 'queued'
RETURNING id;

-- retry_task --
-- Queue a copy of a failed or canceled task at the end of its key's queue.
INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by)
SELECT task_target_type, task_target_id, action, args, 'taskomatic retry of task ' || id
FROM tasks WHERE id = %(task_id)s AND state IN ('failed', 'canceled')
RETURNING id;

-- active_counts --
-- Queued and running tasks (partial indexes: cheap however large the table).
-- The condition is state IN ('queued', 'running') as the indexes hold it (migration 0010).
SELECT state, count(*) AS n FROM tasks
WHERE (state = 'queued' AND claimed_by IS NULL) OR (claimed_by IS NOT NULL AND state IN ('queued', 'running'))
GROUP BY state;

-- oldest_queued --
-- The task waiting longest: the first of the unclaimed ones and of the claimed ones (one index each).
SELECT id, action, task_target_type, task_target_id, created_at,
       extract(epoch FROM clock_timestamp() - created_at) AS age
FROM ((SELECT * FROM tasks WHERE state = 'queued' AND claimed_by IS NULL ORDER BY id LIMIT 1)
      UNION ALL
      (SELECT * FROM tasks WHERE state = 'queued' AND claimed_by IS NOT NULL ORDER BY id LIMIT 1)) AS first
ORDER BY id LIMIT 1;

-- running_tasks --
-- What runs now, and for how long (a running task always has a holder: the index of held tasks).
SELECT id, action, task_target_type, task_target_id, claimed_by, attempts, time_started,
       extract(epoch FROM clock_timestamp() - time_started) AS seconds
FROM tasks WHERE state = 'running' AND claimed_by IS NOT NULL ORDER BY id;

-- live_instances --
-- Instances that have not stopped, with the age of their last heartbeat.
SELECT id, hostname, pid, version, mode, shards, started_at,
       extract(epoch FROM clock_timestamp() - heartbeat_at) AS heartbeat_age
FROM instances WHERE stopped_at IS NULL ORDER BY id DESC LIMIT 20;

-- tasks_changed_since --
-- For tasks --follow: tasks created or ended after a point (only an ended task has time_ended: the
-- state condition lets tasks_ended_idx serve it, with the primary key, instead of reading the table).
SELECT id, task_target_type, task_target_id, action, state, message, time_started, time_ended, created_at
FROM tasks
WHERE id > %(last_id)s OR (time_ended > %(since)s AND state IN ('finished', 'failed', 'canceled'))
ORDER BY coalesce(time_ended, created_at), id
LIMIT 1000;

-- all_instances --
-- Every instance, newest first, with its lease and what it holds.
SELECT i.id, i.hostname, i.pid, i.version, i.mode, i.shards, i.started_at, i.stopped_at,
       extract(epoch FROM clock_timestamp() - i.heartbeat_at)::double precision AS heartbeat_age,
       extract(epoch FROM i.lease_expires_at - clock_timestamp())::double precision AS lease_left,
       (SELECT count(*) FROM partition_leases pl WHERE pl.instance_id = i.id) AS partitions_held,
       (SELECT count(*) FROM partition_leases pl WHERE pl.instance_id = i.id AND pl.releasing)
           AS partitions_releasing,
       (SELECT count(*) FROM tasks t WHERE t.claimed_by = i.id AND t.state = 'queued') AS tasks_claimed,
       (SELECT count(*) FROM tasks t WHERE t.claimed_by = i.id AND t.state = 'running') AS tasks_running
FROM instances i
ORDER BY i.id DESC
LIMIT %(limit)s;

-- task_details --
-- One task whole, for taskomatic show: every public column, the claim, the
-- holder instance, and how long it waited and ran (seconds, NULL if not yet).
SELECT t.id, t.task_target_type, t.task_target_id, t.action, t.args, t.state, t.message,
       t.submitted_by, t.created_at, t.time_started, t.time_ended, t.attempts,
       t.key_type, t.key_id, t.parent_task_id, t.claimed_by, t.claimed_at, t.run_by_shard,
       extract(epoch FROM coalesce(t.time_started, clock_timestamp()) - t.created_at)::double precision
           AS waited_seconds,
       extract(epoch FROM coalesce(t.time_ended, clock_timestamp()) - t.time_started)::double precision
           AS ran_seconds,
       i.hostname AS holder_hostname, i.pid AS holder_pid, i.mode AS holder_mode,
       i.stopped_at AS holder_stopped_at,
       extract(epoch FROM clock_timestamp() - i.heartbeat_at)::double precision AS holder_heartbeat_age,
       ARRAY(SELECT c.id FROM tasks c WHERE c.parent_task_id = t.id ORDER BY c.id) AS child_task_ids,
       (SELECT count(*) FROM tasks q WHERE q.key_type = t.key_type AND q.key_id = t.key_id
          AND q.state IN ('queued', 'running', 'paused') AND q.id < t.id)::integer AS ahead_in_key
FROM tasks t LEFT JOIN instances i ON i.id = t.claimed_by
WHERE t.id = %(task_id)s;

-- matching_tasks --
-- Ids of the tasks a filter selects (NULL means any), oldest first, for cancel and retry by filter.
SELECT id FROM tasks
WHERE state = ANY(%(states)s)
  AND (%(target_type)s::text IS NULL OR task_target_type = %(target_type)s)
  AND (%(target_id)s::bigint IS NULL OR task_target_id = %(target_id)s)
  AND (%(action)s::text IS NULL OR action = %(action)s)
ORDER BY id;

-- cancel_tasks --
-- Cancel some tasks that have not started (see cancel_task); returns those canceled.
UPDATE tasks
SET state = 'canceled', time_ended = clock_timestamp(), message = %(message)s
WHERE id = ANY(%(ids)s) AND state = 'queued'
RETURNING id;

-- retry_tasks --
-- Queue copies of some failed or canceled tasks, in id order (each at the end of its key's queue).
INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by)
SELECT task_target_type, task_target_id, action, args, 'taskomatic retry of task ' || id
FROM tasks WHERE id = ANY(%(ids)s) AND state IN ('failed', 'canceled')
ORDER BY id
RETURNING id;

-- demo_queue_vm_tasks --
-- The demo queues VM tasks the way a web UI would, in the order given (arrays are parallel).
INSERT INTO tasks (task_target_type, task_target_id, action, submitted_by)
SELECT 'Vm', q.vm_id, q.action, 'taskomatic demo'
FROM unnest(%(vm_ids)s::bigint[], %(actions)s::text[]) WITH ORDINALITY AS q(vm_id, action, n)
ORDER BY q.n;

-- demo_add_host --
-- One demo host: a libvirt node with the test driver and the room given.
INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory)
VALUES (%(hostname)s, %(libvirt_uri)s, 'TEST', %(num_cpus)s, %(memory_kb)s);

-- demo_add_vms --
-- The demo's VMs, in the order given (arrays are parallel); returns their ids.
INSERT INTO vms (description, num_vcpus_allocated, memory_allocated)
SELECT v.description, v.vcpus, v.memory
FROM unnest(%(descriptions)s::text[], %(vcpus)s::integer[], %(memory)s::bigint[]) WITH ORDINALITY
     AS v(description, vcpus, memory, n)
ORDER BY v.n
RETURNING id;

-- ended_task_count --
-- How many tasks have ended (finished, failed or canceled).
SELECT count(*) FROM tasks WHERE state IN ('finished', 'failed', 'canceled');

-- vms_and_their_nodes --
-- Every VM with its state and the libvirt URI of its host (NULL when unplaced).
SELECT v.id, v.uuid::text AS uuid, v.state, h.libvirt_uri
FROM vms v LEFT JOIN hosts h ON h.id = v.host_id
ORDER BY v.id;

-- task_state_counts --
-- How many tasks are in each state, by state name.
SELECT state, count(*) AS n FROM tasks GROUP BY state ORDER BY state;

-- task_time_span --
-- When the first task started and the last one ended.
SELECT min(time_started) AS first, max(time_ended) AS last FROM tasks;

-- ended_task_timings --
-- Run time (time_started to time_ended) and wait (created_at to time_started) of every ended task, in seconds.
SELECT action, extract(epoch FROM time_ended - time_started)::double precision AS run,
       extract(epoch FROM time_started - created_at)::double precision AS wait
FROM tasks WHERE time_ended IS NOT NULL;

-- failure_kinds --
-- Failed tasks grouped by their wording, numbers aside ("VM 12" and "VM 31" are one kind).
SELECT min(message) AS message, count(*) AS n FROM tasks WHERE state = 'failed'
GROUP BY regexp_replace(message, '[0-9]+', 'N', 'g') ORDER BY n DESC, 1 LIMIT 8;

-- order_violations --
-- Per-key order check: tasks of one key that started before the previous one (by id) ended.
WITH ordered AS (
    SELECT id, key_type, key_id, time_started, time_ended,
           lag(time_ended) OVER (PARTITION BY key_type, key_id ORDER BY id) AS previous_end
    FROM tasks
    WHERE time_started IS NOT NULL
)
SELECT count(*) FILTER (WHERE previous_end > time_started) AS violations,
       count(DISTINCT (key_type, key_id)) AS keys
FROM ordered;

-- vm_states --
-- Every VM's state.
SELECT id, state FROM vms;

-- tasks_by_id --
-- Some tasks' action, state and message, in id order.
SELECT id, action, state, message FROM tasks WHERE id = ANY(%(ids)s) ORDER BY id;

-- demo_add_pool --
-- The demo's directory storage pool.
INSERT INTO storage_pools (name, pool_type, target_path)
VALUES (%(name)s, 'dir', %(target_path)s)
RETURNING id;

-- demo_add_volume --
-- A volume row in a pool (size in KB), to be created by a create_volume task.
INSERT INTO storage_volumes (storage_pool_id, name, size) VALUES (%(pool_id)s, %(name)s, %(size)s)
RETURNING id;

-- pool_state --
-- A storage pool's state.
SELECT state FROM storage_pools WHERE id = %(pool_id)s;

-- pool_volume_list --
-- A pool's volumes: name, size (KB) and state, in id order.
SELECT name, size, state FROM storage_volumes WHERE storage_pool_id = %(pool_id)s ORDER BY id;

-- first_host --
-- The host with the lowest id.
SELECT id, hostname FROM hosts ORDER BY id LIMIT 1;

-- disable_host --
-- Disable a host (clear_vms then empties it; placement no longer picks it).
UPDATE hosts SET is_disabled = true WHERE id = %(host_id)s;

-- vm_count_on_host --
-- How many VMs are placed on a host.
SELECT count(*) FROM vms WHERE host_id = %(host_id)s;
