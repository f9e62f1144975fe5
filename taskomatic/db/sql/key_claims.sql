-- Multihost claims on ordering keys, with fencing tokens (taskomatic/db/key_claims.py).
-- A block starts with "-- name --", then one line saying what it is for, then the
-- SQL with %(named)s parameters; names are unique across taskomatic/db/sql/*.sql.

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
