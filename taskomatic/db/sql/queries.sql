-- Every query taskomatic runs, by name. A block starts with "-- name --",
-- then one line saying what it is for, then the SQL with %(named)s parameters.

-- register_instance --
-- Record one daemon start; its id tags every claim it makes.
-- Multihost instances start with a lease (lease: seconds); standalone ones have none.
INSERT INTO instances (hostname, pid, version, mode, shards, lease_expires_at)
VALUES (%(hostname)s, %(pid)s, %(version)s, %(mode)s, %(shards)s,
        clock_timestamp() + make_interval(secs => %(lease)s::double precision))
RETURNING id;

-- instance_heartbeat --
-- Show the instance is alive.
UPDATE instances SET heartbeat_at = clock_timestamp() WHERE id = %(instance_id)s;

-- instance_stopped --
-- Mark a clean stop.
UPDATE instances SET stopped_at = clock_timestamp() WHERE id = %(instance_id)s;

-- try_standalone_guard --
-- Standalone takes the instance lock exclusively, multihost shares it: two
-- standalone instances, or a standalone and a multihost one, never share a database.
SELECT pg_try_advisory_lock(%(lock_id)s);

-- try_multihost_guard --
-- See try_standalone_guard.
SELECT pg_try_advisory_lock_shared(%(lock_id)s);

-- adopt_orphaned_claims --
-- Standalone start: every task an earlier instance held (it is dead, we hold the
-- guard) becomes ours, to be resent (queued) or reconciled (running).
UPDATE tasks
SET claimed_by = %(instance_id)s
WHERE claimed_by IS NOT NULL AND claimed_by <> %(instance_id)s
  AND state IN ('queued', 'running');

-- held_tasks --
-- What this instance holds: claimed but unfinished tasks, in id order.
-- run_by_shard: the slot that marked a running one (only it may settle it).
-- token: the key's fencing token when a multihost key claim covers it, else NULL.
SELECT t.id, t.task_target_type, t.task_target_id, t.action, t.args, t.key_type, t.key_id, t.state,
       t.run_by_shard, c.token
FROM tasks t
LEFT JOIN key_claims c ON c.key_type = t.key_type AND c.key_id = t.key_id AND c.instance_id = t.claimed_by
WHERE t.claimed_by = %(instance_id)s AND t.state IN ('queued', 'running')
ORDER BY t.id;

