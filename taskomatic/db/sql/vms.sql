-- VM rows (taskomatic/db/vms.py).
-- A block starts with "-- name --", then one line saying what it is for, then the
-- SQL with %(named)s parameters; names are unique across taskomatic/db/sql/*.sql.

-- get_vm --
-- A VM row with what actions need.
SELECT id, uuid::text AS uuid, description, num_vcpus_allocated, memory_allocated,
       state, host_id, target_host_id, boot_device, vnic_mac_addr, vnc_port
FROM vms WHERE id = %(vm_id)s;

-- vm_disks --
-- The volumes a VM boots with, in attachment order.
SELECT sv.id, sv.name, sv.path, sv.format, sv.state
FROM vm_disks d JOIN storage_volumes sv ON sv.id = d.storage_volume_id
WHERE d.vm_id = %(vm_id)s
ORDER BY d.position, sv.id;

-- lock_placement --
-- Placement decisions are serialised (held to the end of the transaction), so
-- two concurrent starts cannot both take a host's last free memory. One lock,
-- not row locks in changing order: those deadlock.
SELECT pg_advisory_xact_lock(%(lock_id)s);

-- place_vm --
-- Hosts that can take a VM, most free memory first. Counts what VMs placed
-- there already hold or are about to hold (in-flight starts and migrations
-- too, and saved VMs, which come back to their host on restore). Call with
-- lock_placement held.
SELECT h.id, h.hostname, h.libvirt_uri, h.hypervisor_type, h.arch, h.state, h.is_disabled,
       h.num_cpus, h.memory,
       h.memory - coalesce(c.memory, 0) AS free_memory,
       h.num_cpus - coalesce(c.vcpus, 0) AS free_cpus
FROM hosts h
LEFT JOIN LATERAL (
    SELECT sum(v.memory_allocated) AS memory, sum(v.num_vcpus_allocated) AS vcpus
    FROM vms v
    WHERE (v.host_id = h.id OR v.target_host_id = h.id) AND v.id <> %(vm_id)s
      AND v.state IN ('running', 'starting', 'suspended', 'suspending', 'resuming',
                      'stopping', 'powering_off', 'saving', 'saved', 'migrating', 'restoring',
                      'unreachable')
) c ON true
WHERE h.state = 'available' AND NOT h.is_disabled
  AND h.memory - coalesce(c.memory, 0) >= %(memory)s
  AND h.num_cpus - coalesce(c.vcpus, 0) >= %(vcpus)s
ORDER BY h.memory - coalesce(c.memory, 0) DESC, h.id;

-- vms_on_host --
-- The VMs placed on a host, for clear_vms.
SELECT id, description, state FROM vms WHERE host_id = %(host_id)s ORDER BY id;

-- idle_vms_on_host --
-- VMs on a host with no task running: the ones the host-status pass may correct.
SELECT v.id, v.uuid::text AS uuid, v.state, v.host_id, v.updated_at
FROM vms v
WHERE v.host_id = %(host_id)s
  AND NOT EXISTS (SELECT 1 FROM tasks t
                  WHERE t.key_type = 'Vm' AND t.key_id = v.id AND t.state = 'running')
ORDER BY v.id;

-- correct_vm --
-- Set a VM's row to what its node reports, unless it changed since the pass
-- read it (seen: its updated_at then) or a task of the VM started:
-- reconciliation never fights an action over a row.
UPDATE vms
SET state = %(new_state)s,
    host_id = CASE WHEN %(clear_host)s THEN NULL ELSE host_id END,
    vnc_port = CASE WHEN %(clear_host)s THEN NULL ELSE vnc_port END,
    memory_used = CASE WHEN %(clear_host)s THEN 0 ELSE memory_used END,
    num_vcpus_used = CASE WHEN %(clear_host)s THEN 0 ELSE num_vcpus_used END,
    updated_at = clock_timestamp()
WHERE id = %(vm_id)s AND state = %(old_state)s AND updated_at = %(seen)s
  AND NOT EXISTS (SELECT 1 FROM tasks t
                  WHERE t.key_type = 'Vm' AND t.key_id = %(vm_id)s AND t.state = 'running')
RETURNING id;
