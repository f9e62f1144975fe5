-- Which shard slot of the claiming instance marked a task running. Shards no
-- longer own a fixed set of keys (the fetcher assigns a key to a shard while
-- the key has tasks in flight there), so after a fetcher restart an
-- interrupted task must go back to the slot that was running it, and only
-- that slot may reconcile it.
ALTER TABLE tasks ADD COLUMN run_by_shard integer;