-- held_tasks_by_id --
-- Those of some tasks this instance still holds unfinished (a shard's lost tasks).
SELECT t.id, t.task_target_type, t.task_target_id, t.action, t.args, t.key_type, t.key_id, t.state,
       t.run_by_shard, c.token
FROM tasks t
LEFT JOIN key_claims c ON c.key_type = t.key_type AND c.key_id = t.key_id AND c.instance_id = t.claimed_by
WHERE t.id = ANY(%(ids)s) AND t.claimed_by = %(instance_id)s AND t.state IN ('queued', 'running')
ORDER BY t.id;

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
          NULL::bigint AS token;

-- task_states --
-- Current state, holder and running slot of some tasks.
SELECT id, state, claimed_by, run_by_shard FROM tasks WHERE id = ANY(%(ids)s);

-- mark_running --
-- A shard is about to start these tasks (one, or a batch of different keys).
-- Returns those it may start: a task canceled meanwhile, or no longer ours,
-- is left out, so it never starts. run_by_shard: only this slot may
-- reconcile it after a crash.
UPDATE tasks
SET state = 'running', time_started = %(time_started)s, attempts = attempts + 1,
    run_by_shard = %(shard)s
WHERE id = ANY(%(task_ids)s::bigint[]) AND claimed_by = %(instance_id)s AND state = 'queued'
RETURNING id;

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
UPDATE tasks t
SET state = o.state, message = o.message,
    time_started = coalesce(o.time_started, t.time_started), time_ended = o.time_ended
FROM unnest(%(task_ids)s::bigint[], %(states)s::text[], %(messages)s::text[],
            %(starts)s::timestamptz[], %(ends)s::timestamptz[])
     AS o(id, state, message, time_started, time_ended)
WHERE t.id = o.id AND t.claimed_by = %(instance_id)s AND t.state = 'running'
RETURNING t.id;

-- fail_unstartable --
-- A queued task we hold fails before it starts (for example it cannot be parsed).
UPDATE tasks
SET state = 'failed', message = %(message)s,
    time_started = %(time)s, time_ended = %(time)s, attempts = attempts + 1
WHERE id = %(task_id)s AND claimed_by = %(instance_id)s AND state IN ('queued', 'running')
RETURNING id;

-- release_unstarted --
-- Hand back claimed tasks that never started (drain, stop); they keep their place.
UPDATE tasks
SET claimed_by = NULL, claimed_at = NULL
WHERE claimed_by = %(instance_id)s AND state = 'queued';

-- get_vm --
-- A VM row with what actions need.
SELECT id, uuid::text AS uuid, description, num_vcpus_allocated, memory_allocated,
       state, host_id, target_host_id, boot_device, vnic_mac_addr, vnc_port
FROM vms WHERE id = %(vm_id)s;

-- get_vm_for_update --
-- The VM row, locked for the transaction that marks a task running.
SELECT id, uuid::text AS uuid, description, num_vcpus_allocated, memory_allocated,
       state, host_id, target_host_id, boot_device, vnic_mac_addr, vnc_port
FROM vms WHERE id = %(vm_id)s FOR UPDATE;

-- get_host --
-- A host row.
SELECT id, hostname, libvirt_uri, hypervisor_type, arch, state, is_disabled, num_cpus, memory
FROM hosts WHERE id = %(host_id)s;

-- lock_placement --
-- Placement decisions are serialised (held to the end of the transaction), so
-- two concurrent starts cannot both take a host's last free memory. One lock,
-- not row locks in changing order: those deadlock.
SELECT pg_advisory_xact_lock(%(lock_id)s);

-- place_vm --
-- Hosts that can take a VM, most free memory first. Counts what VMs placed
-- there already hold or are about to hold (in-flight starts and migrations
-- too, and saved VMs, which come back to their host on restore). Call with
-- lock_placement held.
SELECT h.id, h.hostname, h.libvirt_uri, h.hypervisor_type, h.arch, h.state, h.is_disabled,
       h.num_cpus, h.memory,
       h.memory - coalesce(c.memory, 0) AS free_memory,
       h.num_cpus - coalesce(c.vcpus, 0) AS free_cpus
FROM hosts h
LEFT JOIN LATERAL (
    SELECT sum(v.memory_allocated) AS memory, sum(v.num_vcpus_allocated) AS vcpus
    FROM vms v
    WHERE (v.host_id = h.id OR v.target_host_id = h.id) AND v.id <> %(vm_id)s
      AND v.state IN ('running', 'starting', 'suspended', 'suspending', 'resuming',
                      'stopping', 'powering_off', 'saving', 'saved', 'migrating', 'restoring',
                      'unreachable')
) c ON true
WHERE h.state = 'available' AND NOT h.is_disabled
  AND h.memory - coalesce(c.memory, 0) >= %(memory)s
  AND h.num_cpus - coalesce(c.vcpus, 0) >= %(vcpus)s
ORDER BY h.memory - coalesce(c.memory, 0) DESC, h.id;

-- task_counts --
-- How many tasks are in each state.
SELECT state, count(*) FROM tasks GROUP BY state;

-- children_of --
-- The tasks a task queued (clear_vms's migrations), to know when it is done.
SELECT id, action, task_target_type, task_target_id, state, message
FROM tasks WHERE parent_task_id = %(task_id)s ORDER BY id;

-- vms_on_host --
-- The VMs placed on a host, for clear_vms.
SELECT id, description, state FROM vms WHERE host_id = %(host_id)s ORDER BY id;

-- insert_child_task --
-- A task queued by another task; it goes to the back of its key's queue.
INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by, parent_task_id)
VALUES (%(target_type)s, %(target_id)s, %(action)s, %(args)s, %(submitted_by)s, %(parent_task_id)s)
RETURNING id;

-- all_hosts --
-- Every host, for the host-status pass.
SELECT id, hostname, libvirt_uri, hypervisor_type, state FROM hosts ORDER BY id;

-- set_host_state --
-- Mark a host available or unavailable; no row when it already was.
UPDATE hosts SET state = %(state)s, updated_at = clock_timestamp()
WHERE id = %(host_id)s AND state <> %(state)s
RETURNING id;

-- idle_vms_on_host --
-- VMs on a host with no task running: the ones the host-status pass may correct.
SELECT v.id, v.uuid::text AS uuid, v.state, v.host_id, v.updated_at
FROM vms v
WHERE v.host_id = %(host_id)s
  AND NOT EXISTS (SELECT 1 FROM tasks t
                  WHERE t.key_type = 'Vm' AND t.key_id = v.id AND t.state = 'running')
ORDER BY v.id;

-- correct_vm --
-- Set a VM's row to what its node reports, unless it changed since the pass
-- read it (seen: its updated_at then) or a task of the VM started:
-- reconciliation never fights an action over a row.
UPDATE vms
SET state = %(new_state)s,
    host_id = CASE WHEN %(clear_host)s THEN NULL ELSE host_id END,
    vnc_port = CASE WHEN %(clear_host)s THEN NULL ELSE vnc_port END,
    memory_used = CASE WHEN %(clear_host)s THEN 0 ELSE memory_used END,
    num_vcpus_used = CASE WHEN %(clear_host)s THEN 0 ELSE num_vcpus_used END,
    updated_at = clock_timestamp()
WHERE id = %(vm_id)s AND state = %(old_state)s AND updated_at = %(seen)s
  AND NOT EXISTS (SELECT 1 FROM tasks t
                  WHERE t.key_type = 'Vm' AND t.key_id = %(vm_id)s AND t.state = 'running')
RETURNING id;

-- get_storage_pool --
-- A storage pool row.
SELECT id, name, pool_type, source_host, source_path, target_path, state, capacity, allocation, host_id
FROM storage_pools WHERE id = %(pool_id)s;

-- get_storage_volume --
-- A storage volume row.
SELECT id, storage_pool_id, name, size, path, key, state, format
FROM storage_volumes WHERE id = %(volume_id)s;

-- lock_storage_volume --
-- Lock a volume row for the transaction that marks its task running.
SELECT id FROM storage_volumes WHERE id = %(volume_id)s FOR UPDATE;

-- pool_hosts --
-- Hosts a pool may be activated on, its current host first.
SELECT id, hostname, libvirt_uri, hypervisor_type, state, is_disabled
FROM hosts
WHERE state = 'available' AND NOT is_disabled
ORDER BY (id IS NOT DISTINCT FROM %(current_host_id)s::bigint) DESC, id;

-- volume_users --
-- VMs that use a volume as a disk, whatever their state.
SELECT d.vm_id, v.description, v.state
FROM vm_disks d JOIN vms v ON v.id = d.vm_id
WHERE d.storage_volume_id = %(volume_id)s
ORDER BY d.vm_id;

-- task_claim --
-- The claim under which a task was marked running (read in that transaction).
SELECT claimed_by, attempts FROM tasks WHERE id = %(task_id)s;

-- hold_running_task --
-- Fencing for writes made in perform: the task is still running under that claim.
SELECT id FROM tasks
WHERE id = %(task_id)s AND state = 'running'
  AND claimed_by = %(claimed_by)s AND attempts = %(attempts)s
FOR UPDATE;

-- pool_volume_rows --
-- The volume rows of a pool, locked while a refresh compares them.
SELECT id, name, size, path, key, state, format
FROM storage_volumes WHERE storage_pool_id = %(pool_id)s
ORDER BY id
FOR UPDATE;

-- insert_found_volume --
-- A volume refresh_pool found that the table did not know.
INSERT INTO storage_volumes (storage_pool_id, name, size, path, key, format, state)
VALUES (%(pool_id)s, %(name)s, %(size)s, %(path)s, %(key)s, %(format)s, 'available')
ON CONFLICT (storage_pool_id, name) DO NOTHING
RETURNING id;

-- delete_volume_row --
-- Remove a volume row, only if no VM took it as a disk meanwhile (vm_disks RESTRICT).
DELETE FROM storage_volumes
WHERE id = %(volume_id)s
  AND NOT EXISTS (SELECT 1 FROM vm_disks WHERE storage_volume_id = %(volume_id)s)
RETURNING id;

-- vm_disks --
-- The volumes a VM boots with, in attachment order.
SELECT sv.id, sv.name, sv.path, sv.format, sv.state
FROM vm_disks d JOIN storage_volumes sv ON sv.id = d.storage_volume_id
WHERE d.vm_id = %(vm_id)s
ORDER BY d.position, sv.id;

-- adopt_orphaned_key_claims --
-- Standalone start: key claims left by multihost instances mean nothing now
-- (adopt_orphaned_claims took their tasks).
DELETE FROM key_claims;

-- key_claims_for_standalone_leftovers --
-- Multihost start: tasks a dead standalone instance still held get key claims in
-- its name, so the usual takeover settles them.
INSERT INTO key_claims (key_type, key_id, instance_id)
SELECT DISTINCT t.key_type, t.key_id, t.claimed_by
FROM tasks t JOIN instances i ON i.id = t.claimed_by AND i.mode = 'standalone'
WHERE t.claimed_by IS NOT NULL AND t.state IN ('queued', 'running')
ORDER BY t.key_type, t.key_id
ON CONFLICT DO NOTHING;

-- renew_lease --
-- Multihost: extend this instance's lease (and heartbeat). No row when it had
-- already run out: other instances may own its keys now, so it must rejoin
-- under a new id. remaining: seconds the lease has left, by the database clock.
UPDATE instances
SET lease_expires_at = clock_timestamp() + make_interval(secs => %(lease)s::double precision),
    heartbeat_at = clock_timestamp()
WHERE id = %(instance_id)s AND stopped_at IS NULL AND lease_expires_at > clock_timestamp()
RETURNING extract(epoch FROM lease_expires_at - clock_timestamp())::double precision AS remaining;

-- end_lease --
-- Graceful leave: the lease ends now, so others take over what is left at once.
UPDATE instances SET lease_expires_at = least(lease_expires_at, clock_timestamp())
WHERE id = %(instance_id)s;

-- take_over_keys --
-- Keys whose holder's lease ran out (or that stopped) become ours, each with a
-- new token. SKIP LOCKED: a claim another instance is taking over or a shard is
-- writing under is not waited for. Only while our own lease is live.
WITH expired AS (
    SELECT c.key_type, c.key_id, c.instance_id AS previous
    FROM key_claims c JOIN instances i ON i.id = c.instance_id
    WHERE c.instance_id <> %(instance_id)s
      AND (i.stopped_at IS NOT NULL OR i.lease_expires_at IS NULL OR i.lease_expires_at <= clock_timestamp())
      AND EXISTS (SELECT 1 FROM instances me
                  WHERE me.id = %(instance_id)s AND me.lease_expires_at > clock_timestamp())
    ORDER BY c.claimed_at
    LIMIT %(limit)s
    FOR UPDATE OF c SKIP LOCKED
)
UPDATE key_claims c
SET instance_id = %(instance_id)s, token = nextval('key_claim_tokens'), claimed_at = clock_timestamp()
FROM expired
WHERE c.key_type = expired.key_type AND c.key_id = expired.key_id
RETURNING c.key_type, c.key_id, c.token, expired.previous;

-- adopt_key_tasks --
-- In the takeover's transaction: the tasks of those keys their old holders had
-- claimed become ours, to run (queued) or to reconcile (running).
UPDATE tasks t
SET claimed_by = %(instance_id)s, claimed_at = clock_timestamp()
FROM unnest(%(key_types)s::text[], %(key_ids)s::bigint[], %(previous)s::bigint[]) AS k(key_type, key_id, previous)
WHERE t.claimed_by = k.previous AND t.key_type = k.key_type AND t.key_id = k.key_id
  AND t.state IN ('queued', 'running')
RETURNING t.id, t.task_target_type, t.task_target_id, t.action, t.args, t.key_type, t.key_id, t.state;

-- free_keys --
-- Keys with unclaimed queued tasks and no claim, in key order from a rotating
-- start point. A loose index scan on tasks_unclaimed_key_idx: one index
-- descent per key visited, so it costs O(keys visited), however many tasks wait.
WITH RECURSIVE walk(key_type, key_id, depth) AS (
    (SELECT key_type, key_id, 1 FROM tasks
     WHERE state = 'queued' AND claimed_by IS NULL
       AND (key_type, key_id) > (%(after_type)s::text, %(after_id)s::bigint)
     ORDER BY key_type, key_id LIMIT 1)
    UNION ALL
    SELECT nxt.key_type, nxt.key_id, walk.depth + 1
    FROM walk CROSS JOIN LATERAL (
        SELECT t.key_type, t.key_id FROM tasks t
        WHERE t.state = 'queued' AND t.claimed_by IS NULL
          AND (t.key_type, t.key_id) > (walk.key_type, walk.key_id)
        ORDER BY t.key_type, t.key_id LIMIT 1) nxt
    WHERE walk.depth < %(max_visit)s
)
SELECT walk.key_type, walk.key_id FROM walk
WHERE NOT EXISTS (SELECT 1 FROM key_claims c WHERE c.key_type = walk.key_type AND c.key_id = walk.key_id)
LIMIT %(limit)s;

-- claim_keys --
-- Claim free keys: new rows, fresh tokens; no row for a key someone else got
-- first. Inserted in key order, so instances claiming overlapping sets never
-- wait on each other in a cycle. Only while our lease is live.
INSERT INTO key_claims (key_type, key_id, instance_id)
SELECT k.key_type, k.key_id, %(instance_id)s
FROM unnest(%(key_types)s::text[], %(key_ids)s::bigint[]) AS k(key_type, key_id)
WHERE EXISTS (SELECT 1 FROM instances me
              WHERE me.id = %(instance_id)s AND me.lease_expires_at > clock_timestamp())
ORDER BY k.key_type, k.key_id
ON CONFLICT DO NOTHING
RETURNING key_type, key_id, token;

-- claim_key_tasks --
-- The next unclaimed tasks of keys we hold, oldest first, up to a count per
-- key. Nothing for a key whose claim is no longer ours under that token, or
-- once our lease ran out. The claims are locked (shared) to the end of the
-- transaction, so a takeover cannot commit in between and miss these tasks.
-- Both steps materialised and the update by primary key: on a freshly filled
-- table the planner otherwise drove it from tasks_claimable_idx (O(queue)).
WITH wanted AS MATERIALIZED (
    SELECT w.key_type, w.key_id, w.n
    FROM unnest(%(key_types)s::text[], %(key_ids)s::bigint[], %(tokens)s::bigint[], %(counts)s::int[])
         AS w(key_type, key_id, token, n)
    JOIN key_claims c ON c.key_type = w.key_type AND c.key_id = w.key_id
                     AND c.instance_id = %(instance_id)s AND c.token = w.token
    JOIN instances me ON me.id = c.instance_id AND me.lease_expires_at > clock_timestamp()
    FOR SHARE OF c
), picked AS MATERIALIZED (
    SELECT p.id FROM wanted CROSS JOIN LATERAL (
        SELECT t.id FROM tasks t
        WHERE t.key_type = wanted.key_type AND t.key_id = wanted.key_id
          AND t.state = 'queued' AND t.claimed_by IS NULL
        ORDER BY t.id LIMIT wanted.n) p
)
UPDATE tasks t
SET claimed_by = %(instance_id)s, claimed_at = clock_timestamp()
WHERE t.id = ANY(ARRAY(SELECT id FROM picked)) AND t.state = 'queued' AND t.claimed_by IS NULL
RETURNING t.id, t.task_target_type, t.task_target_id, t.action, t.args, t.key_type, t.key_id, t.state;

-- release_keys --
-- Hand back keys whose local queue drained. Claimed tasks of theirs that never
-- started (none, normally) go back to the queue and keep their place.
WITH gone AS (
    DELETE FROM key_claims c
    USING unnest(%(key_types)s::text[], %(key_ids)s::bigint[], %(tokens)s::bigint[]) AS k(key_type, key_id, token)
    WHERE c.key_type = k.key_type AND c.key_id = k.key_id
      AND c.instance_id = %(instance_id)s AND c.token = k.token
    RETURNING c.key_type, c.key_id
)
UPDATE tasks t SET claimed_by = NULL, claimed_at = NULL
FROM gone
WHERE t.claimed_by = %(instance_id)s AND t.key_type = gone.key_type AND t.key_id = gone.key_id
  AND t.state = 'queued';

-- release_idle_keys --
-- Graceful leave (after release_unstarted): every claim of ours with no task
-- still running under it goes. A key whose task is still running (parked) keeps
-- its claim; end_lease lets another instance take it over and settle that task.
DELETE FROM key_claims c
WHERE c.instance_id = %(instance_id)s
  AND NOT EXISTS (SELECT 1 FROM tasks t
                  WHERE t.key_type = c.key_type AND t.key_id = c.key_id
                    AND t.claimed_by = %(instance_id)s AND t.state = 'running');

-- held_keys --
-- The keys this instance holds (a restarted fetcher picks them up).
SELECT key_type, key_id, token FROM key_claims WHERE instance_id = %(instance_id)s ORDER BY key_type, key_id;

-- hold_key_claim --
-- Fencing for one key: the claim is still ours under this token and our lease
-- is live; locks the claim row (shared) so that no takeover can commit before
-- this transaction does. hold_key_claims is the same rule for many keys.
SELECT 1 AS held
FROM key_claims c JOIN instances i ON i.id = c.instance_id
WHERE c.key_type = %(key_type)s AND c.key_id = %(key_id)s AND c.instance_id = %(instance_id)s
  AND c.token = %(token)s AND i.lease_expires_at > clock_timestamp()
FOR SHARE OF c;

-- hold_key_claims --
-- Fencing, in the transaction of every task write in multihost mode: which
-- of these (key, token) claims are still ours, with our lease live. Locks
-- them (shared) so that no takeover can commit before this transaction does.
SELECT c.key_type, c.key_id, c.token
FROM key_claims c
JOIN instances i ON i.id = c.instance_id
JOIN unnest(%(key_types)s::text[], %(key_ids)s::bigint[], %(tokens)s::bigint[]) AS k(key_type, key_id, token)
  ON c.key_type = k.key_type AND c.key_id = k.key_id AND c.token = k.token
WHERE c.instance_id = %(instance_id)s AND i.lease_expires_at > clock_timestamp()
ORDER BY c.key_type, c.key_id
FOR SHARE OF c;

-- limit_idle_transaction --
-- Multihost, first in every write transaction: if this process freezes
-- inside it (SIGSTOP, a stalled VM), the server ends the session after ms
-- milliseconds, so its locks (the placement lock, a key claim) do not stop
-- the other instances for longer than a lease.
SELECT set_config('idle_in_transaction_session_timeout', %(ms)s::text, true);

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

-- tasks_changes_since_analyze --
-- Rows of the tasks table inserted, updated or deleted since it was last
-- analysed, and how many rows its statistics think it has.
SELECT s.n_mod_since_analyze AS changed, greatest(c.reltuples, 0)::bigint AS estimated
FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
WHERE s.relid = 'tasks'::regclass;

-- analyze_tasks --
-- Refresh the tasks table's planner statistics (samples it; a fraction of a second).
ANALYZE tasks;
