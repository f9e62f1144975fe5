"""Prometheus metrics (prometheus-client), off unless ``metrics_port`` is set.

taskomatic is several processes, so it uses prometheus-client's multiprocess
mode: each process writes its samples to files under one directory (set in
the environment by the supervisor before it starts the children), and the
fetcher serves them all, plus gauges read from the database at scrape time,
on ``metrics_address`` (localhost by default).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
_DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


def prepare_directory(state_dir: Path, instance_id: int) -> None:
    """Supervisor, before starting children: a fresh sample directory, named in the environment."""
    directory = state_dir / "run" / f"metrics-{instance_id}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, mode=0o700)
    os.environ[ENV] = str(directory)


def enabled() -> bool:
    return bool(os.environ.get(ENV))


class _Metrics:
    """Created lazily, in the process that records, after ENV is set."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

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
        self.keys_claimed = Counter("taskomatic_keys_claimed",
                                    "Ordering keys claimed, by how: free, or taken over from an instance "
                                    "whose lease ran out", ["how"])
        self.keys_released = Counter("taskomatic_keys_released", "Ordering keys released after their queue drained")
        self.fenced = Counter("taskomatic_fenced_writes",
                              "Task writes refused because the key claim or the lease was no longer ours")


_metrics: _Metrics | None = None


def _get() -> _Metrics | None:
    global _metrics
    if not enabled():
        return None
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


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


def keys_claimed(count: int, how: str) -> None:
    m = _get()
    if m is not None:
        m.keys_claimed.labels(how).inc(count)


def keys_released(count: int) -> None:
    m = _get()
    if m is not None:
        m.keys_released.inc(count)


def write_fenced() -> None:
    m = _get()
    if m is not None:
        m.fenced.inc()


def row_corrected(state: str) -> None:
    m = _get()
    if m is not None:
        m.corrections.labels(state).inc()


class _LiveCollector:
    """Gauges read when scraped: queue depth, oldest queued task, what the fetcher holds."""

    def __init__(self, dsn: str, holding: Any) -> None:
        self.dsn = dsn
        self.holding = holding  # () -> (claimed tasks held, shards busy, keys held)
        self.conn: Any = None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily("taskomatic_queue_depth", "Tasks queued or running", labels=["state"])
        oldest = GaugeMetricFamily("taskomatic_oldest_queued_seconds", "Age of the oldest queued task")
        try:
            import psycopg2

            if self.conn is None or self.conn.closed:
                self.conn = psycopg2.connect(self.dsn, application_name="taskomatic metrics")
                self.conn.autocommit = True
            with self.conn.cursor() as cur:
                cur.execute("SELECT state, count(*) FROM tasks WHERE state IN ('queued', 'running') GROUP BY state")
                counts = dict(cur.fetchall())
                cur.execute("SELECT extract(epoch FROM clock_timestamp() - min(created_at)) FROM tasks "
                            "WHERE state = 'queued'")
                age = cur.fetchone()[0]
            for state in ("queued", "running"):
                depth.add_metric([state], counts.get(state, 0))
            oldest.add_metric([], float(age or 0.0))
            yield depth
            yield oldest
        except Exception as exc:  # a scrape must not kill the fetcher
            log.warning("metrics: cannot read the queue: %s", exc)
            self.conn = None
        held, busy, keys = self.holding()
        claims = GaugeMetricFamily("taskomatic_claims_held", "Claimed tasks this instance holds, not yet ended")
        claims.add_metric([], held)
        yield claims
        shards = GaugeMetricFamily("taskomatic_shards_busy", "Shards running a task now")
        shards.add_metric([], busy)
        yield shards
        held_keys = GaugeMetricFamily("taskomatic_keys_held", "Ordering keys this instance holds (multihost)")
        held_keys.add_metric([], keys)
        yield held_keys


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
