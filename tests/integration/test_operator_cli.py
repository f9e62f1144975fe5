"""Operator commands: retry, status, tasks --follow (the real CLI as a subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from tests.helpers import REPO, query, wait_for


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskomatic", *args, "--dsn", dsn], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)


def test_retry_queues_a_copy_at_the_end_of_the_queue(dsn):
    failed = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, args, state, message) "
                        "VALUES ('Vm', 7, 'start_vm', '{\"host_id\": 2}', 'failed', 'boom') RETURNING id")[0]["id"]
    later = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
                       "VALUES ('Vm', 7, 'suspend_vm') RETURNING id")[0]["id"]
    done = cli(dsn, "retry", str(failed))
    assert done.returncode == 0, done.stderr
    copy = query(dsn, "SELECT * FROM tasks WHERE id > %s ORDER BY id", (later,))
    assert len(copy) == 1 and f"as task {copy[0]['id']}" in done.stdout
    row = copy[0]
    assert (row["task_target_type"], row["task_target_id"], row["action"], row["args"], row["state"]) == (
        "Vm", 7, "start_vm", {"host_id": 2}, "queued")
    assert query(dsn, "SELECT state FROM tasks WHERE id = %s", (failed,))[0]["state"] == "failed"

    refused = cli(dsn, "retry", str(later))
    assert refused.returncode == 1 and "is queued; only failed or canceled tasks can be retried" in refused.stderr
    missing = cli(dsn, "retry", "999999")
    assert missing.returncode == 1 and "no task 999999" in missing.stderr


def test_status_reports_instances_queue_and_oldest_task(dsn, daemon_factory):
    daemon = daemon_factory(shards=2)
    first = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
                       "VALUES ('Vm', 1, 'start_vm') RETURNING id")[0]["id"]
    wait_for(lambda: query(dsn, "SELECT state FROM tasks WHERE id = %s", (first,))[0]["state"] == "failed",
             what="the task to end")
    report = json.loads(cli(dsn, "status", "--json").stdout)
    assert [i["pid"] for i in report["instances"]] == [daemon.pid]
    assert report["tasks"] == {} and report["oldest_queued"] is None and report["running"] == []
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0

    waiting = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
                         "VALUES ('Vm', 1, 'start_vm'), ('Vm', 2, 'start_vm') RETURNING id")
    report = json.loads(cli(dsn, "status", "--json").stdout)
    assert report["instances"] == []
    assert report["tasks"] == {"queued": 2}
    assert report["oldest_queued"]["id"] == waiting[0]["id"]
    text = cli(dsn, "status")
    assert text.returncode == 0 and "2 queued" in text.stdout and f"task {waiting[0]['id']}" in text.stdout


@pytest.mark.slow
def test_tasks_follow_prints_new_and_ended_tasks(dsn):
    proc = subprocess.Popen([sys.executable, "-m", "taskomatic", "tasks", "--follow", "--json", "--dsn", dsn],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            start_new_session=True)
    lines: list[dict] = []
    reader = threading.Thread(target=lambda: lines.extend(json.loads(line) for line in proc.stdout), daemon=True)
    reader.start()
    try:
        task = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
                          "VALUES ('Vm', 3, 'start_vm') RETURNING id")[0]["id"]
        wait_for(lambda: any(r["id"] == task and r["state"] == "queued" for r in lines), 30, what="the new task")
        query(dsn, "UPDATE tasks SET state = 'canceled', time_ended = clock_timestamp() WHERE id = %s RETURNING id",
              (task,))
        wait_for(lambda: any(r["id"] == task and r["state"] == "canceled" for r in lines), 30, what="its end")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
