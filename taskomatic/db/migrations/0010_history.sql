-- 0010: a hot path that does not grow with history, and a place for finished
-- tasks off it (taskomatic/retention.py, docs in README "Retention").
--
-- Found with EXPLAIN (ANALYZE, BUFFERS) on a table with 1,000,000 finished rows
-- (bench/history.py, bench/RESULTS.md "History"): the planner's statistics of
-- a big table describe its history (every row finished) until the next ANALYZE,
-- so it believes the partial indexes over unfinished tasks are empty and scans
-- one whole whenever a statement's filter allows it. mark_running
-- (id = ANY(...) AND claimed_by = ... AND state = 'queued') walked all of
-- tasks_state_idx (state) = every queued task, 20,000 of them, to start 8:
-- 10,000 buffers per call, 0.58x the empty table's tasks/s; on a small table
-- autoanalyze keeps up and the same statement descends the primary key.
--
-- The rule from here on: an index over unfinished tasks that a hot statement
-- can use leads with id, so a statement that names its tasks by id descends it
-- once per id whatever the planner estimates; an index led by another column
-- has a predicate the hot statements do not imply (they never name a key).
-- tests/integration/test_history.py checks the plans with stale statistics.

-- Unfinished tasks are in one of two partial indexes, both on id: unclaimed
-- queued ones in tasks_claimable_idx (0001, the claim's), the rest in
-- tasks_held_idx, claimed (queued or running, and paused: running and paused
-- need a holder, 0007). No index covers both: one on id over every unfinished
-- task would serve the claim too (state = 'queued' implies it), and walk the
-- held tasks before the first unclaimed one. tasks_state_idx (state) served
-- the status counts; they read the two indexes now (queue_summary, active_counts).
DROP INDEX tasks_state_idx;
DROP INDEX tasks_claimed_idx;
CREATE INDEX tasks_held_idx ON tasks (id)
    WHERE claimed_by IS NOT NULL AND state IN ('queued', 'running', 'paused');

-- Per-key lookups only ever ask for a key's running task (does this VM have a
-- task in flight?). The full (key_type, key_id, id) index took an entry for
-- every version of every task, finished ones included, forever. key_type is
-- never NULL (the insert trigger copies task_target_type): the condition only
-- keeps statements that do not name a key from scanning this index.
DROP INDEX tasks_key_idx;
CREATE INDEX tasks_running_key_idx ON tasks (key_type, key_id)
    WHERE state = 'running' AND key_type IS NOT NULL;

-- Where a new task's row goes. A table of history has a little room left in
-- every page (less than one finished row): at fillfactor 100 a burst's 20,000
-- new rows went one to a page, into 20,000 pages of history, and each of their
-- three updates (non-HOT: state is in the partial indexes' conditions) into
-- yet another: 80,000 scattered pages, each read, dirtied and, first after a
-- checkpoint, written whole to the WAL. With 10 % of each page kept for
-- updates, an insert only takes a page with more than that free, so new rows
-- go together at the end of the table (measured: 20,000 rows in 318 pages
-- instead of 4,310 with 200,000 finished rows), and an update can stay on its
-- row's page. Applies to existing tables at once (it is a rule for where to
-- put new rows, nothing is rewritten).
ALTER TABLE tasks SET (fillfactor = 90);

-- Retention: the oldest ended tasks in O(batch).
CREATE INDEX tasks_ended_idx ON tasks (time_ended) WHERE state IN ('finished', 'failed', 'canceled');

-- History over a window of created_at (taskomatic plan): a block range index
-- costs next to nothing per write (rows are appended in about created_at order).
CREATE INDEX tasks_created_brin ON tasks USING brin (created_at);

-- Ended tasks moved out of tasks after [retention] keep_finished. The same
-- columns as tasks, in the same order (a later migration that adds a column to
-- tasks adds it here too; a test checks), so a row moves with SELECT * and can
-- move back the same way. No foreign keys: an archived task outlives its
-- instance row and its parent.
CREATE TABLE tasks_archive (LIKE tasks INCLUDING CONSTRAINTS);
ALTER TABLE tasks_archive ADD PRIMARY KEY (id);
CREATE INDEX tasks_archive_created_idx ON tasks_archive (created_at);
CREATE INDEX tasks_archive_ended_idx ON tasks_archive (time_ended);
CREATE INDEX tasks_archive_parent_idx ON tasks_archive (parent_task_id) WHERE parent_task_id IS NOT NULL;
