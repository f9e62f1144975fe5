-- 0005: multihost mode. Instances hold a lease they renew; ordering keys are
-- claimed under it, each claim with a fencing token.

-- NULL for standalone instances (they never share the database).
ALTER TABLE instances ADD COLUMN lease_expires_at timestamptz;

-- One sequence for every key: a key's tokens strictly increase across all its
-- hand-overs, even when its claim row was deleted and made again in between.
CREATE SEQUENCE key_claim_tokens;

-- Which multihost instance holds an ordering key. A claim is good while its
-- instance's lease is live; once that lease ran out (or the instance stopped),
-- any live instance may take the key over, with a new token. The holder
-- deletes the row when the key's local queue drains.
CREATE TABLE key_claims (
    key_type    text NOT NULL,
    key_id      bigint NOT NULL,
    instance_id bigint NOT NULL REFERENCES instances (id),
    token       bigint NOT NULL DEFAULT nextval('key_claim_tokens'),
    claimed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (key_type, key_id)
);
CREATE INDEX key_claims_instance_idx ON key_claims (instance_id);

-- Keys with unclaimed work, found by a loose index scan (one descent per key),
-- and a held key's next tasks in id order.
CREATE INDEX tasks_unclaimed_key_idx ON tasks (key_type, key_id, id)
    WHERE state = 'queued' AND claimed_by IS NULL;

-- A task without a target id still gets an ordering key of its own (minus its
-- id, never a real resource id), so every task can be claimed through a key.
CREATE OR REPLACE FUNCTION taskomatic_set_ordering_key() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    pool_id bigint;
BEGIN
    IF NEW.task_target_type = 'StorageVolume' THEN
        SELECT storage_pool_id INTO pool_id FROM storage_volumes WHERE id = NEW.task_target_id;
        IF pool_id IS NOT NULL THEN
            NEW.key_type := 'StoragePool';
            NEW.key_id := pool_id;
            RETURN NEW;
        END IF;
    END IF;
    NEW.key_type := NEW.task_target_type;
    NEW.key_id := coalesce(NEW.task_target_id, -NEW.id);
    RETURN NEW;
END;
$$;

UPDATE tasks SET key_id = -id WHERE key_id IS NULL;
