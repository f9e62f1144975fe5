-- 0002: what the storage actions (refresh_pool, create_volume, delete_volume)
-- need. Only additions: the public columns of 0001 keep their meaning.

-- The host a pool was last activated on by refresh_pool; volume work runs there.
-- NULL: not placed yet (or its host was deleted), refresh_pool places it.
ALTER TABLE storage_pools
    ADD COLUMN host_id bigint REFERENCES hosts (id) ON DELETE SET NULL;
CREATE INDEX storage_pools_host_id_idx ON storage_pools (host_id) WHERE host_id IS NOT NULL;

COMMENT ON COLUMN storage_pools.host_id IS
    'host the pool is active on (set by refresh_pool); dir and logical pools stay on it';
COMMENT ON COLUMN storage_pools.capacity IS 'pool capacity in KB, as libvirt reported it at the last refresh_pool';
COMMENT ON COLUMN storage_pools.allocation IS 'KB allocated in the pool at the last refresh_pool';

-- The volume's on-disk format: what create_volume makes (only raw so far), or
-- what libvirt reported for a volume refresh_pool found (raw, qcow2, iso, dir...).
ALTER TABLE storage_volumes
    ADD COLUMN format text NOT NULL DEFAULT 'raw'
    CONSTRAINT storage_volumes_format_not_empty CHECK (format <> '');

COMMENT ON COLUMN storage_volumes.size IS 'capacity in KB (a sparse volume may allocate less)';

-- delete_volume asks "does any VM use this volume?"; the primary key
-- (vm_id, storage_volume_id) cannot answer that by index, nor can the
-- ON DELETE RESTRICT check.
CREATE INDEX vm_disks_storage_volume_id_idx ON vm_disks (storage_volume_id);
