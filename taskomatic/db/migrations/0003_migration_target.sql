-- 0003: where a VM is migrating to, so placement counts it on both hosts
-- until the migration ends.

ALTER TABLE vms ADD COLUMN target_host_id bigint REFERENCES hosts (id) ON DELETE SET NULL;
