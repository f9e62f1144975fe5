-- The partition lease protocol (taskomatic/db/partitions.py; docs/partitions.md).
-- A partition is held by instance I under token T while partition_leases says
-- (I, T) and I's instance lease is live: renew_lease renews them all at once.

-- partition_count --
-- P, as every instance must use it.
SELECT partitions FROM cluster_settings;

-- partition_view --
-- Every partition: its holder (NULL: free), token, hand-over markers, and whether the holder's lease is live.
SELECT pl.partition, pl.instance_id, pl.token, pl.releasing, pl.wanted_by,
       coalesce(i.stopped_at IS NULL AND i.lease_expires_at > clock_timestamp(), false) AS holder_live
FROM partition_leases pl
LEFT JOIN instances i ON i.id = pl.instance_id
ORDER BY pl.partition;

-- live_multihost_instances --
-- The instances that share the partitions now: multihost, not stopped, lease live.
SELECT id FROM instances
WHERE mode = 'multihost' AND stopped_at IS NULL AND lease_expires_at > clock_timestamp()
ORDER BY id;

-- announce_partition_moves --
-- Tell the other instances' fetchers that partitions were reserved or freed,
-- so they run their balancing round now instead of at their next interval
-- (delivered at commit; the payload names the sender, which ignores its own).
SELECT pg_notify('taskomatic_partitions', %(instance_id)s::text);

-- held_partitions --
-- The partitions this instance holds, with their tokens (a restarted fetcher picks them up).
SELECT partition, token, releasing FROM partition_leases
WHERE instance_id = %(instance_id)s
ORDER BY partition;

-- acquire_partitions --
-- Take some partitions that are free, or whose holder's lease ran out (or that
-- stopped), each with a new token. Not one reserved for another live instance
-- (wanted_by). SKIP LOCKED: a partition someone is taking or writing under is
-- not waited for. Only while our own lease is live. previous: the old holder.
WITH taken AS (
    SELECT pl.partition, pl.instance_id AS previous
    FROM partition_leases pl
    LEFT JOIN instances holder ON holder.id = pl.instance_id
    LEFT JOIN instances wanter ON wanter.id = pl.wanted_by
    WHERE pl.partition = ANY(%(partitions)s::smallint[])
      AND (pl.instance_id IS NULL
           OR (pl.instance_id <> %(instance_id)s
               AND (holder.stopped_at IS NOT NULL OR holder.lease_expires_at IS NULL
                    OR holder.lease_expires_at <= clock_timestamp())))
      AND (pl.wanted_by IS NULL OR pl.wanted_by = %(instance_id)s
           OR NOT coalesce(wanter.stopped_at IS NULL AND wanter.lease_expires_at > clock_timestamp(), false))
      AND EXISTS (SELECT 1 FROM instances me
                  WHERE me.id = %(instance_id)s AND me.stopped_at IS NULL
                    AND me.lease_expires_at > clock_timestamp())
    ORDER BY pl.partition
    FOR UPDATE OF pl SKIP LOCKED
)
UPDATE partition_leases pl
SET instance_id = %(instance_id)s, token = nextval('partition_lease_tokens'), acquired_at = clock_timestamp(),
    releasing = false, wanted_by = NULL
FROM taken
WHERE pl.partition = taken.partition
RETURNING pl.partition, pl.token, taken.previous;

-- adopt_partition_tasks --
-- In the acquiring transaction: unfinished tasks of those partitions that an
-- earlier holder (dead, or a standalone instance before) had claimed become
-- ours, to run (queued) or to reconcile (running).
UPDATE tasks t
SET claimed_by = %(instance_id)s, claimed_at = clock_timestamp()
WHERE t.partition = ANY(%(partitions)s::smallint[])
  AND t.claimed_by IS NOT NULL AND t.claimed_by <> %(instance_id)s
  AND t.state IN ('queued', 'running')
RETURNING t.id, t.task_target_type, t.task_target_id, t.action, t.args, t.key_type, t.key_id, t.state,
          t.partition, t.run_by_shard;

