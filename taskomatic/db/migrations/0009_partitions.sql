-- 0009: partitions. Every ordering key belongs to one of P fixed partitions,
-- p = taskomatic_key_hash(key_type, key_id) mod P; multihost instances lease
-- partitions (not keys) and claim only their tasks. See docs/partitions.md.
--
-- P = 256, recorded here so that every instance agrees (never in a config file):
-- * balance: with quotas of floor(P/n) or ceil(P/n), the most loaded instance
--   holds ceil(P/n) / (P/n) of an even share: +0.8 % for 3 instances, +1.6 %
--   for 10 or 20, +5.5 % for 30 (P = 64 would give +3 % for 3, +9 % for 10).
--   Inside an instance, partition p runs on shard p mod N: for N = 3 the
--   shards hold 85 or 86 partitions (1 % apart).
-- * cost: renewal is one statement per instance whatever P is (a partition is
--   valid while its holder's instance lease is); the balancer reads P rows
--   (about 10 kB) once per renewal interval; a claim descends the claim index
--   once per held partition (256 descents for a lone instance, about 0.1 ms,
--   for a batch of up to 200 tasks: P = 4096 would cost 16 times that on every
--   claim); a takeover or a hand-over moves many partitions in one statement.
-- * the column is a smallint: P can grow to 32767 by a later migration that
--   repartitions the rows (P is fixed at run time: cluster_settings refuses
--   an UPDATE).

-- One row of settings every instance must agree on.
CREATE TABLE cluster_settings (
    one        boolean PRIMARY KEY DEFAULT true CONSTRAINT cluster_settings_one_row CHECK (one),
    partitions smallint NOT NULL CONSTRAINT cluster_settings_partitions_range CHECK (partitions BETWEEN 1 AND 32767)
);
INSERT INTO cluster_settings (partitions) VALUES (256);

CREATE FUNCTION taskomatic_cluster_settings_fixed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'cluster_settings is fixed: every task row and partition lease depends on it; '
                    'a change is a migration that repartitions the tasks'
        USING ERRCODE = 'restrict_violation';
END;
$$;

CREATE TRIGGER cluster_settings_fixed
    BEFORE UPDATE OR DELETE ON cluster_settings
    FOR EACH ROW EXECUTE FUNCTION taskomatic_cluster_settings_fixed();

-- The stable 32-bit hash of an ordering key; taskomatic.partitions.key_hash
-- computes the same in Python (a test checks they agree). FNV-1a over the
-- UTF-8 bytes of key_type, then key_id's 8 bytes little-endian (two's
-- complement), then MurmurHash3's fmix32 so the low bits mix. Products are
-- kept under 2^63: FNV's prime is under 2^25, fmix32's constants are
-- multiplied in 16-bit halves.
CREATE FUNCTION taskomatic_key_hash(key_type text, key_id bigint) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    h bigint := 2166136261;
    bytes bytea := convert_to(key_type, 'UTF8');
    i integer;
BEGIN
    FOR i IN 0 .. length(bytes) - 1 LOOP
        h := ((h # get_byte(bytes, i)) * 16777619) & 4294967295;
    END LOOP;
    FOR i IN 0 .. 7 LOOP
        h := ((h # ((key_id >> (8 * i)) & 255)) * 16777619) & 4294967295;
    END LOOP;
    h := h # (h >> 16);
    -- h * 0x85ebca6b mod 2^32 (0x85eb = 34283, 0xca6b = 51819)
    h := (h * 51819 + (((h * 34283) & 65535) << 16)) & 4294967295;
    h := h # (h >> 13);
    -- h * 0xc2b2ae35 mod 2^32 (0xc2b2 = 49842, 0xae35 = 44597)
    h := (h * 44597 + (((h * 49842) & 65535) << 16)) & 4294967295;
    RETURN h # (h >> 16);
END;
$$;

CREATE FUNCTION taskomatic_partition_of(key_type text, key_id bigint, partitions integer) RETURNS smallint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT mod(taskomatic_key_hash(key_type, key_id), partitions)::smallint
$$;

-- Internal: the partition of the task's ordering key, set by the insert trigger.
ALTER TABLE tasks ADD COLUMN partition smallint;

-- The ordering-key trigger of 0005, unchanged for key_type/key_id (the public
-- contract), now also filling in the partition (whatever the INSERT said).
CREATE OR REPLACE FUNCTION taskomatic_set_ordering_key() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    pool_id bigint;
    partition_count integer;
BEGIN
    NEW.key_type := NEW.task_target_type;
    NEW.key_id := coalesce(NEW.task_target_id, -NEW.id);
    IF NEW.task_target_type = 'StorageVolume' THEN
        SELECT storage_pool_id INTO pool_id FROM storage_volumes WHERE id = NEW.task_target_id;
        IF pool_id IS NOT NULL THEN
            NEW.key_type := 'StoragePool';
            NEW.key_id := pool_id;
        END IF;
    END IF;
    SELECT partitions INTO partition_count FROM cluster_settings;
    NEW.partition := taskomatic_partition_of(NEW.key_type, NEW.key_id, partition_count);
    RETURN NEW;
END;
$$;

UPDATE tasks t SET partition = taskomatic_partition_of(t.key_type, t.key_id, s.partitions)
FROM cluster_settings s;

-- "The oldest queued unclaimed tasks of these partitions": one index descent
-- per partition, then in id order within each, stopping after the batch.
CREATE INDEX tasks_partition_claimable_idx ON tasks (partition, id)
    WHERE state = 'queued' AND claimed_by IS NULL;

-- One sequence for every partition: a partition's tokens strictly increase
-- across all its hand-overs (and across partitions, which costs nothing).
CREATE SEQUENCE partition_lease_tokens;

-- Who holds each partition. A row per partition always exists (free:
-- instance_id NULL), so acquiring one is an UPDATE that can skip a locked row.
-- A lease is valid while its holder's instance lease is live: renewing the
-- instance renews all its partitions in one statement. releasing: its holder
-- is handing it over (it starts no more of its tasks, settles what runs, then
-- frees it); wanted_by: the instance the balancing gave it to, which takes it
-- once it is free (others leave it alone while that instance is live).
CREATE TABLE partition_leases (
    partition   smallint PRIMARY KEY,
    instance_id bigint REFERENCES instances (id),
    token       bigint NOT NULL DEFAULT 0,
    acquired_at timestamptz,
    releasing   boolean NOT NULL DEFAULT false,
    wanted_by   bigint REFERENCES instances (id),
    CONSTRAINT partition_leases_releasing_needs_holder CHECK (NOT releasing OR instance_id IS NOT NULL)
);
CREATE INDEX partition_leases_instance_idx ON partition_leases (instance_id) WHERE instance_id IS NOT NULL;

INSERT INTO partition_leases (partition)
SELECT generate_series(0, partitions - 1) FROM cluster_settings;
