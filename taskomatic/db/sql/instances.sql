-- The instances table, the instance guard and the multihost lease (taskomatic/db/instances.py).
-- A block starts with "-- name --", then one line saying what it is for, then the
-- SQL with %(named)s parameters; names are unique across taskomatic/db/sql/*.sql.

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

-- guard_holder --
-- The database session holding the instance guard, for the message refusing a second instance.
SELECT a.pid, a.client_addr, a.application_name
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.objid = %(lock_id)s AND l.granted
LIMIT 1;

-- adopt_orphaned_claims --
-- Standalone start: every task an earlier instance held (it is dead, we hold the
-- guard) becomes ours, to be resent (queued) or reconciled (running).
UPDATE tasks
SET claimed_by = %(instance_id)s
WHERE claimed_by IS NOT NULL AND claimed_by <> %(instance_id)s
  AND state IN ('queued', 'running');

-- free_orphaned_partition_leases --
-- Standalone start: partition leases left by multihost instances mean nothing
-- now (adopt_orphaned_claims took their tasks); free them, reservations too.
-- Tokens stay: the next acquisition takes a higher one all the same.
UPDATE partition_leases
SET instance_id = NULL, acquired_at = NULL, releasing = false, wanted_by = NULL
WHERE instance_id IS NOT NULL OR wanted_by IS NOT NULL;

-- renew_lease --
-- Multihost: extend this instance's lease (and heartbeat). No row when it had
-- already run out: other instances may own its partitions now, so it must rejoin
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

-- limit_idle_transaction --
-- Multihost, first in every write transaction: if this process freezes
-- inside it (SIGSTOP, a stalled VM), the server ends the session after ms
-- milliseconds, so its locks (the placement lock, a partition lease) do not stop
-- the other instances for longer than a lease.
SELECT set_config('idle_in_transaction_session_timeout', %(ms)s::text, true);
