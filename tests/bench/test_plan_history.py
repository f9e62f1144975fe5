"""``taskomatic plan`` from a fleet's history: rows with known run times, arrival times and keys in a real
PostgreSQL; the plan's inputs and its answer checked against figures computed here by hand (the
formulas written out again, not the planner's functions)."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from taskomatic.capacity.fleet import Request, inputs_from_history, make_plan
from taskomatic.capacity.model import PlanError
from taskomatic.db.history import read_history
from taskomatic.db.store import Store
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2026, 1, 5, 10, 0, tzinfo=dt.UTC)  # an hour boundary: the window is [T0, T0 + 2 h)
WAIT = 0.5  # every task started 0.5 s after it was submitted


def _insert(conn: Any, created: dt.datetime, key: int, action: str, run_s: float, state: str = "finished") -> None:
    started = created + dt.timedelta(seconds=WAIT)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action, state, created_at, time_started,"
                    " time_ended) VALUES ('Vm', %s, %s, %s, %s, %s, %s)",
                    (key, action, state, created, started if state == "finished" else None,
                     started + dt.timedelta(seconds=run_s) if state == "finished" else None))


@pytest.fixture
def fleet_dsn(dsn: str) -> str:
    """Hour 0: 20 start_vm (Vm 1 four times, Vm 2..17 once). Hour 1: 10 start_vm (Vm 18..27), 6 migrate_vm
    (Vm 1). start_vm runs 1 s and 3 s alternately (mean 2, sd 1), migrate_vm 10 s. Outside: a canceled task,
    one before and one after the window."""
    conn = psycopg2.connect(dsn)
    starts = [1, 1, 1, 1, *range(2, 18)]
    for i, key in enumerate(starts):
        _insert(conn, T0 + dt.timedelta(seconds=60 * i), key, "start_vm", 1.0 if i % 2 == 0 else 3.0)
    for i, key in enumerate(range(18, 28)):
        _insert(conn, T0 + dt.timedelta(hours=1, seconds=60 * i), key, "start_vm", 1.0 if i % 2 == 0 else 3.0)
    for i in range(6):
        _insert(conn, T0 + dt.timedelta(hours=1, seconds=600 + 60 * i), 1, "migrate_vm", 10.0)
    _insert(conn, T0 + dt.timedelta(seconds=30), 5, "start_vm", 0.0, state="canceled")
    _insert(conn, T0 - dt.timedelta(seconds=1), 99, "start_vm", 100.0)
    _insert(conn, T0 + dt.timedelta(hours=2), 99, "start_vm", 100.0)
    conn.commit()
    conn.close()
    return dsn


def _history(dsn: str) -> Any:
    store = Store.open(dsn, "test plan")
    try:
        return read_history(store, T0, T0 + dt.timedelta(hours=2), 3600.0)
    finally:
        store.close()


# -- the formulas, by hand --------------------------------------------------------------------

def _erlang_c(c: int, a: float) -> float:
    top = a ** c / math.factorial(c) * c / (c - a)
    return top / (sum(a ** k / math.factorial(k) for k in range(c)) + top)


def _tail(p: float, m: float, t: float) -> float:
    return p * math.exp(-t / m) if p > 0 else 0.0


def _sum_tail(p1: float, m1: float, p2: float, m2: float, t: float) -> float:
    both = (m1 * math.exp(-t / m1) - m2 * math.exp(-t / m2)) / (m1 - m2)
    return p1 * (1 - p2) * math.exp(-t / m1) + (1 - p1) * p2 * math.exp(-t / m2) + p1 * p2 * both


def _quantile(tail: Any) -> float:
    low, high = 0.0, 1e6
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if tail(mid) > 0.05 else (low, mid)
    return high


def test_history_is_read_as_the_rows_say(fleet_dsn: str) -> None:
    history = _history(fleet_dsn)
    assert history.window["tasks"] == 36
    actions = {a["action"]: a for a in history.actions}
    assert actions["start_vm"]["tasks"] == 30 and actions["migrate_vm"]["tasks"] == 6
    assert actions["start_vm"]["run_mean_s"] == pytest.approx(2.0)
    assert actions["start_vm"]["run_sd_s"] == pytest.approx(1.0)
    assert actions["migrate_vm"]["run_mean_s"] == pytest.approx(10.0) and actions["migrate_vm"]["run_sd_s"] == 0
    assert actions["start_vm"]["wait_p95_s"] == pytest.approx(WAIT)
    assert [(b["bucket_start"], b["tasks"]) for b in history.buckets] == [(T0, 20), (T0 + dt.timedelta(hours=1), 16)]
    per_key: dict[int, int] = {}
    for row in history.key_actions:
        per_key[row["key_id"]] = per_key.get(row["key_id"], 0) + row["tasks"]
    assert per_key[1] == 10 and len(per_key) == 27 and sum(per_key.values()) == 36


def test_plan_inputs_and_answer_match_the_hand_computation(fleet_dsn: str) -> None:
    growth, target = 100.0, 90.0
    request = Request(target_p95_s=target, overhead_s=0.0, overhead_source="test", growth=growth)
    inputs = inputs_from_history(_history(fleet_dsn), request)
    # The busiest hour had 20 tasks: 20/h, mixed 30:6 as the window was; the mean was 36 over 2 h.
    assert inputs.peak_per_hour == pytest.approx(20.0) and inputs.mean_per_hour == pytest.approx(18.0)
    w = inputs.workload
    assert w.tasks_per_hour == pytest.approx({"start_vm": 2000 * 30 / 36, "migrate_vm": 2000 * 6 / 36})
    assert w.latency_s == pytest.approx({"start_vm": 2.0, "migrate_vm": 10.0})
    assert w.latency_sd_s == pytest.approx({"start_vm": 1.0, "migrate_vm": 0.0})
    shares = dict(w.key_shares)
    assert shares["Vm:1"] == pytest.approx(10 / 36) and len(shares) == 27

    mean, second = 30 / 36 * 2 + 6 / 36 * 10, 30 / 36 * (4 + 1) + 6 / 36 * 100  # E[S] = 10/3, E[S²] = 125/6
    rate = 2000 / 3600
    a, correction = rate * mean, (1 + second / mean ** 2 - 1) / 2
    hot_rate = rate * 10 / 36
    hot_rho = hot_rate * mean
    hot_if_waiting = hot_rate * second / (2 * (1 - hot_rho)) / hot_rho

    def pool(c: int) -> tuple[float, float]:
        prob = _erlang_c(c, a)
        return prob, prob * mean / (c - a) * correction / prob

    expected = None
    for c in range(2, 10):
        p, m = pool(c)
        pool_p95 = m * math.log(p / 0.05) if p > 0.05 else 0.0
        hot_p95 = _quantile(lambda t, p=p, m=m: _sum_tail(hot_rho, hot_if_waiting, p, m, t))
        if pool_p95 <= target and hot_p95 <= target:
            expected = c
            break
    fleet = make_plan(inputs, request)
    assert fleet.result.shards == expected == 2
    assert fleet.instances == 1 and fleet.shards_per_instance == 2
    p, m = pool(2)
    answer = fleet.result.rows[-1]
    assert answer.pool_p95_wait_s == pytest.approx(m * math.log(p / 0.05))
    assert answer.hottest_key_p95_wait_s == pytest.approx(
        _quantile(lambda t: _sum_tail(hot_rho, hot_if_waiting, p, m, t)), rel=1e-6)
    hot = fleet.hot_keys[0]
    assert hot["key"] == "Vm:1" and hot["tasks_per_hour"] == pytest.approx(2000 * 10 / 36)
    assert hot["utilisation"] == pytest.approx(hot_rho)
    assert hot["p95_wait_alone_s"] == pytest.approx(hot_if_waiting * math.log(hot_rho / 0.05))
    # migrate_vm runs only on Vm:1: its tasks wait the hottest key's wait; start_vm's mostly the pool's.
    waits = {x["action"]: x for x in fleet.action_waits}
    assert waits["migrate_vm"]["p95_wait_s"] == pytest.approx(answer.hottest_key_p95_wait_s, rel=1e-6)
    assert waits["migrate_vm"]["mean_wait_s"] == pytest.approx(p * m + hot_rho * hot_if_waiting)
    assert waits["start_vm"]["p95_wait_s"] < waits["migrate_vm"]["p95_wait_s"]


def test_a_key_that_alone_misses_the_target_makes_it_impossible(fleet_dsn: str) -> None:
    request = Request(target_p95_s=10.0, overhead_s=0.0, overhead_source="test", growth=100.0)
    fleet = make_plan(inputs_from_history(_history(fleet_dsn), request), request)
    assert fleet.result.shards is None
    assert fleet.result.verdict.startswith("impossible: key Vm:1 waits behind its own tasks")
    assert fleet.key_max_per_hour < fleet.hot_keys[0]["tasks_per_hour"]


def test_what_ifs_replace_the_measured_rate_mix_and_latency(fleet_dsn: str) -> None:
    history = _history(fleet_dsn)
    request = Request(target_p95_s=60, overhead_s=0.0, overhead_source="test", rate_basis="mean",
                      mix={"start_vm": 1, "save_vm": 1}, latency_s={"save_vm": 4.0}, latency_cv=0.5)
    w = inputs_from_history(history, request).workload
    assert w.tasks_per_hour == pytest.approx({"start_vm": 9.0, "save_vm": 9.0})  # the mean, 18/h, half each
    assert w.latency_s["save_vm"] == 4.0 and w.latency_sd_s["save_vm"] == pytest.approx(2.0)
    with pytest.raises(PlanError, match="no run time for shutdown_vm"):
        inputs_from_history(history, Request(target_p95_s=60, overhead_s=0.0, overhead_source="t",
                                             mix={"shutdown_vm": 1}))
    given = inputs_from_history(history, Request(target_p95_s=60, overhead_s=0.0, overhead_source="t",
                                                 total_per_hour=360.0, growth=2.0)).workload
    assert given.tasks_per_hour == pytest.approx({"start_vm": 600.0, "migrate_vm": 120.0})


# -- the command ------------------------------------------------------------------------------

def taskomatic(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKOMATIC_", "PG"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "taskomatic", *args], capture_output=True, text=True, env=env,
                          cwd=str(REPO), timeout=60, check=False)


def _only_the_window(dsn: str) -> str:
    """The rows outside [T0, T0 + 2 h) deleted: a window back from now then holds exactly the 36 (and the
    canceled one, which the history leaves out)."""
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("DELETE FROM tasks WHERE task_target_id = 99")
    conn.commit()
    conn.close()
    return dsn


def test_plan_json_follows_the_cli_convention(fleet_dsn: str) -> None:
    proc = taskomatic("--dsn", _only_the_window(fleet_dsn), "plan", "--since", "100000d", "--bucket", "1h",
                      "--growth", "100", "--target-p95", "90", "--overhead-ms", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["answer"]["shards"] == 2 and isinstance(doc["answer"]["shards"], int)
    assert doc["answer"]["instances"] == 1 and doc["answer"]["possible"] is True
    assert dt.datetime.fromisoformat(doc["generated_at"]).utcoffset() == dt.timedelta(0)
    assert dt.datetime.fromisoformat(doc["history"]["peak_bucket_start"]) == T0
    assert doc["history"]["tasks"] == 36 and doc["history"]["keys"] == 27
    assert {a["action"] for a in doc["actions"]} == {"start_vm", "migrate_vm"}
    for action in doc["actions"]:
        assert isinstance(action["p95_wait_s"], float) and isinstance(action["tasks_per_hour"], float)
    assert doc["hot_keys"][0]["key"] == "Vm:1"
    assert all(isinstance(r["shards"], int) and isinstance(r["meets_target"], bool) for r in doc["rows"])


def test_plan_text_answers_on_one_screen(fleet_dsn: str) -> None:
    proc = taskomatic("--dsn", _only_the_window(fleet_dsn), "plan", "--since", "100000d", "--growth", "100",
                      "--target-p95", "5", "--overhead-ms", "0")
    out = proc.stdout
    assert proc.returncode == 1, proc.stderr  # impossible: Vm:1 alone waits longer than 5 s at 100x
    assert "ANSWER: impossible: key Vm:1" in out and "migrate_vm" in out
    assert len(out.splitlines()) <= 40


def test_plan_never_starts_a_private_server(tmp_path: Path) -> None:
    proc = taskomatic("--embedded-db", "--state-dir", str(tmp_path), "plan")
    assert proc.returncode == 4
    assert "is not running" in proc.stderr
    assert not (tmp_path / "postgres").exists()


def test_bad_plan_input_is_a_usage_error(fleet_dsn: str) -> None:
    proc = taskomatic("--dsn", fleet_dsn, "plan", "--since", "100000d", "--mix", "reboot_vm=1")
    assert proc.returncode == 2 and "no run time for reboot_vm" in proc.stderr
    proc = taskomatic("--dsn", fleet_dsn, "plan", "--since", "7 fortnights")
    assert proc.returncode == 2 and "expected a duration such as 7d" in proc.stderr


def test_history_is_read_in_one_read_only_snapshot(fleet_dsn: str) -> None:
    store = Store.open(fleet_dsn, "test plan")
    seen: list[tuple[str, str, str]] = []
    original = store.all

    def spy(name: str, /, **params: Any) -> list[dict[str, Any]]:
        with store.conn.cursor() as cur:
            cur.execute("SHOW transaction_read_only")
            read_only = cur.fetchone()[0]
            cur.execute("SHOW transaction_isolation")
            isolation = cur.fetchone()[0]
        seen.append((name, read_only, isolation))
        return original(name, **params)

    store.all = spy  # type: ignore[method-assign]
    try:
        read_history(store, T0, T0 + dt.timedelta(hours=2), 3600.0)
        assert {name for name, _, _ in seen} == {"history_window", "history_actions", "history_rate_buckets",
                                                 "history_key_actions"}
        assert {(ro, iso) for _, ro, iso in seen} == {("on", "repeatable read")}
        # Ended, and the connection is as it was: its next transaction may write again.
        assert store.conn.status == psycopg2.extensions.STATUS_READY
        with store.conn.cursor() as cur:
            cur.execute("SHOW transaction_read_only")
            assert cur.fetchone()[0] == "off"
        store.conn.rollback()
    finally:
        store.close()


def test_plan_from_the_history_a_kept_demo_produced() -> None:
    """The README's example: `demo --keep` leaves its PostgreSQL running; `plan --embedded-db` reads it."""
    import re
    import shutil
    import signal

    proc = taskomatic("demo", "--vms", "10", "--tasks", "60", "--nodes", "1", "--keep", "--no-progress")
    kept = re.search(r"^kept (\S+): its PostgreSQL \(pid (\d+)\) still runs", proc.stdout, re.MULTILINE)
    assert kept, proc.stdout[-3000:] + proc.stderr[-3000:]
    base, pid = Path(kept.group(1)), int(kept.group(2))
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        planned = taskomatic("--embedded-db", "--state-dir", str(base), "plan", "--since", "1h", "--bucket",
                             "10s", "--json")
        assert planned.returncode == 0, planned.stderr
        doc = json.loads(planned.stdout)
        assert doc["history"]["tasks"] >= 60  # the demo's tasks, plus what its storage and host phases queued
        assert {"create_vm", "start_vm"} <= {a["action"] for a in doc["actions"]}
        assert doc["answer"]["shards"] >= 1 and doc["hot_keys"][0]["key"].startswith(("Vm:", "Host:",
                                                                                       "StoragePool:"))
    finally:
        os.kill(pid, signal.SIGINT)  # the server the demo left for us: a fast shutdown
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), what=f"PostgreSQL pid {pid} to stop")
        shutil.rmtree(base, ignore_errors=True)
