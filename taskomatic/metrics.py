"""Prometheus metrics (prometheus-client), off unless ``metrics_port`` is set.

taskomatic is several processes, so it uses prometheus-client's multiprocess
mode: each process writes its samples to files under one directory (set in
the environment by the supervisor before it starts the children), and the
fetcher serves them all, plus gauges read from the database at scrape time,
on ``metrics_address`` (localhost by default). The README's Metrics section
lists every series; the runtime feeds them through the small functions below,
each a no-op when metrics are off.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from taskomatic import __version__

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
_DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
# Enqueue-to-start: milliseconds on an idle daemon, up to hours behind a long per-VM queue.
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


def prepare_directory(runtime_dir: Path, instance_id: int) -> None:
    """Supervisor, before starting children: a fresh sample directory under the runtime directory
    (systemd's /run/taskomatic: tmpfs, gone at reboot), named in the environment."""
    directory = runtime_dir / f"metrics-{instance_id}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, mode=0o700)
    os.environ[ENV] = str(directory)
    _forget_off()


def enabled() -> bool:
    return bool(os.environ.get(ENV))


class _Metrics:
    """Created lazily, in the process that records, after ENV is set."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.tasks = Counter("taskomatic_tasks", "Tasks ended, by action and outcome", ["action", "outcome"])
        self.duration = Histogram("taskomatic_task_duration_seconds", "Task run time (time_started to time_ended)",
                                  ["action"], buckets=_DURATION_BUCKETS)
        self.retries = Counter("taskomatic_task_retries", "Transient failures retried, by action", ["action"])
        self.reconciled = Counter("taskomatic_reconciled_tasks",
                                  "Interrupted tasks settled by reconciliation, by verdict", ["verdict"])
        self.corrections = Counter("taskomatic_host_status_corrections",
                                   "VM rows corrected by the host-status pass", ["state"])
        self.renewals = Counter("taskomatic_lease_renewals", "Multihost lease renewals the database accepted")
        self.losses = Counter("taskomatic_lease_losses", "Multihost leases found run out (the instance rejoined)")
        self.handovers = Counter("taskomatic_partition_handovers",
                                 "Multihost partitions changing hands here, by direction: taken (acquired, free "
                                 "or from an instance whose lease ran out) or given (handed over)", ["direction"])
        self.rebalances = Counter("taskomatic_rebalance_rounds", "Multihost balancing rounds run")
        self.fenced = Counter("taskomatic_fenced_writes",
                              "Task writes refused because the partition lease or the lease was no longer ours")
        self.wait = Histogram("taskomatic_task_wait_seconds",
                              "Enqueue-to-start latency: created_at to time_started of each task started",
                              buckets=_WAIT_BUCKETS)
        self.restarts = Counter("taskomatic_child_restarts",
                                "Child processes that died and were restarted, by role", ["role"])
        # Set by the host-status pass (one process, the reconciler): livemax drops a dead one's values.
        self.node_up = Gauge("taskomatic_node_up", "1 if the host's libvirt answered the last host-status pass",
                             ["host_id", "hostname"], multiprocess_mode="livemax")


_metrics: _Metrics | None = None
_off = False  # this process found metrics off (no directory in its environment)


def _get() -> _Metrics | None:
    global _metrics, _off
    # No environment lookup once decided: this runs several times per task on the hot path.
    # The directory is set once, before the children start, and never unset in a process; a
    # process that found it unset asks again only after a fork or prepare_directory().
    if _metrics is not None:
        return _metrics
    if _off:
        return None
    if not enabled():
        _off = True
        return None
    _metrics = _Metrics()
    return _metrics


def _forget_off() -> None:
    global _off
    _off = False


os.register_at_fork(after_in_child=_forget_off)


def task_ended(action: str, outcome: str, seconds: float | None) -> None:
    m = _get()
    if m is not None:
        m.tasks.labels(action, outcome).inc()
        if seconds is not None:
            m.duration.labels(action).observe(seconds)


def task_retried(action: str) -> None:
    m = _get()
    if m is not None:
        m.retries.labels(action).inc()


def task_reconciled(verdict: str) -> None:
    m = _get()
    if m is not None:
        m.reconciled.labels(verdict).inc()


def lease_renewed() -> None:
    m = _get()
    if m is not None:
        m.renewals.inc()


def lease_lost() -> None:
    m = _get()
    if m is not None:
        m.losses.inc()


def partitions_taken(count: int) -> None:
    m = _get()
    if m is not None:
        m.handovers.labels("taken").inc(count)


def partitions_given(count: int) -> None:
    m = _get()
    if m is not None:
        m.handovers.labels("given").inc(count)


def rebalanced() -> None:
    m = _get()
    if m is not None:
        m.rebalances.inc()


def write_fenced() -> None:
    m = _get()
    if m is not None:
        m.fenced.inc()


def row_corrected(state: str) -> None:
    m = _get()
    if m is not None:
        m.corrections.labels(state).inc()


def child_restarted(role: str) -> None:
    """Supervisor: a child died and is being restarted in its slot."""
    m = _get()
    if m is not None:
        m.restarts.labels(role).inc()


def node_seen(host_id: int, hostname: str, up: bool) -> None:
    """Host-status pass: whether this host's libvirt answered."""
    m = _get()
    if m is not None:
        m.node_up.labels(str(host_id), hostname).set(1 if up else 0)


def task_waited(seconds: float) -> None:
    """Shard, as a task's action starts: how long it waited since it was submitted (the mark that
    made it running returned its created_at, so the metric costs no query)."""
    m = _get()
    if m is not None:
        m.wait.observe(max(0.0, seconds))


class _LiveCollector:
    """Gauges read when scraped: build, database, queue sizes and age, what the fetcher holds."""

    def __init__(self, dsn: str, holding: Any) -> None:
        self.dsn = dsn
        self.holding = holding  # () -> (claimed tasks held, shards busy, partitions held)
        self.store: Any = None

    def _queue(self) -> Any:
        """The queue summary, or None when the database cannot be read (then database_up is 0)."""
        from taskomatic.db import observability
        from taskomatic.db.store import Store

        try:
            if self.store is None or self.store.conn.closed:
                self.store = Store.open(self.dsn, "taskomatic metrics", timeout=2)
                self.store.conn.autocommit = True
            return observability.queue_summary(self.store)
        except Exception as exc:  # a scrape must not kill the fetcher
            log.warning("metrics: cannot read the queue: %s", str(exc).strip().split("\n")[0])
            if self.store is not None:
                self.store.close()
            self.store = None
            return None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        build = GaugeMetricFamily("taskomatic_build_info", "The running taskomatic's version (always 1)",
                                  labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        summary = self._queue()
        database = GaugeMetricFamily("taskomatic_database_up", "1 if this scrape could read the database")
        database.add_metric([], 0 if summary is None else 1)
        yield database
        if summary is not None:
            yield GaugeMetricFamily("taskomatic_tasks_queued", "Tasks waiting to start (every instance's)",
                                    value=summary.queued)
            yield GaugeMetricFamily("taskomatic_tasks_running", "Tasks running now (every instance's)",
                                    value=summary.running)
            yield GaugeMetricFamily("taskomatic_oldest_queued_seconds", "Age of the oldest queued task (0: none)",
                                    value=summary.oldest_queued_seconds)
        held, busy, partitions = self.holding()
        yield GaugeMetricFamily("taskomatic_claims_held", "Claimed tasks this instance holds, not yet ended",
                                value=held)
        yield GaugeMetricFamily("taskomatic_shards_busy", "Shards running a task now", value=busy)
        yield GaugeMetricFamily("taskomatic_partitions_held", "Partitions this instance holds (multihost)",
                                value=partitions)


def serve(address: str, port: int, dsn: str, holding: Any) -> None:
    """Fetcher: serve every process's samples and the live gauges (a daemon thread)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(_LiveCollector(dsn, holding))
    start_http_server(port, addr=address, registry=registry)
    log.info("metrics on http://%s:%d/metrics", address, port)


def mark_dead(pid: int) -> None:
    """Supervisor: a child died; its live-gauge files go (counters stay)."""
    if enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
