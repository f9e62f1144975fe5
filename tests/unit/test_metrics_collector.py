"""The scrape-time gauges when the database cannot be read: the scrape still answers, and says so."""

from __future__ import annotations

import os

from taskomatic import __version__, metrics

UNREACHABLE = "host=/nonexistent/socket-dir dbname=taskomatic connect_timeout=1"


def _families(collector: metrics._LiveCollector) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {family.name: [(sample.labels, sample.value) for sample in family.samples]
            for family in collector.collect()}


def test_database_down_reads_as_database_up_zero_without_queue_gauges(caplog):
    collector = metrics._LiveCollector(UNREACHABLE, lambda: (5, 2, 0))
    families = _families(collector)
    assert families["taskomatic_build_info"] == [({"version": __version__}, 1)]
    assert families["taskomatic_database_up"] == [({}, 0)]
    # No made-up zeros for the queue when it could not be read: absent, so alerts see no data.
    assert "taskomatic_tasks_queued" not in families and "taskomatic_tasks_running" not in families
    assert families["taskomatic_claims_held"] == [({}, 5)] and families["taskomatic_shards_busy"] == [({}, 2)]
    warnings = [r.getMessage() for r in caplog.records if "cannot read the queue" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]


def test_metric_functions_are_no_ops_when_metrics_are_off(monkeypatch):
    monkeypatch.delenv(metrics.ENV, raising=False)
    monkeypatch.setattr(metrics, "_off", False)  # decided afresh here, and restored for the next test
    metrics.task_waited(0.5)
    metrics.node_seen(1, "node0", False)
    metrics.child_restarted("shard")
    assert metrics._get() is None


def test_metrics_off_is_decided_once_per_process(monkeypatch):
    """The hot path asks _get() several times per task: with metrics off it must not read the environment
    each time (os.environ.get cost about 0.7 us here, twice per task)."""
    monkeypatch.delenv(metrics.ENV, raising=False)
    monkeypatch.setattr(metrics, "_off", False)
    assert metrics._get() is None and metrics._off

    def asked() -> bool:
        raise AssertionError("the environment was read again")

    monkeypatch.setattr(metrics, "enabled", asked)
    metrics.task_ended("noop", "finished", 0.001)
    metrics.task_waited(0.5)
    assert metrics._get() is None


def test_metrics_off_is_asked_again_after_prepare_directory_and_in_a_forked_child(monkeypatch, tmp_path):
    monkeypatch.setenv(metrics.ENV, "restored-by-monkeypatch")
    monkeypatch.setattr(metrics, "_off", True)
    metrics.prepare_directory(tmp_path, 7)
    assert not metrics._off and metrics.enabled()

    monkeypatch.setattr(metrics, "_off", True)
    pid = os.fork()
    if pid == 0:  # the child: a shard forked from the fork server decides for itself
        os._exit(0 if not metrics._off else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
