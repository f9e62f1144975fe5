"""The real ``taskomatic`` command line, run as a subprocess against a real PostgreSQL.

Exit codes (taskomatic/cli.py): 0 ok, 1 failed, 2 usage, 3 bad configuration,
4 database unreachable or schema out of date, 5 another standalone instance.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from taskomatic import __version__
from tests.helpers import REPO, Daemon, query

PYTHON = sys.executable


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # Nothing from the caller's environment may change what the CLI does.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKOMATIC_", "PG"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "taskomatic", *args], capture_output=True, text=True,
                          env=_env(env), cwd=str(REPO), timeout=timeout, check=False)


Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(dsn: str) -> Cli:
    """cli(args...) on this test's migrated database."""
    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--dsn", dsn, timeout=timeout)

    return run


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def submit(cli: Cli, *args: str) -> int:
    out = ok(cli("submit", *args)).strip()
    assert re.fullmatch(r"\d+", out), f"submit printed {out!r}, not a task id"
    return int(out)


def assert_clean_failure(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The expected exit code, a message on stderr, no traceback."""
    assert result.returncode == code, (
        f"exit {result.returncode}, expected {code}\nstdout: {result.stdout}\nstderr: {result.stderr}")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip(), "no message on stderr"
    return result.stderr


# -- version and help ---------------------------------------------------------------------------

def test_version() -> None:
    out = ok(run_cli("--version"))
    assert out.strip() == f"taskomatic {__version__}"


HELP_COMMANDS = [[], ["run"], ["db"], ["db", "upgrade"], ["submit"], ["tasks"], ["cancel"], ["demo"]]


def test_help_for_every_subcommand() -> None:
    # All at once: each is an independent process.
    procs = [(cmd, subprocess.Popen([PYTHON, "-m", "taskomatic", *cmd, "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=_env(), cwd=str(REPO)))
             for cmd in HELP_COMMANDS]
    for cmd, proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"{cmd} --help exited {proc.returncode}: {err}"
        assert out.startswith("usage: taskomatic"), f"{cmd} --help: {out[:200]}"
        assert "Traceback" not in err
    # The top-level help documents the exit codes and lists the subcommands.
    top = subprocess.run([PYTHON, "-m", "taskomatic", "--help"], capture_output=True, text=True, env=_env(),
                         cwd=str(REPO), check=True).stdout
    for word in ("db", "submit", "tasks", "cancel", "exit codes"):
        assert word in top


def test_no_subcommand_under_db_is_a_usage_error() -> None:
    result = run_cli("db")
    assert result.returncode == 2
    assert "usage:" in result.stderr


# -- db upgrade -----------------------------------------------------------------------------------

def test_db_upgrade_on_an_empty_database_then_again(empty_dsn: str) -> None:
    first = ok(run_cli("db", "upgrade", "--dsn", empty_dsn))
    assert "applied: 0001_initial" in first
    rows = query(empty_dsn, "SELECT version FROM schema_migrations ORDER BY version")
    assert rows and rows[0]["version"] == 1
    assert query(empty_dsn, "SELECT to_regclass('tasks') IS NOT NULL AS present")[0]["present"]

    second = ok(run_cli("db", "upgrade", "--dsn", empty_dsn))
    assert "up to date" in second
    assert "applied" not in second


def test_db_upgrade_dry_run_lists_without_applying(empty_dsn: str) -> None:
    out = ok(run_cli("db", "upgrade", "--dry-run", "--dsn", empty_dsn))
    assert "pending: 0001_initial" in out
    present = query(empty_dsn, "SELECT to_regclass('tasks') IS NOT NULL AS t, "
                               "to_regclass('schema_migrations') IS NOT NULL AS m")[0]
    assert present == {"t": False, "m": False}, "a dry run changed the database"

    ok(run_cli("db", "upgrade", "--dsn", empty_dsn))
    assert "up to date" in ok(run_cli("db", "upgrade", "--dry-run", "--dsn", empty_dsn))


def test_dsn_before_the_subcommand_and_from_the_environment(empty_dsn: str) -> None:
    assert "applied: 0001_initial" in ok(run_cli("--dsn", empty_dsn, "db", "upgrade"))
    assert "up to date" in ok(run_cli("db", "upgrade", env={"TASKOMATIC_DSN": empty_dsn}))


def test_dsn_from_the_config_file(empty_dsn: str, tmp_path: Path) -> None:
    conf = tmp_path / "taskomatic.conf"
    conf.write_text(f"[database]\ndsn = {empty_dsn}\n")
    assert "applied: 0001_initial" in ok(run_cli("db", "upgrade", "--config", str(conf)))


# -- submit ---------------------------------------------------------------------------------------

def test_submit_prints_the_id_and_inserts_the_row(dsn: str, cli: Cli) -> None:
    task_id = submit(cli, "start_vm", "--vm", "1")
    rows = query(dsn, "SELECT * FROM tasks WHERE id = %s", (task_id,))
    assert len(rows) == 1
    task = rows[0]
    assert (task["task_target_type"], task["task_target_id"], task["action"]) == ("Vm", 1, "start_vm")
    assert task["args"] == {}
    assert task["state"] == "queued"
    assert task["submitted_by"]


def test_submit_with_args_and_other_targets(dsn: str, cli: Cli) -> None:
    migrate_id = submit(cli, "migrate_vm", "--vm", "4", "--args", '{"host_id": 3}', "--by", "alice")
    pool_id = submit(cli, "refresh_pool", "--pool", "2")
    host_id = submit(cli, "clear_vms", "--host", "5")
    assert migrate_id < pool_id < host_id
    rows = {r["id"]: r for r in query(dsn, "SELECT id, task_target_type, task_target_id, args, submitted_by "
                                           "FROM tasks")}
    assert rows[migrate_id]["args"] == {"host_id": 3}
    assert rows[migrate_id]["submitted_by"] == "alice"
    assert (rows[pool_id]["task_target_type"], rows[pool_id]["task_target_id"]) == ("StoragePool", 2)
    assert (rows[host_id]["task_target_type"], rows[host_id]["task_target_id"]) == ("Host", 5)


@pytest.mark.parametrize(("args", "phrase"), [
    ("[1]", "JSON object"),
    ('"text"', "JSON object"),
    ("{not json", "not valid JSON"),
])
def test_submit_rejects_bad_args(dsn: str, cli: Cli, args: str, phrase: str) -> None:
    err = assert_clean_failure(cli("submit", "start_vm", "--vm", "1", "--args", args), 2)
    assert phrase in err
    assert query(dsn, "SELECT count(*) AS n FROM tasks")[0]["n"] == 0


def test_submit_needs_exactly_one_target(dsn: str, cli: Cli) -> None:
    assert cli("submit", "start_vm").returncode == 2
    assert cli("submit", "start_vm", "--vm", "1", "--pool", "2").returncode == 2
    assert query(dsn, "SELECT count(*) AS n FROM tasks")[0]["n"] == 0


# -- tasks ----------------------------------------------------------------------------------------

def test_tasks_lists_in_a_table(cli: Cli) -> None:
    first = submit(cli, "start_vm", "--vm", "1")
    second = submit(cli, "refresh_pool", "--pool", "9")
    lines = ok(cli("tasks")).splitlines()
    assert lines[0].split() == ["ID", "STATE", "ACTION", "TARGET", "STARTED", "ENDED", "MESSAGE"]
    body = [line.split() for line in lines[1:]]
    # Newest first.
    assert [cells[0] for cells in body] == [str(second), str(first)]
    assert body[1][:4] == [str(first), "queued", "start_vm", "Vm:1"]
    assert body[0][:4] == [str(second), "queued", "refresh_pool", "StoragePool:9"]


def test_tasks_json_gives_one_array_with_iso_times(cli: Cli) -> None:
    ids = [submit(cli, "start_vm", "--vm", "1"), submit(cli, "migrate_vm", "--vm", "2", "--args", '{"host_id": 1}')]
    objects = json.loads(ok(cli("tasks", "--json")))
    assert isinstance(objects, list)
    assert all(o["created_at"].endswith("+00:00") and "T" in o["created_at"] for o in objects)
    assert all(isinstance(o["attempts"], int) for o in objects)
    assert [o["id"] for o in objects] == sorted(ids, reverse=True)
    by_id = {o["id"]: o for o in objects}
    assert by_id[ids[0]]["args"] == {} and by_id[ids[0]]["state"] == "queued"
    assert by_id[ids[1]]["args"] == {"host_id": 1}
    assert by_id[ids[0]]["action"] == "start_vm" and by_id[ids[0]]["task_target_type"] == "Vm"


def test_tasks_filters(cli: Cli) -> None:
    wanted = submit(cli, "start_vm", "--vm", "1")
    other_vm = submit(cli, "start_vm", "--vm", "2")
    canceled = submit(cli, "shutdown_vm", "--vm", "1")
    pool = submit(cli, "refresh_pool", "--pool", "1")  # same target id, other type
    ok(cli("cancel", str(canceled)))

    def ids(*filters: str) -> list[int]:
        return [row["id"] for row in json.loads(ok(cli("tasks", "--json", *filters)))]

    assert ids("--state", "queued", "--vm", "1") == [wanted]
    assert ids("--vm", "1") == [canceled, wanted]
    assert ids("--state", "canceled") == [canceled]
    assert ids("--pool", "1") == [pool]
    assert ids("--action", "start_vm") == [other_vm, wanted]
    assert ids("--limit", "2") == [pool, canceled]
    assert ids("--state", "running") == []


# -- cancel ---------------------------------------------------------------------------------------

def test_cancel_a_queued_task_then_again(dsn: str, cli: Cli) -> None:
    task_id = submit(cli, "start_vm", "--vm", "1")
    out = ok(cli("cancel", str(task_id)))
    assert str(task_id) in out and "canceled" in out
    row = query(dsn, "SELECT state, time_ended FROM tasks WHERE id = %s", (task_id,))[0]
    assert row["state"] == "canceled" and row["time_ended"] is not None

    err = assert_clean_failure(cli("cancel", str(task_id)), 1)
    assert "canceled" in err and str(task_id) in err
    assert query(dsn, "SELECT state FROM tasks WHERE id = %s", (task_id,))[0]["state"] == "canceled"


def test_cancel_a_running_task_is_refused(dsn: str, cli: Cli) -> None:
    task_id = submit(cli, "start_vm", "--vm", "1")
    holder = query(dsn, "INSERT INTO instances (hostname, pid, version, mode, shards) "
                        "VALUES ('elsewhere', 1, 'test', 'standalone', 1) RETURNING id")[0]["id"]
    query(dsn, "UPDATE tasks SET state = 'running', time_started = clock_timestamp(), claimed_by = %s "
               "WHERE id = %s", (holder, task_id))
    err = assert_clean_failure(cli("cancel", str(task_id)), 1)
    assert "running" in err
    assert query(dsn, "SELECT state FROM tasks WHERE id = %s", (task_id,))[0]["state"] == "running"


def test_cancel_an_unknown_task(cli: Cli) -> None:
    err = assert_clean_failure(cli("cancel", "999999"), 1)
    assert "no task" in err and "999999" in err


# -- configuration errors ------------------------------------------------------------------------

def test_bad_value_in_the_config_file_names_file_and_line(dsn: str, tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("[daemon]\nshards = many\n")
    err = assert_clean_failure(run_cli("tasks", "--config", str(conf), "--dsn", dsn), 3)
    assert f"{conf}:2" in err, err
    assert "shards" in err


def test_unknown_setting_names_its_line(dsn: str, tmp_path: Path) -> None:
    conf = tmp_path / "unknown.conf"
    conf.write_text("# taskomatic\n[daemon]\nshards = 2\n\nshardz = 3\n")
    err = assert_clean_failure(run_cli("tasks", "--config", str(conf), "--dsn", dsn), 3)
    assert f"{conf}:5" in err, err
    assert "shardz" in err


def test_missing_config_file_and_bad_set(tmp_path: Path) -> None:
    missing = tmp_path / "nope.conf"
    err = assert_clean_failure(run_cli("tasks", "--config", str(missing)), 3)
    assert str(missing) in err
    err = assert_clean_failure(run_cli("tasks", "--set", "connect_timeout=soon"), 3)
    assert "connect_timeout" in err


def test_unreachable_database_exits_4_quickly(tmp_path: Path) -> None:
    nowhere = tmp_path / "no-such-socket-dir"
    started = time.monotonic()
    result = run_cli("tasks", "--dsn", f"host={nowhere} dbname=taskomatic user=taskomatic",
                     "--set", "connect_timeout=2", timeout=30)
    elapsed = time.monotonic() - started
    err = assert_clean_failure(result, 4)
    assert "cannot connect to the database" in err
    assert elapsed < 15, f"took {elapsed:.1f}s to give up"


@pytest.mark.parametrize("command", [["tasks"], ["submit", "start_vm", "--vm", "1"], ["cancel", "1"]])
def test_queue_commands_on_an_unmigrated_database_exit_8(empty_dsn: str, command: list[str]) -> None:
    err = assert_clean_failure(run_cli(*command, "--dsn", empty_dsn), 8)
    assert "db upgrade" in err


def test_submit_args_that_jsonb_rejects_is_a_usage_error(dsn: str, cli: Cli) -> None:
    assert_clean_failure(cli("submit", "start_vm", "--vm", "1", "--args", '{"a": "\\u0000"}'), 2)
    assert query(dsn, "SELECT count(*) AS n FROM tasks")[0]["n"] == 0


def test_tasks_negative_limit_is_a_usage_error(cli: Cli) -> None:
    assert_clean_failure(cli("tasks", "--limit", "-1"), 2)


# -- the standalone guard --------------------------------------------------------------------------

@pytest.mark.slow
def test_second_standalone_daemon_on_the_same_database_exits_5(
        dsn: str, daemon_factory: Callable[..., Daemon], state_dir: Path) -> None:
    first = daemon_factory(shards=1)
    second = Daemon(dsn, state_dir / "second", shards=1)
    try:
        code = second.wait(30)
        log = second.log()
        assert code == 5, f"second daemon exited {code}:\n{log[-3000:]}"
        assert "another taskomatic instance holds this database" in log
        assert "Traceback" not in log
        # The first one is unaffected.
        assert first.process.poll() is None, "the first daemon died"
        rows = query(dsn, "SELECT count(*) AS n FROM instances WHERE stopped_at IS NULL")
        assert rows[0]["n"] == 1, "the refused daemon registered an instance"
    finally:
        second.stop()


def test_a_world_readable_password_is_warned_about_and_not_shown(dsn: str, tmp_path: Path) -> None:
    conf = tmp_path / "taskomatic.conf"
    conf.write_text(f"[database]\ndsn = {dsn} password=hunter2-not-used\n")
    conf.chmod(0o644)
    result = run_cli("--config", str(conf), "status")
    assert result.returncode == 3, result.stderr  # no live instance
    assert "any local user can read it" in result.stderr and "chmod o-r" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    conf.chmod(0o600)
    assert "any local user can read it" not in run_cli("--config", str(conf), "status").stderr


# -- bad configuration: every case exits 3 with the file and line, the daemon as well as a command ------

BAD_FILES = {
    # label: (file text, line the message must name, words it must hold)
    "unknown key": ("[daemon]\nshards = 2\nshardz = 3\n", 3, ("unknown setting 'shardz'", "did you mean 'shards'")),
    "unknown section": ("[daemon]\nshards = 2\n\n[deamon]\nmode = multihost\n", 4, ("unknown section [deamon]",)),
    "wrong type": ("[libvirt]\nshutdown_timeout = soon\n", 2, ("bad value for libvirt.shutdown_timeout",)),
    "wrong choice": ("[daemon]\nmode = cluster\n", 2, ("mode", "must be one of standalone, multihost")),
    "bad bool": ("[libvirt]\nshutdown_poweroff_fallback = maybe\n", 2, ("expected a boolean",)),
    "no section": ("shards = 2\n", 1, ("[section] header",)),
    "bad dsn": ("[database]\n\ndsn = host=/run dbname=ovirt oops\n", 3,
                ("bad value for database.dsn", "not a valid libpq connection string", '"oops"')),
}


@pytest.mark.parametrize("command", [[], ["status"]], ids=["daemon", "status"])
@pytest.mark.parametrize("label", sorted(BAD_FILES))
def test_a_bad_config_file_exits_3_naming_file_and_line(tmp_path: Path, label: str, command: list[str]) -> None:
    text, line, words = BAD_FILES[label]
    conf = tmp_path / "taskomatic.conf"
    conf.write_text(text)
    # No dsn anywhere but the file: nothing may be started before the file is judged.
    err = assert_clean_failure(run_cli("--config", str(conf), "--set", f"state_dir={tmp_path}", *command,
                                       timeout=30), 3)
    assert f"{conf}:{line}: " in err, err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "postgres").exists(), "a private PostgreSQL was started for a bad configuration"


def test_a_config_file_that_is_not_text_exits_3(tmp_path: Path) -> None:
    conf = tmp_path / "latin1.conf"
    conf.write_bytes(b"[daemon]\nstate_dir = /var/lib/t\xe9\n")
    err = assert_clean_failure(run_cli("--config", str(conf), "status"), 3)
    assert str(conf) in err and "cannot read config file" in err
    err = assert_clean_failure(run_cli("--config", str(tmp_path), "status"), 3)
    assert str(tmp_path) in err


def test_an_unreadable_config_file_exits_3(tmp_path: Path) -> None:
    """Run as an unprivileged user (root reads any file): the CLI drops to nobody before reading it."""
    conf = tmp_path / "taskomatic.conf"
    conf.write_text("[daemon]\nshards = 2\n")
    conf.chmod(0o600)
    tmp_path.chmod(0o755)
    # The interpreter, the package and argparse's lazy imports are loaded as root first.
    script = ("import locale, os, sys\n"
              "from taskomatic import cli\n"
              "cli.build_parser()\n"
              "if os.geteuid() == 0:\n"
              "    os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
              f"sys.exit(cli.main(['--config', {str(conf)!r}, 'status']))\n")
    result = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, env=_env(), cwd=str(REPO),
                            timeout=60, check=False)
    err = assert_clean_failure(result, 3)
    assert f"{conf}: config file is not readable (permission denied)" in err, err


def test_a_bad_dsn_on_the_command_line_or_in_the_environment_exits_3() -> None:
    err = assert_clean_failure(run_cli("--dsn", "host=/run dbname=x oops", "status"), 3)
    assert "bad --dsn: not a valid libpq connection string" in err and '"oops"' in err
    err = assert_clean_failure(run_cli("status", env={"TASKOMATIC_DSN": "dbname='unterminated"}), 3)
    assert "TASKOMATIC_DSN" in err and "unterminated quoted string" in err
    # The daemon too, before it starts anything.
    err = assert_clean_failure(run_cli(env={"TASKOMATIC_DSN": "postgresql://u@h/db?nosuchoption=1"}), 3)
    assert "TASKOMATIC_DSN" in err and "nosuchoption" in err


def test_a_bad_dsn_with_a_password_is_not_shown(tmp_path: Path) -> None:
    conf = tmp_path / "taskomatic.conf"
    conf.write_text("[database]\ndsn = host=/run password=hunter2 secret-part\n")
    conf.chmod(0o600)
    result = run_cli("--config", str(conf), "status")
    err = assert_clean_failure(result, 3)
    assert f"{conf}:2" in err
    assert "hunter2" not in result.stdout + err and "secret-part" not in result.stdout + err


@pytest.mark.slow
def test_a_wrong_password_exits_4_without_showing_it(dsn: str) -> None:
    # The test server trusts local users, so a wrong user stands in for a refused login.
    result = run_cli("status", "--dsn", dsn + " user=no_such_role password=hunter2", timeout=30)
    err = assert_clean_failure(result, 4)
    assert "no_such_role" in err and "hunter2" not in err + result.stdout
