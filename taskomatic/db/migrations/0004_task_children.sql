-- 0004: a task may queue other tasks (clear_vms queues one migrate_vm per VM)
-- and ends when they all have.

ALTER TABLE tasks ADD COLUMN parent_task_id bigint REFERENCES tasks (id);
CREATE INDEX tasks_parent_idx ON tasks (parent_task_id) WHERE parent_task_id IS NOT NULL;
