-- Storage pool and volume rows (taskomatic/db/storage.py).
-- A block starts with "-- name --", then one line saying what it is for, then the
-- SQL with %(named)s parameters; names are unique across taskomatic/db/sql/*.sql.

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
