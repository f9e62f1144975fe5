-- 0001: the public tasks table, the oVirt resource tables, and the daemon's
-- internal bookkeeping (instances, claims).

CREATE TABLE hosts (
    id              bigserial PRIMARY KEY,
    uuid            uuid UNIQUE,
    hostname        text NOT NULL,
    libvirt_uri     text NOT NULL,
    -- decides the domain type: KVM -> kvm, QEMU -> qemu, TEST -> libvirt's test driver
    hypervisor_type text NOT NULL DEFAULT 'KVM'
                    CONSTRAINT hosts_hypervisor_type_known CHECK (hypervisor_type IN ('KVM', 'QEMU', 'TEST')),
    arch            text NOT NULL DEFAULT 'x86_64',
    state           text NOT NULL DEFAULT 'available'
                    CONSTRAINT hosts_state_known CHECK (state IN ('available', 'unavailable')),
    is_disabled     boolean NOT NULL DEFAULT false,
    num_cpus        integer NOT NULL DEFAULT 1 CONSTRAINT hosts_num_cpus_positive CHECK (num_cpus > 0),
    memory          bigint NOT NULL DEFAULT 0 CONSTRAINT hosts_memory_not_negative CHECK (memory >= 0),
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE vms (
    id                  bigserial PRIMARY KEY,
    uuid                uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    description         text NOT NULL,
    num_vcpus_allocated integer NOT NULL DEFAULT 1
                        CONSTRAINT vms_vcpus_positive CHECK (num_vcpus_allocated > 0),
    memory_allocated    bigint NOT NULL DEFAULT 262144
                        CONSTRAINT vms_memory_positive CHECK (memory_allocated > 0),
    num_vcpus_used      integer NOT NULL DEFAULT 0,
    memory_used         bigint NOT NULL DEFAULT 0,
    state               text NOT NULL DEFAULT 'pending'
                        CONSTRAINT vms_state_known CHECK (state IN (
                            'pending', 'creating', 'running', 'unreachable', 'powering_off',
                            'stopping', 'stopped', 'starting', 'suspending', 'suspended',
                            'resuming', 'saving', 'saved', 'restoring', 'migrating',
                            'create_failed', 'invalid')),
    host_id             bigint REFERENCES hosts (id) ON DELETE SET NULL,
    boot_device         text NOT NULL DEFAULT 'hd'
                        CONSTRAINT vms_boot_device_known CHECK (boot_device IN ('hd', 'network', 'cdrom')),
    vnic_mac_addr       text,
    vnc_port            integer,
    created_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX vms_host_id_idx ON vms (host_id) WHERE host_id IS NOT NULL;

CREATE TABLE storage_pools (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    pool_type    text NOT NULL DEFAULT 'dir'
                 CONSTRAINT storage_pools_type_known CHECK (pool_type IN ('dir', 'netfs', 'iscsi', 'logical')),
    -- source: a server address and a path/export/target/volume-group name, as the type needs
    source_host  text,
    source_path  text,
    target_path  text,
    state        text NOT NULL DEFAULT 'pending_setup'
                 CONSTRAINT storage_pools_state_known CHECK (state IN ('pending_setup', 'available', 'unavailable')),
    capacity     bigint,
    allocation   bigint,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE storage_volumes (
    id              bigserial PRIMARY KEY,
    storage_pool_id bigint NOT NULL REFERENCES storage_pools (id) ON DELETE CASCADE,
    name            text NOT NULL,
    size            bigint NOT NULL DEFAULT 0 CONSTRAINT storage_volumes_size_not_negative CHECK (size >= 0),
    path            text,
    key             text,
    state           text NOT NULL DEFAULT 'pending_setup'
                    CONSTRAINT storage_volumes_state_known CHECK (state IN (
                        'pending_setup', 'available', 'unavailable', 'pending_deletion', 'vanished')),
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT storage_volumes_name_unique_in_pool UNIQUE (storage_pool_id, name)
);

-- Which volumes a VM uses as disks (in order of attachment).
CREATE TABLE vm_disks (
    vm_id             bigint NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    storage_volume_id bigint NOT NULL REFERENCES storage_volumes (id) ON DELETE RESTRICT,
    position          integer NOT NULL DEFAULT 0,
    PRIMARY KEY (vm_id, storage_volume_id)
);

-- One row per daemon start; ids are never reused, so a restarted instance
-- cannot mistake an old claim for its own.
CREATE TABLE instances (
    id           bigserial PRIMARY KEY,
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    version      text NOT NULL,
    mode         text NOT NULL CONSTRAINT instances_mode_known CHECK (mode IN ('standalone', 'multihost')),
    shards       integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    heartbeat_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    stopped_at   timestamptz
);

CREATE TABLE tasks (
    -- public interface (DESIGN.md): other programs INSERT these columns
    id               bigserial PRIMARY KEY,
    task_target_type text NOT NULL,
    task_target_id   bigint,
    action           text NOT NULL,
    args             jsonb NOT NULL DEFAULT '{}'::jsonb,
    state            text NOT NULL DEFAULT 'queued'
                     CONSTRAINT tasks_state_known CHECK (state IN (
                         'queued', 'running', 'finished', 'failed', 'canceled', 'paused')),
    message          text,
    submitted_by     text,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    time_started     timestamptz,
    time_ended       timestamptz,
    -- internal: the ordering key, filled by a trigger (tasks_set_ordering_key)
    key_type         text,
    key_id           bigint,
    -- internal: which instance holds the task (queued: claimed, not started yet)
    claimed_by       bigint REFERENCES instances (id),
    claimed_at       timestamptz,
    -- internal: how many times a shard marked it running (reconciled re-runs count)
    attempts         integer NOT NULL DEFAULT 0,
    CONSTRAINT tasks_failed_needs_message CHECK (state <> 'failed' OR message IS NOT NULL)
);

-- Claiming reads only this partial index, so it stays O(batch) however many
-- finished tasks the table holds.
CREATE INDEX tasks_claimable_idx ON tasks (id) WHERE state = 'queued' AND claimed_by IS NULL;
-- Settling what an instance holds (startup, dead shard, drain).
CREATE INDEX tasks_claimed_idx ON tasks (claimed_by, id)
    WHERE claimed_by IS NOT NULL AND state IN ('queued', 'running');
-- Per-key history and order checks.
CREATE INDEX tasks_key_idx ON tasks (key_type, key_id, id);
CREATE INDEX tasks_state_idx ON tasks (state) WHERE state IN ('queued', 'running');

-- Ordering key (DESIGN.md): a volume task serialises with its pool.
CREATE FUNCTION taskomatic_set_ordering_key() RETURNS trigger
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
    NEW.key_id := NEW.task_target_id;
    RETURN NEW;
END;
$$;

CREATE TRIGGER tasks_set_ordering_key
    BEFORE INSERT ON tasks
    FOR EACH ROW EXECUTE FUNCTION taskomatic_set_ordering_key();

-- Wake an idle daemon within milliseconds. Statement level: a bulk INSERT
-- sends one notification, not one per row.
CREATE FUNCTION taskomatic_notify_new_tasks() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('taskomatic_new_tasks', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_notify_new
    AFTER INSERT ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION taskomatic_notify_new_tasks();