-- request_partitions --
-- Reserve exactly these partitions for us (balancing gave them to us, but a
-- live instance holds them beyond its share: it hands them over, then only we
-- may acquire them), and drop our reservations of any others (the balance
-- changed: a stale reservation would keep a partition from its new taker).
-- Returns the rows changed: wanted_by is us for a new reservation, NULL for a dropped one.
-- Every statement that locks lease rows locks them in partition order (here
-- the CTE, whose rows the UPDATE's initplan reads before it writes one), so
-- two of them never wait for each other in a circle: a deadlock stopped every
-- instance for deadlock_timeout (1 s) when an instance joined under load.
WITH target AS MATERIALIZED (
    SELECT pl.partition
    FROM partition_leases pl
    WHERE (pl.wanted_by = %(instance_id)s AND NOT pl.partition = ANY(%(partitions)s::smallint[]))
       OR (pl.partition = ANY(%(partitions)s::smallint[])
           AND pl.instance_id IS DISTINCT FROM %(instance_id)s
           AND pl.wanted_by IS DISTINCT FROM %(instance_id)s
           AND (pl.wanted_by IS NULL
                OR NOT EXISTS (SELECT 1 FROM instances w
                               WHERE w.id = pl.wanted_by AND w.stopped_at IS NULL
                                 AND w.lease_expires_at > clock_timestamp()))
           AND EXISTS (SELECT 1 FROM instances me
                       WHERE me.id = %(instance_id)s AND me.stopped_at IS NULL
                         AND me.lease_expires_at > clock_timestamp()))
    ORDER BY pl.partition
    FOR NO KEY UPDATE OF pl
)
UPDATE partition_leases pl
SET wanted_by = CASE WHEN pl.partition = ANY(%(partitions)s::smallint[]) THEN %(instance_id)s::bigint END
WHERE pl.partition = ANY(ARRAY(SELECT partition FROM target))
RETURNING pl.partition, pl.wanted_by;

-- begin_release --
-- Hand-over, step 1: mark partitions we hold (under these tokens) releasing,
-- so no more of their tasks start (the fenced start refuses them), and hand
-- back their claimed tasks that have not started (they keep their place).
WITH target AS MATERIALIZED (  -- locked in partition order first (request_partitions says why)
    SELECT pl.partition
    FROM partition_leases pl
    JOIN unnest(%(partitions)s::smallint[], %(tokens)s::bigint[]) AS w(partition, token)
      ON pl.partition = w.partition AND pl.token = w.token
    WHERE pl.instance_id = %(instance_id)s
    ORDER BY pl.partition
    FOR NO KEY UPDATE OF pl
), marked AS (
    UPDATE partition_leases pl
    SET releasing = true
    WHERE pl.partition = ANY(ARRAY(SELECT partition FROM target))
    RETURNING pl.partition
), unclaimed AS (
    UPDATE tasks t SET claimed_by = NULL, claimed_at = NULL
    FROM marked
    WHERE t.claimed_by = %(instance_id)s AND t.partition = marked.partition AND t.state = 'queued'
    RETURNING t.id
)
SELECT marked.partition, (SELECT count(*) FROM unclaimed) AS unclaimed FROM marked ORDER BY marked.partition;

-- release_partitions --
-- Hand-over, last step: free partitions we hold under these tokens once none
-- of their tasks runs under us; their claimed unstarted tasks go back to the
-- queue. The reservation (wanted_by) stays, so the taker gets them.
WITH target AS MATERIALIZED (  -- locked in partition order first (request_partitions says why)
    SELECT pl.partition
    FROM partition_leases pl
    JOIN unnest(%(partitions)s::smallint[], %(tokens)s::bigint[]) AS w(partition, token)
      ON pl.partition = w.partition AND pl.token = w.token
    WHERE pl.instance_id = %(instance_id)s
    ORDER BY pl.partition
    FOR NO KEY UPDATE OF pl
), gone AS (
    UPDATE partition_leases pl
    SET instance_id = NULL, acquired_at = NULL, releasing = false
    WHERE pl.partition = ANY(ARRAY(SELECT partition FROM target))
      AND NOT EXISTS (SELECT 1 FROM tasks t
                      WHERE t.claimed_by = %(instance_id)s AND t.partition = pl.partition
                        AND t.state = 'running')
    RETURNING pl.partition
), unclaimed AS (
    UPDATE tasks t SET claimed_by = NULL, claimed_at = NULL
    FROM gone
    WHERE t.claimed_by = %(instance_id)s AND t.partition = gone.partition AND t.state = 'queued'
    RETURNING t.id
)
SELECT gone.partition, (SELECT count(*) FROM unclaimed) AS unclaimed FROM gone ORDER BY gone.partition;

-- release_idle_partitions --
-- Graceful leave (after release_unstarted): free every partition of ours with
-- no task running under us. One with a task still running stays ours;
-- end_lease then lets another instance take it over and settle that task.
-- Which partitions are busy is read in one pass over our running tasks: a check
-- per partition walked the held-task index (and, right after a burst, its dead
-- entries not yet vacuumed) once for each of the partitions we hold.
WITH target AS MATERIALIZED (  -- locked in partition order first (request_partitions says why)
    SELECT pl.partition FROM partition_leases pl WHERE pl.instance_id = %(instance_id)s
    ORDER BY pl.partition
    FOR NO KEY UPDATE OF pl
), busy AS MATERIALIZED (
    SELECT DISTINCT t.partition FROM tasks t
    WHERE t.claimed_by = %(instance_id)s AND t.state = 'running' AND t.partition IS NOT NULL
)
UPDATE partition_leases pl
SET instance_id = NULL, acquired_at = NULL, releasing = false
WHERE pl.partition = ANY(ARRAY(SELECT partition FROM target)) AND pl.instance_id = %(instance_id)s
  AND pl.partition <> ALL(ARRAY(SELECT partition FROM busy))
RETURNING pl.partition;

-- claim_partition_planner --
-- Before claim_partition_tasks, for its transaction only: no bitmap or
-- sequential scans. Each partition's lookup must be an ordered descent that
-- stops after per_partition rows; with a bitmap scan (chosen when the
-- statistics expect a couple of rows per partition) the claim read every
-- unclaimed task of each held partition and sorted them: 28,000 buffers.
SELECT set_config('enable_bitmapscan', 'off', true), set_config('enable_seqscan', 'off', true);

-- claim_partition_tasks --
-- The bulk claim of multihost: the oldest unclaimed queued tasks (by id, as
-- standalone claims) of the partitions we hold (under these tokens, lease
-- live, not releasing), up to limit, taking at most its cap (caps, in the
-- order of partitions) from each partition: one index descent per held
-- partition on tasks_partition_claimable_idx, then at most cap rows from each.
-- So a batch spans many partitions (many keys to run side by side), as
-- standalone's does, instead of draining a few partitions first. No SKIP
-- LOCKED: only a partition's holder claims its tasks. The lease rows are
-- locked (shared) to the end of the transaction, so a takeover cannot commit
-- in between and miss these tasks. Runs after claim_partition_planner.
WITH held AS MATERIALIZED (
    SELECT pl.partition, w.cap
    FROM partition_leases pl
    JOIN unnest(%(partitions)s::smallint[], %(tokens)s::bigint[], %(caps)s::integer[]) AS w(partition, token, cap)
      ON pl.partition = w.partition AND pl.token = w.token
    JOIN instances me ON me.id = pl.instance_id
    WHERE pl.instance_id = %(instance_id)s AND NOT pl.releasing
      AND me.stopped_at IS NULL AND me.lease_expires_at > clock_timestamp()
    ORDER BY pl.partition  -- locked in partition order, as every statement locks lease rows
    FOR SHARE OF pl
), picked AS MATERIALIZED (
    SELECT oldest.id
    FROM held
    CROSS JOIN LATERAL (
        -- This predicate is tasks_partition_claimable_idx's own (migration 0011): only that index serves it.
        SELECT id FROM tasks
        WHERE partition = held.partition AND state = 'queued' AND coalesce(claimed_by, 0) = 0
        ORDER BY id LIMIT held.cap
    ) AS oldest
    ORDER BY oldest.id
    LIMIT %(limit)s
)
-- "claimed_by IS NULL" here, not the per-partition lookup's coalesce: then only
-- tasks_claimable_idx (by id) or the primary key can serve the ids; with the
-- partition index's predicate and the statistics of an empty table (a burst
-- just inserted) the planner scanned that whole index for 200 ids.
UPDATE tasks t
SET claimed_by = %(instance_id)s, claimed_at = clock_timestamp()
WHERE t.id = ANY(ARRAY(SELECT id FROM picked)) AND t.state = 'queued' AND t.claimed_by IS NULL
RETURNING t.id, t.task_target_type, t.task_target_id, t.action, t.args, t.key_type, t.key_id, t.state,
          t.partition;

