-- Host rows (taskomatic/db/hosts.py).
-- A block starts with "-- name --", then one line saying what it is for, then the
-- SQL with %(named)s parameters; names are unique across taskomatic/db/sql/*.sql.

-- get_host --
-- A host row.
SELECT id, hostname, libvirt_uri, hypervisor_type, arch, state, is_disabled, num_cpus, memory
FROM hosts WHERE id = %(host_id)s;

-- all_hosts --
-- Every host, for the host-status pass.
SELECT id, hostname, libvirt_uri, hypervisor_type, state FROM hosts ORDER BY id;

-- set_host_state --
-- Mark a host available or unavailable; no row when it already was.
UPDATE hosts SET state = %(state)s, updated_at = clock_timestamp()
WHERE id = %(host_id)s AND state <> %(state)s
RETURNING id;
