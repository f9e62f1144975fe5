-- 0008: storage-aware placement. A pool is shared (every host reaches the same
-- volumes) or local to one host. netfs and iscsi pools are always shared; a dir
-- pool is shared when the administrator says its path is mounted on every host
-- (NFS mounted by the OS, GFS2, CephFS...). dir pools not marked shared and
-- logical pools are local to storage_pools.host_id.
ALTER TABLE storage_pools ADD COLUMN shared boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN storage_pools.shared IS
    'dir pools: the target path is the same storage on every host (netfs and iscsi are always shared)';
