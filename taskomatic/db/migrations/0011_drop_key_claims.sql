-- 0011: multihost owns partitions (0009's partition_leases); key claims go.
--
-- A database upgraded with multihost leftovers (key claims held by instances
-- that ran an earlier version) loses no task: their claimed tasks that had
-- not started go back to the queue and keep their place (id order); running
-- ones stay claimed by their dead holder, and whoever acquires their
-- partition adopts and reconciles them (a standalone start adopts them all).
UPDATE tasks t
SET claimed_by = NULL, claimed_at = NULL
FROM instances i
WHERE i.id = t.claimed_by AND i.mode = 'multihost' AND t.state = 'queued';

DROP TABLE key_claims;
DROP SEQUENCE key_claim_tokens;

-- Only the key claims' queries used it (free keys by a loose index scan, a
-- held key's next tasks). Every index on tasks costs every start and every
-- end (those updates change indexed columns, so they are not HOT): the claims
-- now go through tasks_partition_claimable_idx (multihost) and
-- tasks_claimable_idx (standalone); per-key lookups keep tasks_key_idx.
DROP INDEX tasks_unclaimed_key_idx;

-- The multihost claim's index gets a predicate of its own ("coalesce(claimed_by,
-- 0) = 0": unclaimed, instance ids start at 1), which only the multihost claim
-- states. With 0009's predicate, the same as tasks_claimable_idx's, the planner
-- could serve the claim's per-partition lookups with tasks_claimable_idx (id
-- order, filtering each partition: 20,000 buffers for one claim) whenever its
-- statistics predate a burst; now the per-partition lookup can only be a
-- descent of this index, and the standalone claim can never pick this one.
DROP INDEX tasks_partition_claimable_idx;
CREATE INDEX tasks_partition_claimable_idx ON tasks (partition, id)
    WHERE state = 'queued' AND coalesce(claimed_by, 0) = 0;
