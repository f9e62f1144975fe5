"""The soak (``bench/soak.py``): its verdict functions, and a smoke run of the real thing.

The smoke run (``python -m bench.soak --smoke``) is the soak at toy size: a
private PostgreSQL, two libvirt test nodes, 600 lifecycle tasks over 60 VMs
through one standalone instance with 2 shards and through 2 multihost
instances, sampled every 0.25 s. It asserts that the samples and every
verdict are there and that none failed; never what the figures are.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import soak_sampling, soak_verdicts
from bench.soak_verdicts import backlog_verdict, connection_verdict, memory_verdict, restarts, slope

REPO = Path(__file__).resolve().parents[2]


# -- the verdict functions --------------------------------------------------------------------------


def _series(values: list[float], step: float = 1.0) -> list[tuple[float, float]]:
    return [(i * step, v) for i, v in enumerate(values)]


def test_slope() -> None:
    assert slope([(0, 1.0), (1, 3.0), (2, 5.0)]) == pytest.approx(2.0)
    assert slope([(0, 4.0), (10, 4.0)]) == 0.0
    assert slope([(1, 1.0)]) is None
    assert slope([(1, 1.0), (1, 2.0)]) is None


def test_thirds_split_by_time() -> None:
    first, middle, last = soak_verdicts.thirds(_series([0.0] * 10), 0.0, 9.0)
    assert [t for t, _ in first] == [0, 1, 2] and [t for t, _ in middle] == [3, 4, 5]
    assert [t for t, _ in last] == [6, 7, 8, 9]


def test_memory_that_keeps_growing_is_flagged() -> None:
    # 40 MiB plus 100 kB per second for 10 minutes: a leak in proportion to the work done.
    points = _series([40_000 + 100 * i for i in range(600)])
    v = memory_verdict(points, 0.0, 599.0)
    assert v["enough_samples"] and v["growing"] is True
    assert v["last_slope_kb_per_min"] == pytest.approx(6000, rel=0.01)
    assert v["last_peak_kb"] > v["middle_peak_kb"]
    assert "still climbs" in v["why"]


def test_slow_growth_is_flagged_too() -> None:
    # 10 kB/s on 40 MiB: 2 MB over the last third of 10 minutes, above the 1 MiB floor; 1 kB/s (200 kB) is not.
    assert memory_verdict(_series([40_000 + 10 * i for i in range(600)]), 0.0, 599.0)["growing"] is True
    assert memory_verdict(_series([40_000 + 1 * i for i in range(600)]), 0.0, 599.0)["growing"] is False


def test_memory_that_levels_off_is_not_flagged() -> None:
    # A warm-up ramp over the first third, then flat with a saw-tooth of allocations and frees.
    values = [30_000 + 50 * i for i in range(200)] + [40_000 + (i % 7) * 300 for i in range(400)]
    v = memory_verdict(_series(values), 0.0, 599.0)
    assert v["enough_samples"] and v["growing"] is False
    assert v["start_kb"] == 30_000 and v["peak_kb"] == 41_800


def test_growth_that_slows_to_a_stop_is_not_flagged() -> None:
    # Logarithmic-ish: grows fast, then ever slower, flat over the last third.
    values = [40_000 + min(i, 350) * 20 for i in range(600)]
    assert memory_verdict(_series(values), 0.0, 599.0)["growing"] is False


def test_one_late_spike_is_not_a_leak() -> None:
    values = [40_000.0] * 600
    values[550] = 60_000.0  # a new high, but no sustained climb over the last third
    v = memory_verdict(_series(values), 0.0, 599.0)
    assert v["growing"] is False and "no sustained climb" in v["why"]


def test_memory_verdict_only_reads_the_load_window() -> None:
    # Growth after the load window (say, the drain) does not count; nor do samples before it.
    values = [40_000.0] * 300 + [40_000.0 + 1000 * i for i in range(300)]
    assert memory_verdict(_series(values), 0.0, 299.0)["growing"] is False
    assert memory_verdict(_series(values), 0.0, 599.0)["growing"] is True


def test_too_few_samples_give_no_memory_verdict() -> None:
    v = memory_verdict(_series([1.0, 2.0, 3.0, 4.0]), 0.0, 3.0)
    assert v["growing"] is None and not v["enough_samples"]
    assert v["start_kb"] == 1.0 and v["end_kb"] == 4.0


def test_steady_connections_do_not_leak() -> None:
    points = _series([2, 4, 6] + [6] * 97)
    v = connection_verdict(points, 0.0, 99.0)
    assert v["leaked"] is False and v["steady"] == 6 and v["end"] == 6 and v["peak"] == 6


def test_a_transient_reconnect_is_not_a_leak() -> None:
    values = [6.0] * 100
    values[50] = 7.0  # closed and reopened between two samples: both seen once
    values[80] = 5.0
    assert connection_verdict(_series(values), 0.0, 99.0)["leaked"] is False


def test_more_connections_at_the_end_than_in_the_steady_state_is_a_leak() -> None:
    # Flat through the load, one more left open at the end (idle): leaked.
    points = _series([6.0] * 100)
    v = connection_verdict(points, 0.0, 99.0, final=7.0)
    assert v["leaked"] is True and "above the steady state" in v["why"]
    # The end defaults to the series' last point, which may lie after the load window.
    assert connection_verdict([*points, (120.0, 8.0)], 0.0, 99.0)["leaked"] is True
    assert connection_verdict([*points, (120.0, 6.0)], 0.0, 99.0)["leaked"] is False


def test_connections_growing_with_tasks_leak_even_if_they_drop_at_the_end() -> None:
    # One more connection every 10 s of load, closed only when the daemon goes idle.
    points = _series([6 + i // 10 for i in range(100)])
    v = connection_verdict(points, 0.0, 99.0, final=6.0)
    assert v["leaked"] is True and "grows with the tasks" in v["why"]


def test_backlog_verdict() -> None:
    assert backlog_verdict(100, 0, 0, 100)["ok"] is True
    assert backlog_verdict(100, 1, 0, 99) == {"inserted": 100, "queued": 1, "running": 0, "ended": 99,
                                              "unsettled": 1, "ok": False}
    assert backlog_verdict(100, 0, 0, 99)["ok"] is False  # a task lost: ended != queued


def test_restarts() -> None:
    assert restarts({"shard 0": [10, 10, 10], "fetcher": [11, 11]}) == {}
    assert restarts({"shard 0": [10, 10, 12, 12], "shard 1": [13]}) == {"shard 0": 1}


def _row(id_: int, key: int, created: float, started: float, ended: float) -> dict[str, Any]:
    return {"id": id_, "key_id": key, "action": "start_vm", "state": "finished", "created": created,
            "started": started, "ended": ended}


def test_ready_time_is_the_later_of_queued_and_the_previous_task_of_the_key() -> None:
    rows = [_row(1, 7, 0.0, 0.1, 5.0), _row(2, 7, 1.0, 5.5, 6.0), _row(3, 8, 2.0, 2.1, 2.2),
            _row(4, 7, 9.0, 9.5, 9.6)]
    assert soak_verdicts.ready_times(rows) == {1: 0.0, 2: 5.0, 3: 2.0, 4: 9.0}


def test_latency_over_time_and_the_longest_waits() -> None:
    # Key 1: every task ready at once and started after 0.1 s; task 5 (key 2) waits 10 s after ready while
    # the three tasks queued after it start first.
    rows = [_row(1, 1, 0.0, 0.1, 0.2), _row(5, 2, 1.0, 11.0, 11.1), _row(6, 1, 2.0, 2.1, 2.2),
            _row(7, 3, 3.0, 3.1, 3.2), _row(8, 4, 4.0, 4.1, 4.2)]
    buckets = soak_verdicts.latency_over_time(rows, 0.0, buckets=2)
    assert [b["tasks"] for b in buckets] == [2, 3]
    assert buckets[0]["wait_max_ms"] == pytest.approx(10_000) and buckets[1]["wait_max_ms"] == pytest.approx(100)
    worst = soak_verdicts.longest_ready_waits(rows, 0.0, top=2)
    assert worst[0]["id"] == 5 and worst[0]["ready_wait_s"] == pytest.approx(10.0)
    assert worst[0]["overtaken_by"] == 3
    assert worst[1]["overtaken_by"] == 0


def test_roles_from_process_titles() -> None:
    assert soak_sampling.role_of("taskomatic: shard 3/8", False) == "shard 3"
    assert soak_sampling.role_of("taskomatic: fetcher (8 shards)", False) == "fetcher"
    assert soak_sampling.role_of("taskomatic: reconciler", False) == "reconciler"
    assert soak_sampling.role_of("anything", True) == "supervisor"
    roles = ["i2 shard 0", "i1 shard 10", "i1 fetcher", "i1 shard 2", "i1 supervisor"]
    assert sorted(roles, key=soak_sampling._role_order) == ["i1 supervisor", "i1 fetcher", "i1 shard 2", "i1 shard 10",
                                                   "i2 shard 0"]


def test_node_clients_counts_accepted_sockets_on_the_path(tmp_path: Path) -> None:
    # This process plays libvirtd: a listening socket and two accepted clients; the clients'
    # own ends (unbound) and the listener are not counted.
    path = str(tmp_path / "sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()
        clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
        try:
            for c in clients:
                c.connect(path)
            accepted = [server.accept()[0] for _ in clients]
            assert soak_sampling.node_clients(os.getpid(), path, soak_sampling.unix_sockets()) == 2
            accepted[0].close()
            assert soak_sampling.node_clients(os.getpid(), path, soak_sampling.unix_sockets()) == 1
            accepted[1].close()
        finally:
            for c in clients:
                c.close()
        assert soak_sampling.node_clients(os.getpid(), path, soak_sampling.unix_sockets()) == 0
        assert soak_sampling.node_clients(os.getpid(), path + "-other", soak_sampling.unix_sockets()) == 0


def test_compute_verdicts_on_columns() -> None:
    t = [float(i) for i in range(30)]
    columns = {
        "t": t,
        "rss_kb": {"shard 0": [40_000 + (100_000 if i >= 10 else 0) + i * 1000 for i in range(30)],
                   "fetcher": [30_000] * 30},
        "libvirtd_rss_kb": {"node0": [20_000] * 30},
        "pg": {"taskomatic shard 0": [1] * 30, "taskomatic fetcher": [None] * 5 + [1] * 25},
        "pg_total": [2] * 30,
        "libvirt": {"node0": [3] * 29 + [4]},
        "pids": {"shard 0": [5] * 30, "fetcher": [6] * 30},
    }
    v = soak_verdicts.compute_verdicts(columns, 27.0, {"queued": 0, "running": 0, "ended": 50}, 50)
    assert v["memory_growing"] == ["shard 0"] and v["memory_ok"] is False
    assert v["memory"]["fetcher"]["growing"] is False
    assert v["pg_connections"]["taskomatic fetcher"]["leaked"] is False  # absent early = 0, then steady
    assert v["libvirt_connections"]["node0"]["leaked"] is True  # one more at the end
    assert v["connections_ok"] is False
    assert v["backlog"]["ok"] is True and v["restarts"] == {}


# -- the smoke run ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("soak-smoke")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "bench.soak", "--smoke", "--no-progress", "--out", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            # SIGTERM: the soak stops its daemons, nodes and PostgreSQL (each in a session of its own).
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, f"soak exited with {proc.returncode}:\n{stdout[-4000:]}\n{stderr[-4000:]}"
    results: dict[str, Any] = json.loads((out / "soak.json").read_text())
    results["_out"] = str(out)
    return results


@pytest.mark.slow
def test_smoke_runs_both_configurations(smoke: dict[str, Any]) -> None:
    assert smoke["kind"] == "soak" and smoke["size"] == "smoke" and smoke["ok"] is True
    assert [(r["setup"], r["instances"], r["shards_per_instance"]) for r in smoke["runs"]] == [
        ("standalone", 1, 2), ("multihost", 2, 1)]
    for key in ("cpu_model", "cores", "memory_kb", "kernel", "python", "postgresql", "commit"):
        assert smoke["machine"][key], key
    for run in smoke["runs"]:
        assert run["error"] is None and run["ok"] is True
        assert run["exit_codes"] == [0] * run["instances"]
        assert run["task_states"] == {"finished": 600}
        assert run["throughput_tps"] > 0 and run["duration_s"] > 0
        assert run["ready_wait_ms"]["p50"] <= run["ready_wait_ms"]["max"] <= run["latency_ms"]["max"] + 0.1
        assert sum(b["tasks"] for b in run["latency_over_time"]) == 600
        cpu = run["cpu"]
        assert cpu["daemon_s"] > 0 and cpu["postgres_s"] > 0 and cpu["window_s"] > 0
        assert 0 <= cpu["other_share"] <= cpu["machine_busy_share"] <= 1.05
        assert len(run["longest_ready_waits"]) == 10 and run["longest_ready_waits"][0]["claimed_by"] is not None


@pytest.mark.slow
def test_smoke_has_samples_of_everything(smoke: dict[str, Any]) -> None:
    for run in smoke["runs"]:
        s = run["samples"]
        n = len(s["t"])
        assert n >= 12 and s["t"] == sorted(s["t"])
        prefix = ["i1 ", "i2 "] if run["setup"] == "multihost" else [""]
        shards = range(run["shards_per_instance"])
        roles = {f"{p}{r}" for p in prefix for r in ("supervisor", "fetcher", *(f"shard {i}" for i in shards))}
        assert roles <= set(s["rss_kb"])
        assert all(len(v) == n for v in s["rss_kb"].values())
        assert all(kb > 0 for kb in s["rss_kb"][f"{prefix[0]}shard 0"] if kb is not None)
        assert {f"taskomatic shard {i}" for i in shards} | {"taskomatic fetcher", "taskomatic supervisor"} \
            <= set(s["pg"])
        assert min(s["pg_total"]) > 0
        assert set(s["libvirt"]) == {"node0", "node1"}
        # The node's keeper holds one connection; the daemon's are on top of it.
        assert max(s["libvirt_total"]) > 2
        assert s["tasks"]["inserted"][-1] == 600 and s["tasks"]["ended"][-1] == 600


@pytest.mark.slow
def test_smoke_verdicts_are_computed_and_none_failed(smoke: dict[str, Any]) -> None:
    for run in smoke["runs"]:
        v = run["verdicts"]
        assert soak_verdicts.verdict_flags(v) == dict.fromkeys(soak_verdicts.verdict_flags(v), True)
        assert v["memory"] and all(m["enough_samples"] and m["growing"] is False for m in v["memory"].values())
        assert v["pg_connections"] and all(c["leaked"] is False for c in v["pg_connections"].values())
        assert v["pg_connections_total"]["leaked"] is False
        assert all(c["leaked"] is False and c["end"] >= 1 for c in v["libvirt_connections"].values())
        assert v["backlog"] == {"inserted": 600, "queued": 0, "running": 0, "ended": 600, "unsettled": 0,
                                "ok": True}
        assert v["restarts"] == {}
        assert v["order"]["ok"] and v["order"]["keys"] == 60
        assert v["lifecycle"]["ok"] and v["lifecycle"]["vms"] == 60 and v["lifecycle"]["vm_mismatches"] == 0


@pytest.mark.slow
def test_smoke_writes_summary_and_plots(smoke: dict[str, Any]) -> None:
    out = Path(smoke["_out"])
    summary = (out / "summary.md").read_text()
    assert "## standalone" in summary and "## multihost" in summary and "every verdict ok" in summary
    pytest.importorskip("matplotlib")
    for name in ("rss-standalone.png", "connections-standalone.png", "rss-multihost.png",
                 "connections-multihost.png"):
        assert (out / name).stat().st_size > 0, name
