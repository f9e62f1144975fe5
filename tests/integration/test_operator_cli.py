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
    assert text.returncode == 3 and "2 queued" in text.stdout and "no instance is live" in text.stdout
    assert f"task {waiting[0]['id']}" in text.stdout


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_tasks_follow_prints_new_and_ended_tasks(dsn, signum):
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
        os.killpg(proc.pid, signum)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # never leave it behind
            proc.wait(10)
            raise AssertionError(f"tasks --follow did not end on signal {signum} within 30 s") from None
    assert code == 0


# -- show, actions, submit checks, cancel/retry by filter, global options -------------------------------


def test_show_gives_one_task_whole(dsn):
    instance = query(dsn, "INSERT INTO instances (hostname, pid, version, mode, shards) "
                          "VALUES ('node-a', 4242, '1.0', 'standalone', 2) RETURNING id")[0]["id"]
    task = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by) "
                      "VALUES ('Vm', 5, 'migrate_vm', '{\"host_id\": 2}', 'the web UI') RETURNING id")[0]["id"]
    query(dsn, "UPDATE tasks SET state = 'failed', claimed_by = %s, claimed_at = now(), attempts = 2, "
               "time_started = now(), time_ended = now(), message = %s WHERE id = %s",
          (instance, "first line\nsecond line of a long message " + "x" * 200, task))
    done = cli(dsn, "show", str(task), "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert (shown["id"], shown["state"], shown["args"], shown["attempts"]) == (task, "failed", {"host_id": 2}, 2)
    assert shown["message"].endswith("x" * 200)  # the full message
    assert shown["holder"]["instance"] == instance and shown["holder"]["hostname"] == "node-a"
    assert shown["ordering_key"] == "Vm:5" and isinstance(shown["ran_seconds"], float)
    assert shown["time_started"].endswith("+00:00")
    text = cli(dsn, "show", str(task))
    assert text.returncode == 0
    for words in ("migrate_vm Vm:5 - failed", '{"host_id": 2}', "attempts:      2", "node-a pid 4242",
                  "second line of a long message", "the web UI"):
        assert words in text.stdout, (words, text.stdout)
    missing = cli(dsn, "show", "999999")
    assert missing.returncode == 1 and "no task 999999" in missing.stderr


def test_actions_lists_the_installed_actions_with_their_arguments():
    done = subprocess.run(
        [sys.executable, "-m", "taskomatic", "actions", "--json"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == 0, done.stderr
    actions = {a["name"]: a for a in json.loads(done.stdout)}
    assert {"create_vm", "start_vm", "migrate_vm", "refresh_pool", "create_volume", "clear_vms"} <= set(actions)
    assert actions["migrate_vm"]["target_types"] == ["Vm"] and "host_id" in actions["migrate_vm"]["args"]
    assert actions["refresh_pool"]["target_types"] == ["StoragePool"]


def test_submit_is_checked_against_the_installed_actions(dsn):
    typo = cli(dsn, "submit", "strat_vm", "--vm", "1")
    assert typo.returncode == 2 and "no action named 'strat_vm'" in typo.stderr and "'start_vm'" in typo.stderr
    wrong_target = cli(dsn, "submit", "start_vm", "--pool", "1")
    assert wrong_target.returncode == 2 and "acts on Vm, not StoragePool" in wrong_target.stderr
    bad_args = cli(dsn, "submit", "start_vm", "--vm", "1", "--args", '{"hostid": 2}')
    assert bad_args.returncode == 2 and "hostid" in bad_args.stderr
    assert query(dsn, "SELECT count(*) AS n FROM tasks")[0]["n"] == 0, "a refused task was queued"
    good = cli(dsn, "submit", "migrate_vm", "--vm", "1", "--args", '{"host_id": 2}')
    assert good.returncode == 0, good.stderr


def test_cancel_and_retry_by_filter_count_first_and_need_yes(dsn):
    ids = [r["id"] for r in query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) VALUES "
                                       "('Vm', 1, 'start_vm'), ('Vm', 2, 'start_vm'), ('Vm', 3, 'suspend_vm') "
                                       "RETURNING id")]
    asked = cli(dsn, "cancel", "--action", "start_vm")
    assert asked.returncode == 1 and "2 tasks match" in asked.stdout and "--yes" in asked.stdout
    assert {r["state"] for r in query(dsn, "SELECT state FROM tasks")} == {"queued"}, "changed without --yes"
    done = cli(dsn, "cancel", "--action", "start_vm", "--yes")
    assert done.returncode == 0 and "2 of 2 tasks canceled" in done.stdout, done.stdout
    states = {r["id"]: r["state"] for r in query(dsn, "SELECT id, state FROM tasks")}
    assert states == {ids[0]: "canceled", ids[1]: "canceled", ids[2]: "queued"}
    again = cli(dsn, "retry", "--target", "Vm:2", "--yes")
    assert again.returncode == 0 and "1 of 1 tasks queued again" in again.stdout, again.stdout
    copies = query(dsn, "SELECT task_target_id, state FROM tasks WHERE id > %s", (ids[2],))
    assert copies == [{"task_target_id": 2, "state": "queued"}]
    both = cli(dsn, "cancel", str(ids[2]), "--action", "start_vm")
    assert both.returncode == 2 and "not both" in both.stderr


def test_global_options_are_honoured_or_refused(dsn):
    for args, words in ((["--shards", "3", "status"], "--shards has no effect on 'status'"),
                        (["--mode", "multihost", "tasks"], "--mode has no effect on 'tasks'"),
                        (["demo", "--dsn", "dbname=x"], "--dsn has no effect on 'demo'"),
                        (["demo", "--state-dir", "/tmp/x"], "--state-dir has no effect on 'demo'")):
        done = subprocess.run([sys.executable, "-m", "taskomatic", *args], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
        assert done.returncode == 2 and words in done.stderr, (args, done.stderr)


def test_every_option_has_help_text():
    import argparse

    from taskomatic.cli import build_parser

    def walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    missing += walk(child, f"{path} {name}")
            elif not action.help and action.dest != "help":
                missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}")
        return missing

    assert walk(build_parser(), "taskomatic") == []
