"""Multihost mode under load: ``python -m bench.multihost`` (``--quick``, the default; ``--full``; ``--smoke``).

Two measurements, with one private PostgreSQL (EmbeddedPostgres, fsync on) and
real daemon processes (``python -m taskomatic`` with the bench's ``noop``/``sleep``
plugin, started by :class:`bench.runners.Runner`, each in a process group of its own):

1. **Takeover after kill -9.** Two (``--instances 3``: three) multihost instances
   with 2 shards each share ``sleep`` tasks over many keys. Once every instance
   has held keys for a few seconds, one instance's whole process group gets
   SIGKILL; ``t0`` is ``SELECT clock_timestamp()`` right after the kill. Its keys
   (its ``key_claims`` rows, read once its processes are gone) must move: the
   bench records (a) when another instance first holds one of them, (b) when
   the first task of those keys starts under another instance
   (``tasks.time_started``), (c) when the last of them has moved. Times of key
   claims come from an audit trigger the bench adds to ``key_claims`` in its own
   database (one row per claim, takeover and release, stamped with
   ``clock_timestamp()`` in the claiming transaction), so no move is missed
   between two polls. The backlog is topped up while the bench waits, so the
   survivors stay busy until every key has moved; then the work drains, the
   survivors are stopped (SIGTERM) and the tasks table is checked: every task
   ended once (only the tasks in flight at the kill may have run twice: a
   ``sleep`` interrupted by a crash is reconciled as "not started" and run again
   in its place), per-key order held (``bench.measure.order_check``), no task of
   a moved key started elsewhere before the key moved, fencing tokens increased.

2. **Scaling over instances.** The same no-op burst through one standalone
   instance (the reference) and through 1, 2 and 3 multihost instances, 2 shards
   each, all on this machine: throughput, CPU of taskomatic and of PostgreSQL
   per 1,000 tasks, key claims per 1,000 tasks, and each instance's share.

Results: a summary printed as tables, and JSON (with the machine) written to
``bench/results/multihost-<stamp>.json`` or ``--out``. See bench/README.md.

The modules: ``suite`` (the suites, the instances, the shared checks),
``takeover`` (1), ``scaling`` (2), ``output`` (the summary, the plot, the JSON's
path) and ``cli`` (the options and the whole run; ``__main__`` runs it).
"""
