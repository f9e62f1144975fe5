"""Multihost mode under load: ``python -m bench.multihost`` (``--quick``, the default; ``--full``; ``--smoke``).

Four measurements, with one private PostgreSQL (EmbeddedPostgres, fsync on) and
real daemon processes (``python -m taskomatic`` with the bench's ``noop``/``sleep``
plugin, started by :class:`bench.runners.Runner`, each in a process group of its own):

1. **Takeover after kill -9.** Two (``--instances 3``: three) multihost instances
   with 2 shards each share ``sleep`` tasks over many keys. Once every instance
   has held partitions for a few seconds, one instance's whole process group gets
   SIGKILL; ``t0`` is ``SELECT clock_timestamp()`` right after the kill. Its
   partitions (its ``partition_leases`` rows, read once its processes are gone)
   must move: the bench records (a) when another instance first holds one of
   them, (b) when the first task of those partitions starts under another
   instance (``tasks.time_started``), (c) when the last of them has moved. Times
   come from an audit trigger the bench adds to ``partition_leases`` in its own
   database (one row per acquisition and release, stamped with
   ``clock_timestamp()`` in the transaction that made it), so no move is missed
   between two polls. The backlog is topped up while the bench waits, so the
   survivors stay busy until every partition has moved; then the work drains,
   the survivors are stopped (SIGTERM) and the tasks table is checked: every task
   ended once (only the tasks in flight at the kill may have run twice: a
   ``sleep`` interrupted by a crash is reconciled as "not started" and run again
   in its place), per-key order held (``bench.measure.order_check``), no task of
   a moved partition started elsewhere before it moved, fencing tokens increased.

2. **Scaling over instances.** The same no-op burst through one standalone
   instance (the reference) and through 1, 2 and 3 multihost instances, 2 shards
   each, all on this machine, with each routing inside an instance (pinned and
   hash) side by side: throughput, CPU of taskomatic and of PostgreSQL per 1,000
   tasks (and as a ratio to standalone with the same routing, run by run within a
   pass too), partition leases taken, each instance's and each shard's share.

3. **Join and leave under load** (``join.py``): a second instance joins a busy
   one that holds every partition; how long until it holds its first partition,
   runs its first task and holds its even share; then it leaves gracefully and
   the first takes everything back. Nothing may run twice.

4. **Workloads over instances** (``mixes.py``): Zipf no-ops and 20 ms and
   heavy-tailed tasks through the same setups, tasks/s and makespan over the
   bound of the setup's own shards.

The summary ends with the issue's targets, each met or not.

Results: a summary printed as tables, and JSON (with the machine) written to
``bench/results/multihost-<stamp>.json`` or ``--out``. See bench/README.md.

The modules: ``suite`` (the suites, the instances, the shared checks),
``takeover`` (1), ``scaling`` (2), ``join`` (3), ``mixes`` (4), ``output`` (the summary, the plot, the JSON's
path) and ``cli`` (the options and the whole run; ``__main__`` runs it).
"""