-- claim_partition_window --
-- The bulk claim of multihost while we hold most partitions (one instance, or
-- two): walk the unclaimed queued tasks in id order, as standalone's claim does
-- (tasks_claimable_idx, whose predicate the window's own is), read at most
-- window of them, and take the oldest limit of those in the partitions we hold
-- (under these tokens, lease live, not releasing). claim_partition_tasks costs
-- one index descent per held partition and reads about 2 x limit rows; this
-- reads about limit x P / held. The window bounds the rows read when others'
-- tasks fill the head of the queue; scanned tells the caller whether it was
-- full, also when nothing was claimed: then the one row has a NULL id. The
-- lease rows are locked (shared) as in claim_partition_tasks. Runs after
-- claim_partition_planner.
WITH held AS MATERIALIZED (
    SELECT pl.partition
    FROM partition_leases pl
    JOIN unnest(%(partitions)s::smallint[], %(tokens)s::bigint[]) AS w(partition, token)
      ON pl.partition = w.partition AND pl.token = w.token
    JOIN instances me ON me.id = pl.instance_id
    WHERE pl.instance_id = %(instance_id)s AND NOT pl.releasing
      AND me.stopped_at IS NULL AND me.lease_expires_at > clock_timestamp()
    ORDER BY pl.partition  -- locked in partition order, as every statement locks lease rows
    FOR SHARE OF pl
), head AS MATERIALIZED (
    SELECT id, partition FROM tasks
    WHERE state = 'queued' AND claimed_by IS NULL
    ORDER BY id
    LIMIT %(window)s
), picked AS MATERIALIZED (
    SELECT head.id FROM head
    WHERE head.partition = ANY(ARRAY(SELECT partition FROM held))
    ORDER BY head.id
    LIMIT %(limit)s
), claimed AS (
    UPDATE tasks t
    SET claimed_by = %(instance_id)s, claimed_at = clock_timestamp()
    WHERE t.id = ANY(ARRAY(SELECT id FROM picked)) AND t.state = 'queued' AND t.claimed_by IS NULL
    RETURNING t.id, t.task_target_type, t.task_target_id, t.action, t.args, t.key_type, t.key_id, t.state,
              t.partition
)
SELECT c.*, window_rows.scanned
FROM (SELECT count(*) AS scanned FROM head) AS window_rows
LEFT JOIN claimed c ON true;

-- hold_partitions --
-- Fencing for any write made for tasks of these partitions: which of these
-- (partition, token) leases are ours with our lease live (and, when starting,
-- not releasing). Locks them (shared) so no takeover commits before we do.
SELECT pl.partition, pl.token
FROM partition_leases pl
JOIN unnest(%(partitions)s::smallint[], %(tokens)s::bigint[]) AS w(partition, token)
  ON pl.partition = w.partition AND pl.token = w.token
JOIN instances me ON me.id = pl.instance_id
WHERE pl.instance_id = %(instance_id)s AND me.stopped_at IS NULL AND me.lease_expires_at > clock_timestamp()
  AND NOT (pl.releasing AND %(starting)s::boolean)
ORDER BY pl.partition
FOR SHARE OF pl;

-- mark_running_fenced --
-- mark_running under partition leases: only tasks of partitions we hold under
-- these tokens (lease live, not releasing) start; a writer whose token is not
-- current starts nothing. Returns the ids started, with when each was submitted.
WITH held AS MATERIALIZED (
    SELECT pl.partition
    FROM partition_leases pl
    JOIN unnest(%(partitions)s::smallint[], %(tokens)s::bigint[]) AS w(partition, token)
      ON pl.partition = w.partition AND pl.token = w.token
    JOIN instances me ON me.id = pl.instance_id
    WHERE pl.instance_id = %(instance_id)s AND NOT pl.releasing
      AND me.stopped_at IS NULL AND me.lease_expires_at > clock_timestamp()
    ORDER BY pl.partition  -- locked in partition order, as every statement locks lease rows
    FOR SHARE OF pl
)
UPDATE tasks t
SET state = 'running', time_started = %(time_started)s, attempts = attempts + 1, run_by_shard = %(shard)s
WHERE t.id = ANY(%(task_ids)s::bigint[]) AND t.claimed_by = %(instance_id)s AND t.state = 'queued'
  AND t.partition = ANY(ARRAY(SELECT partition FROM held))
RETURNING t.id, t.created_at;

-- record_outcomes_fenced --
-- record_outcomes under partition leases (a releasing partition still settles
-- what runs): a writer whose token is not current writes nothing. The arrays
-- are parallel; returns the ids written. As record_outcomes: no join, the ids
-- are the scan's index condition and each row's values are at its position.
WITH held AS MATERIALIZED (
    SELECT pl.partition
    FROM partition_leases pl
    JOIN unnest(%(partitions)s::smallint[], %(tokens)s::bigint[]) AS w(partition, token)
      ON pl.partition = w.partition AND pl.token = w.token
    JOIN instances me ON me.id = pl.instance_id
    WHERE pl.instance_id = %(instance_id)s
      AND me.stopped_at IS NULL AND me.lease_expires_at > clock_timestamp()
    ORDER BY pl.partition  -- locked in partition order, as every statement locks lease rows
    FOR SHARE OF pl
)
UPDATE tasks t
SET state = (%(states)s::text[])[array_position(%(task_ids)s::bigint[], t.id)],
    message = (%(messages)s::text[])[array_position(%(task_ids)s::bigint[], t.id)],
    time_started = coalesce((%(starts)s::timestamptz[])[array_position(%(task_ids)s::bigint[], t.id)],
                            t.time_started),
    time_ended = (%(ends)s::timestamptz[])[array_position(%(task_ids)s::bigint[], t.id)]
WHERE t.id = ANY(%(task_ids)s::bigint[]) AND t.claimed_by = %(instance_id)s
  AND t.state = 'running' AND t.partition = ANY(ARRAY(SELECT partition FROM held))
RETURNING t.id;

-- end_and_start_fenced --
-- end_and_start under partition leases: record_outcomes_fenced and
-- mark_running_fenced in one statement. The lease rows of both sets are locked
-- once, in partition order; an end needs its lease held (a releasing partition
-- still settles what runs), a start needs it held and not releasing. Returns
-- each id written (started false) or started (true, with created_at).
WITH held AS MATERIALIZED (
    SELECT pl.partition, pl.releasing
    FROM partition_leases pl
    JOIN unnest(%(partitions)s::smallint[], %(tokens)s::bigint[]) AS w(partition, token)
      ON pl.partition = w.partition AND pl.token = w.token
    JOIN instances me ON me.id = pl.instance_id
    WHERE pl.instance_id = %(instance_id)s
      AND me.stopped_at IS NULL AND me.lease_expires_at > clock_timestamp()
    ORDER BY pl.partition  -- locked in partition order, as every statement locks lease rows
    FOR SHARE OF pl
), ended AS (
    UPDATE tasks t
    SET state = (%(states)s::text[])[array_position(%(end_ids)s::bigint[], t.id)],
        message = (%(messages)s::text[])[array_position(%(end_ids)s::bigint[], t.id)],
        time_started = coalesce((%(starts)s::timestamptz[])[array_position(%(end_ids)s::bigint[], t.id)],
                                t.time_started),
        time_ended = (%(ends)s::timestamptz[])[array_position(%(end_ids)s::bigint[], t.id)]
    WHERE t.id = ANY(%(end_ids)s::bigint[]) AND t.claimed_by = %(instance_id)s
      AND t.state = 'running' AND t.partition = ANY(ARRAY(SELECT partition FROM held))
    RETURNING t.id
), started AS (
    UPDATE tasks t
    SET state = 'running', time_started = %(time_started)s, attempts = t.attempts + 1, run_by_shard = %(shard)s
    WHERE t.id = ANY(%(start_ids)s::bigint[]) AND t.claimed_by = %(instance_id)s AND t.state = 'queued'
      AND t.partition = ANY(ARRAY(SELECT partition FROM held WHERE NOT releasing))
    RETURNING t.id, t.created_at
)
SELECT id, NULL::timestamptz AS created_at, false AS started FROM ended
UNION ALL
SELECT id, created_at, true FROM started;
