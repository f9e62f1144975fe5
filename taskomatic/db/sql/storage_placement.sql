-- Queries of taskomatic/db/storage_placement.py: where a VM's disks live, and
-- what the host-status pass needs to find VMs that moved.

-- vm_disk_pools --
-- The pools holding a VM's disks, each once, in id order.
SELECT DISTINCT p.id, p.name, p.pool_type, p.source_host, p.source_path, p.target_path,
       p.state, p.host_id, p.shared, h.hostname AS host_name
FROM vm_disks d
JOIN storage_volumes sv ON sv.id = d.storage_volume_id
JOIN storage_pools p ON p.id = sv.storage_pool_id
LEFT JOIN hosts h ON h.id = p.host_id
WHERE d.vm_id = %(vm_id)s
ORDER BY p.id;

-- place_local_pool --
-- A local pool with no host yet becomes local to the host it was first activated on.
UPDATE storage_pools SET host_id = %(host_id)s, updated_at = clock_timestamp()
WHERE id = %(pool_id)s AND host_id IS NULL
RETURNING id;

-- idle_vms --
-- Every VM with no task running, with the host its row names: the host-status
-- pass compares them with the domains the nodes really run.
SELECT v.id, v.uuid::text AS uuid, v.description, v.state, v.host_id, v.updated_at
FROM vms v
WHERE NOT EXISTS (SELECT 1 FROM tasks t
                  WHERE t.key_type = 'Vm' AND t.key_id = v.id AND t.state = 'running')
ORDER BY v.id;

-- record_vm_location --
-- A domain runs on a host the row does not name: record it there, unless the
-- row changed since the pass read it (seen) or a task of the VM started.
UPDATE vms
SET host_id = %(host_id)s, state = %(state)s, target_host_id = NULL,
    memory_used = memory_allocated, num_vcpus_used = num_vcpus_allocated,
    updated_at = clock_timestamp()
WHERE id = %(vm_id)s AND updated_at = %(seen)s
  AND NOT EXISTS (SELECT 1 FROM tasks t
                  WHERE t.key_type = 'Vm' AND t.key_id = %(vm_id)s AND t.state = 'running')
RETURNING id;

-- forget_lost_save --
-- A saved VM whose image is gone is stopped: it holds no host any more.
UPDATE vms
SET state = 'stopped', host_id = NULL, vnc_port = NULL, memory_used = 0, num_vcpus_used = 0,
    updated_at = clock_timestamp()
WHERE id = %(vm_id)s AND state = 'saved' AND updated_at = %(seen)s
  AND NOT EXISTS (SELECT 1 FROM tasks t
                  WHERE t.key_type = 'Vm' AND t.key_id = %(vm_id)s AND t.state = 'running')
RETURNING id;
