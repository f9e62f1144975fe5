-- A task is only ever running (or paused) in the hands of an instance: a row
-- inserted already 'running' by another program would never be claimed,
-- adopted or settled, so it would never end. Refuse it at the INSERT.
ALTER TABLE tasks ADD CONSTRAINT tasks_unclaimed_running
    CHECK (state NOT IN ('running', 'paused') OR claimed_by IS NOT NULL);
