"""SIGHUP reloads the configuration file; a bad file is refused and the daemon goes on."""

from __future__ import annotations

import signal

import pytest

from tests.helpers import query, wait_for

# Slow (not in the inner loop): a daemon reloaded with SIGHUP.
pytestmark = pytest.mark.slow


def test_sighup_reloads_and_refuses_a_bad_file(dsn, state_dir, daemon_factory):
    conf = state_dir / "taskomatic.conf"
    conf.write_text("[logging]\nlog_level = info\n")
    daemon = daemon_factory(shards=1, extra=["--config", str(conf)])

    conf.write_text("[logging]\nlog_level = debug\n")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: configuration reloaded" in daemon.log(), what="the reload")
    # Debug logging is now on in the children too: a claim is logged at debug level.
    query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) VALUES ('Vm', 424242, 'start_vm')")
    wait_for(lambda: "DEBUG" in daemon.log(), what="debug lines after the reload")

    conf.write_text("[logging]\nlog_level = loud\n")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "configuration not reloaded" in daemon.log(), what="the refusal")
    assert f"{conf}:2" in daemon.log(), "the refusal names the file and line"
    assert daemon.process.poll() is None, "a bad file must not stop the daemon"

    # Still working: a new task is taken and ends (it fails: the VM does not exist).
    query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) VALUES ('Vm', 434343, 'start_vm')")
    wait_for(lambda: query(dsn, "SELECT state FROM tasks WHERE task_target_id = 434343")[0]["state"] == "failed",
             what="the task after the bad reload")


def test_sighup_keeps_command_line_overrides_logs_changes_and_warns_about_restart_only(
        dsn, state_dir, daemon_factory):
    conf = state_dir / "taskomatic.conf"
    conf.write_text("[logging]\nlog_level = info\n[daemon]\nretry_limit = 8\n")
    daemon = daemon_factory(shards=1, extra=["--config", str(conf), "--log-level", "debug",
                                             "--set", "daemon.reconcile_interval=7"])
    conf.write_text("[logging]\nlog_level = info\n[daemon]\nretry_limit = 3\nreconcile_interval = 30\n"
                    "[metrics]\nmetrics_address = 127.0.0.2\n")
    before = len(daemon.log())
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: configuration reloaded" in daemon.log()[before:], what="the reload")
    after = daemon.log()[before:]
    assert "reload: retry_limit changed from 8 to 3" in after, after
    warning = [line for line in after.splitlines() if "metrics_address" in line]
    assert len(warning) == 1 and "WARNING" in warning[0] and "only a restart applies" in warning[0], after
    # The command line still wins: neither --log-level nor --set was dropped.
    assert "log_level changed" not in after and "reconcile_interval changed" not in after, after
    mark = len(daemon.log())
    query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) VALUES ('Vm', 454545, 'start_vm')")
    wait_for(lambda: "DEBUG" in daemon.log()[mark:], what="debug lines after the reload (--log-level kept)")
