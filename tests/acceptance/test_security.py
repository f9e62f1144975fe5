"""Security review, as tests: hostile input stays data, files stay in their place,
secrets stay secret, and the daemon needs no privilege.

- SQL: every statement is parameterised. Hostile text (``'; DROP TABLE tasks; --``,
  quotes, backslashes) submitted through ``taskomatic submit`` and through plain
  SQL is stored verbatim, handled by the daemon and quoted verbatim in its
  messages, and every table is intact. A static check finds no SQL built from
  data with f-strings, ``%`` or ``str.format`` in the package or queries.sql.
- XML: a VM description that looks like markup (``</name><devices><disk>``,
  a DOCTYPE with an external entity, CDATA) stays the domain's name; the
  domain has no extra device and no entity was expanded.
- Files: create_volume / delete_volume with traversal or absolute names fail,
  and nothing outside the pool directory is created, changed or removed
  (checked on a real dir pool whose parent directory the node could write).
- Secrets: the database password is in no log line, not in any process's
  command line, and not in error messages; a config file holding it that
  others can read is warned about (tests/integration/test_cli.py,
  tests/unit/test_config.py).
- Network: the metrics endpoint binds 127.0.0.1 by default (here and in
  tests/acceptance/test_metrics.py for a running daemon's listening socket).
- Privilege: the packaged unit runs as user taskomatic; run as root, the
  daemon warns (it does not refuse: the demo and these tests run as root).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from psycopg2.extras import Json

from tests.acceptance import checks
from tests.helpers import REPO, Daemon, query, wait_for

PACKAGE = REPO / "taskomatic"
HOSTILE_SQL = "'; DROP TABLE tasks; --"
QUOTES = "Robert'); DROP TABLE vms;-- \\' \\\" \\\\ $$ $tag$ E'\\x00' %s %(x)s {0}"


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKOMATIC_", "PG"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "taskomatic", *args], capture_output=True, text=True,
                          env=env, cwd=str(REPO), timeout=timeout, check=False)


def _tables(dsn: str) -> set[str]:
    return {r["t"] for r in query(dsn, "SELECT tablename AS t FROM pg_tables WHERE schemaname = 'public'")}


@pytest.fixture
def prefix(dsn: str, libvirt_nodes: list[Any]) -> Iterator[str]:
    name = checks.unique_prefix(dsn)
    yield name
    checks.remove_domains([n.test_uri for n in libvirt_nodes], name)


# -- SQL ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_hostile_text_is_stored_verbatim_and_handled_as_data(dsn: str, hosts: list[int], daemon_factory: Any,
                                                            prefix: str) -> None:
    tables_before = _tables(dsn)
    vm, = checks.insert_vms(dsn, [f"{prefix} {HOSTILE_SQL} {QUOTES}"])

    # Through the command line: args, and submitted_by.
    args = {"host_id": HOSTILE_SQL, QUOTES: "\\'\"", "back\\slash": "a\\'b\\\\"}
    # The command line checks the args against the action first: refused, quoted as data, nothing queued.
    result = _cli("submit", "start_vm", "--vm", str(vm), "--args", json.dumps(args), "--by", QUOTES, "--dsn", dsn)
    assert result.returncode == 2, result.stderr
    assert "unknown argument" in result.stderr and QUOTES in result.stderr and "back\\slash" in result.stderr
    assert query(dsn, "SELECT count(*) AS n FROM tasks")[0]["n"] == 0
    # The same task inserted by another program reaches the daemon.
    by_cli = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by) "
                        "VALUES ('Vm', %s, 'start_vm', %s, %s) RETURNING id", (vm, Json(args), QUOTES))[0]["id"]
    # Through plain SQL, as another program would.
    by_sql = checks.insert_tasks(dsn, [("Vm", vm, "create_vm"), ("Vm", vm, "start_vm", {"host_id": HOSTILE_SQL}),
                                       ("Vm", vm, "start_vm")])

    stored = query(dsn, "SELECT args, submitted_by FROM tasks WHERE id = %s", (by_cli,))[0]
    assert stored["args"] == args and stored["submitted_by"] == QUOTES
    assert query(dsn, "SELECT args = %s::jsonb AS same FROM tasks WHERE id = %s", (Json(args), by_cli))[0]["same"]

    daemon = daemon_factory(shards=2)
    checks.wait_all_ended(dsn, daemon, timeout=120)

    rows = {r["id"]: r for r in query(dsn, "SELECT id, state, message, args, submitted_by FROM tasks")}
    assert set(rows) == {by_cli, *by_sql}, "a task vanished or appeared"
    # The daemon read the hostile args as data and quoted them in its messages.
    assert rows[by_cli]["state"] == "failed"
    assert "unknown argument" in rows[by_cli]["message"] and QUOTES in rows[by_cli]["message"]
    assert "back\\slash" in rows[by_cli]["message"]
    assert rows[by_sql[1]]["state"] == "failed"
    assert repr(HOSTILE_SQL) in rows[by_sql[1]]["message"], rows[by_sql[1]]["message"]
    assert [rows[i]["state"] for i in (by_sql[0], by_sql[2])] == ["finished", "finished"]
    # Stored verbatim, after the daemon too.
    assert rows[by_cli]["args"] == args and rows[by_cli]["submitted_by"] == QUOTES
    assert rows[by_sql[1]]["args"] == {"host_id": HOSTILE_SQL}
    # Nothing dropped, and the VM's name is the description, quotes and all.
    assert _tables(dsn) == tables_before
    vm_row = query(dsn, "SELECT v.description, v.uuid::text AS uuid, h.libvirt_uri FROM vms v "
                        "JOIN hosts h ON h.id = v.host_id WHERE v.id = %s", (vm,))[0]
    assert vm_row["description"] == f"{prefix} {HOSTILE_SQL} {QUOTES}"
    conn = libvirt.open(vm_row["libvirt_uri"])
    try:
        assert conn.lookupByUUIDString(vm_row["uuid"]).name() == vm_row["description"]
    finally:
        conn.close()
    # And the command line reads it back verbatim.
    listed = json.loads(_cli("tasks", "--json", "--dsn", dsn).stdout)
    assert {t["id"]: t["submitted_by"] for t in listed}[by_cli] == QUOTES


_SQL_WORDS = re.compile(r"\b(SELECT|INSERT INTO|UPDATE|DELETE FROM|CREATE|DROP|ALTER|LISTEN|NOTIFY|WHERE|VALUES)\b")


def _sql_built_from_data(tree: ast.AST) -> list[tuple[int, str]]:
    """Places where text that looks like SQL is formatted with anything but a module constant."""
    found: list[tuple[int, str]] = []

    def literal(node: ast.AST) -> str:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(literal(v) for v in node.values)
        return ""

    def constant_name(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id.isupper()

    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and _SQL_WORDS.search(literal(node)):
            for part in node.values:
                if isinstance(part, ast.FormattedValue) and not constant_name(part.value):
                    found.append((node.lineno, f"f-string formats {ast.unparse(part.value)} into SQL"))
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add)
              and _SQL_WORDS.search(literal(node.left) or literal(node.right))):
            other = node.right if literal(node.left) else node.left
            if not (isinstance(other, ast.Constant) or constant_name(other)):
                found.append((node.lineno, f"SQL text {'%' if isinstance(node.op, ast.Mod) else '+'} "
                                           f"{ast.unparse(other)}"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
              and _SQL_WORDS.search(literal(node.func.value))):
            found.append((node.lineno, "str.format on SQL text"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("execute", "executemany", "mogrify") and node.args
              and isinstance(node.args[0], ast.JoinedStr | ast.BinOp)
              and not _SQL_WORDS.search(literal(node.args[0]))):
            found.append((node.lineno, f"{node.func.attr} of a built string"))
    return found


def test_no_sql_is_built_from_data_in_the_package() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, what in _sql_built_from_data(ast.parse(path.read_text(), str(path))):
            problems.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert not problems, "\n".join(problems)


def test_the_static_check_finds_sql_built_from_data() -> None:
    """The check above is only worth something if it catches the usual ways."""
    bad = '''
def f(cur, name, table, vm_id):
    cur.execute(f"SELECT * FROM vms WHERE description = '{name}'")
    cur.execute("DELETE FROM tasks WHERE id = %s" % vm_id)
    cur.execute("UPDATE vms SET state = 'x' WHERE id = " + str(vm_id))
    cur.execute("SELECT * FROM {} WHERE id = 1".format(table))
    sql = f"INSERT INTO tasks (action) VALUES ('{name}')"
'''
    good = '''
CHANNEL = "taskomatic_new_tasks"
def f(cur, name, vm_id):
    cur.execute("SELECT * FROM vms WHERE description = %s", (name,))
    cur.execute(f"LISTEN {CHANNEL}")
    cur.execute("SELECT * FROM tasks WHERE id = %(id)s", {"id": vm_id})
    message = f"cannot start VM {vm_id}: {name}"
'''
    assert {line for line, _ in _sql_built_from_data(ast.parse(bad))} == {3, 4, 5, 6, 7}
    assert _sql_built_from_data(ast.parse(good)) == []


def test_queries_sql_only_binds_named_parameters() -> None:
    text = "\n".join(path.read_text() for path in sorted((PACKAGE / "db" / "sql").glob("*.sql")))
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    # Every % is a named psycopg2 placeholder %(name)s: no positional %s, no %% tricks, no str.format braces.
    assert re.findall(r"%(?!\(\w+\)s)", body) == []
    assert "{" not in body and "}" not in body
    # No dynamic SQL in the queries or in the migrations' functions.
    db = PACKAGE / "db"
    for path in [*sorted((db / "sql").glob("*.sql")), *sorted((db / "migrations").glob("*.sql"))]:
        sql = re.sub(r"EXECUTE\s+FUNCTION", "", path.read_text(), flags=re.IGNORECASE)
        assert not re.search(r"\bEXECUTE\b", sql, re.IGNORECASE), f"{path.name}: dynamic SQL"


# -- XML -----------------------------------------------------------------------------------------------

HOSTILE_XML = [
    "x</name><devices><disk type='file' device='disk'><source file='/etc/shadow'/>"
    "<target dev='vdz' bus='virtio'/></disk></devices><name>y",
    '<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>&xxe; &lt; &amp; &#x41;',
    "]]><![CDATA[ <?xml version='1.0'?> <!-- comment --> ]]>",
]


@pytest.mark.slow
def test_hostile_descriptions_stay_names(dsn: str, hosts: list[int], daemon_factory: Any, prefix: str) -> None:
    descriptions = [f"{prefix}-{i} {text}" for i, text in enumerate(HOSTILE_XML)]
    vms = checks.insert_vms(dsn, descriptions)
    checks.insert_tasks(dsn, [(kind, vm, action) for vm in vms
                              for kind, action in (("Vm", "create_vm"), ("Vm", "start_vm"))])
    daemon = daemon_factory(shards=2)
    checks.wait_all_ended(dsn, daemon, timeout=120)
    failed = query(dsn, "SELECT id, message FROM tasks WHERE state <> 'finished'")
    assert not failed, failed

    for vm, description in zip(vms, descriptions, strict=True):
        row = query(dsn, "SELECT v.uuid::text AS uuid, h.libvirt_uri FROM vms v JOIN hosts h ON h.id = v.host_id "
                         "WHERE v.id = %s", (vm,))[0]
        conn = libvirt.open(row["libvirt_uri"])
        try:
            xml = conn.lookupByUUIDString(row["uuid"]).XMLDesc(0)
        finally:
            conn.close()
        root = ET.fromstring(xml)
        # libvirt forbids only '/' in a name; the daemon maps it to '_'. Everything else is kept as text.
        assert [n.text for n in root.iter("name")] == [description.replace("/", "_")]
        assert root.find("devices/disk") is None, xml
        assert "root:" not in xml and "/etc/passwd" not in xml.replace("file:_", "")  # nothing expanded
        assert "<!DOCTYPE" not in xml and "<!ENTITY" not in xml


# -- files ---------------------------------------------------------------------------------------------

@pytest.fixture
def open_pool_dir(dsn: str, libvirt_nodes: list[Any]) -> Iterator[Path]:
    """A dir pool's directory inside a parent the node's (unprivileged) libvirtd may write."""
    prefix = checks.unique_prefix(dsn)
    base = Path(tempfile.mkdtemp(prefix=f"tkm-sec-{prefix}-", dir="/tmp"))
    base.chmod(0o777)  # writable by the node: an escape would succeed, so its absence means something
    pool = base / "pool"
    pool.mkdir()
    pool.chmod(0o777)
    try:
        yield pool
    finally:
        conn = libvirt.open(libvirt_nodes[0].qemu_uri)
        try:
            for handle in conn.listAllStoragePools(0):
                if handle.name().startswith(prefix):
                    if handle.isActive():
                        handle.destroy()
                    handle.undefine()
        finally:
            conn.close()
        shutil.rmtree(base, ignore_errors=True)


def _snapshot(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(directory)): (p.stat().st_mode, p.stat().st_mtime_ns,
                                            p.read_bytes() if p.is_file() else b"")
            for p in sorted(directory.rglob("*")) if directory / "pool" not in (p, p.parent)}


@pytest.mark.slow
def test_volume_names_cannot_leave_the_pool_directory(dsn: str, libvirt_nodes: list[Any], open_pool_dir: Path,
                                                      daemon_factory: Any) -> None:
    base = open_pool_dir.parent
    victim = base / "victim"
    victim.write_bytes(b"must stay as it is\n")
    victim.chmod(0o666)
    (base / "subdir").mkdir(mode=0o777)
    before = _snapshot(base)

    prefix = checks.unique_prefix(dsn)
    host = query(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                      "VALUES ('node0', %s, 'QEMU', 4, 4194304) RETURNING id", (libvirt_nodes[0].qemu_uri,))[0]["id"]
    pool = query(dsn, "INSERT INTO storage_pools (name, pool_type, target_path, host_id) "
                      "VALUES (%s, 'dir', %s, %s) RETURNING id", (f"{prefix}-pool", str(open_pool_dir), host))[0]["id"]
    fine = "ok; touch pwned $(id) `id` 'q' & <x> ü.img"  # no '/': a legal file name, shell text and all
    bad = ["../victim", "../subdir/new.img", "../../tmp/tkm-escape.img", str(victim), str(base / "new.img"),
           "..", ".", "..victim"]
    ids = {name: query(dsn, "INSERT INTO storage_volumes (storage_pool_id, name, size) VALUES (%s, %s, 1024) "
                            "RETURNING id", (pool, name))[0]["id"] for name in [fine, *bad]}
    tasks = [("StoragePool", pool, "refresh_pool")]
    tasks += [("StorageVolume", ids[name], "create_volume") for name in [*bad, fine]]
    tasks += [("StorageVolume", ids[name], "delete_volume") for name in bad]
    task_ids = checks.insert_tasks(dsn, tasks)
    daemon = daemon_factory(shards=2)
    checks.wait_all_ended(dsn, daemon, timeout=120)

    rows = {r["id"]: r for r in query(dsn, "SELECT id, action, task_target_id, state, message FROM tasks")}
    by_volume = {v: k for k, v in ids.items()}
    for task_id in task_ids:
        row = rows[task_id]
        name = by_volume.get(row["task_target_id"]) if row["action"] != "refresh_pool" else None
        if name in bad:
            assert row["state"] == "failed", row
            assert re.search(r"must not contain '/'|is not allowed|must not start with '\.\.'", row["message"]), row
        else:
            assert row["state"] == "finished", row

    # The legal name is a file of exactly that name in the pool directory; nothing else was made anywhere.
    assert sorted(p.name for p in open_pool_dir.iterdir()) == [fine]
    assert _snapshot(base) == before, "something outside the pool directory changed"
    assert not Path("/tmp/tkm-escape.img").exists() and not (base / "pwned").exists()
    states = {r["name"]: r["state"] for r in query(dsn, "SELECT name, state FROM storage_volumes")}
    assert states == {fine: "available", **{name: "pending_setup" for name in bad}}


# -- secrets -------------------------------------------------------------------------------------------

SECRET = "hunter2-secret-pw"


def _cmdlines(pid: int) -> list[str]:
    # By session (the daemon leads one): a forkserver child's parent is the fork server.
    out = subprocess.run(["ps", "-o", "pid=", "--sid", str(pid)], capture_output=True, text=True,
                         check=False).stdout
    lines = []
    for p in [pid, *(int(x) for x in out.split() if int(x) != pid)]:
        try:
            lines.append(Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except FileNotFoundError:
            pass
    return lines


@pytest.mark.slow
def test_the_database_password_is_never_logged_nor_shown(dsn: str, hosts: list[int], state_dir: Path,
                                                         prefix: str) -> None:
    conf = state_dir / "taskomatic.conf"
    conf.write_text(f"[database]\ndsn = {dsn} password={SECRET}\n\n[logging]\nlog_level = debug\n")
    conf.chmod(0o600)
    vm, = checks.insert_vms(dsn, [f"{prefix}-pw"])
    checks.insert_tasks(dsn, [("Vm", vm, "create_vm"), ("Vm", vm, "frobnicate_vm"), ("Vm", 99999, "start_vm")])
    log_path = state_dir / "daemon.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "taskomatic", "--config", str(conf), "--shards", "2",
             "--set", f"state_dir={state_dir}", "--set", "poll_interval=0.5"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_for(lambda: "ready: fetcher and" in log_path.read_text(), 60, what="the daemon to be ready")
        checks.wait_all_ended(dsn, None, timeout=60)
        titles = _cmdlines(daemon.pid)
        assert len(titles) >= 4, titles
        assert not [t for t in titles if SECRET in t], titles
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in log_path.read_text(), 30, what="the reload")
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(daemon.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        daemon.wait(10)
    text = log_path.read_text()
    assert "DEBUG" in text and "frobnicate_vm" in text  # the log did say things
    assert SECRET not in text
    messages = " ".join(r["message"] or "" for r in query(dsn, "SELECT message FROM tasks"))
    assert SECRET not in messages


@pytest.mark.slow
def test_a_password_on_the_command_line_leaves_the_process_titles(dsn: str, daemon_factory: Any) -> None:
    """Better kept in the file, but a --dsn with a password does not stay visible in ps either."""
    daemon = daemon_factory(shards=1, db=f"{dsn} password={SECRET}")
    titles = _cmdlines(daemon.pid)
    assert titles and all(t.startswith("taskomatic: ") or "multiprocess" in t for t in titles), titles
    assert not [t for t in titles if SECRET in t], titles
    assert SECRET not in daemon.log()


@pytest.mark.slow
def test_waiting_for_the_database_does_not_show_the_password(state_dir: Path) -> None:
    nowhere = state_dir / "no-socket-here"
    daemon = Daemon(f"host={nowhere} dbname=taskomatic password={SECRET}", state_dir, shards=1,
                    extra=["--set", "connect_timeout=1"])
    try:
        wait_for(lambda: "waiting for the database (attempt 2)" in daemon.log(), 60, what="two attempts")
    finally:
        daemon.stop()
    assert SECRET not in daemon.log()


# -- network and privilege -------------------------------------------------------------------------------

def test_metrics_listen_on_localhost_by_default() -> None:
    from taskomatic import config

    assert config.load(None, environ={}).metrics_address == "127.0.0.1"
    assert config.SETTINGS_BY_NAME["metrics_address"].default == "127.0.0.1"
    packaged = (REPO / "packaging" / "rpm" / "taskomatic.conf").read_text()
    assert re.search(r"^#\s*metrics_address = 127\.0\.0\.1$", packaged, re.MULTILINE), "packaged default changed"
    # VNC consoles too.
    assert config.load(None, environ={}).vnc_listen == "127.0.0.1"


def test_the_packaged_service_runs_unprivileged() -> None:
    unit = (REPO / "packaging" / "rpm" / "taskomatic.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines() if re.match(r"^[A-Z]\w*=", line))
    assert settings["User"] == "taskomatic" and settings["Group"] == "taskomatic"
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["CapabilityBoundingSet"] == "" and settings["AmbientCapabilities"] == ""
    sysusers = (REPO / "packaging" / "rpm" / "taskomatic.sysusers").read_text()
    assert re.search(r"^u taskomatic - ", sysusers, re.MULTILINE), "the user must be a system user (uid picked)"


@pytest.mark.slow
def test_running_as_root_is_warned_about_and_not_otherwise(pg_server: Any, daemon_factory: Any) -> None:
    from taskomatic.cli import ROOT_WARNING

    assert os.geteuid() == 0, "the suite runs as root (PostgreSQL and libvirtd are started as other users)"
    daemon = daemon_factory(shards=1)
    assert ROOT_WARNING in daemon.log()
    # As an unprivileged user (nobody) the same start has no warning: the daemon stops at once
    # here because the database named does not exist (a refusal waiting cannot cure).
    dsn = pg_server.dsn.replace("dbname=taskomatic", "dbname=no_such_database_here")
    script = ("import locale, os, sys\n"
              "from taskomatic import cli\n"
              "import taskomatic.runtime.supervisor, taskomatic.db.migrate, taskomatic.embedded.libvirtd\n"
              "import taskomatic.embedded.postgres, mmap, multiprocess.sharedctypes, multiprocess.synchronize\n"
              "cli.build_parser()\n"
              "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
              f"sys.exit(cli.main(['--dsn', {dsn!r}, '--shards', '1', '--set', 'state_dir=/tmp']))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/",
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60, check=False)
    assert result.returncode == 9, result.stderr  # EXIT_DATABASE_REFUSED
    assert "no_such_database_here" in result.stderr
    assert ROOT_WARNING not in result.stderr


# -- libvirt URIs that run programs ----------------------------------------------------------------------

@pytest.mark.parametrize(("uri", "words"), [
    ("test+ext:///default?command=/tmp/x", ("'ext' transport", "runs a local command")),
    ("qemu+ssh://node/system?command=/tmp/x", ("sets command",)),
    ("qemu+ssh://node/system?netcat=rm%20-rf%20~", ("sets netcat",)),
    ("QEMU+EXT:///system", ("'ext' transport",)),
])
def test_uris_that_name_a_program_are_refused(uri: str, words: tuple[str, ...]) -> None:
    from taskomatic.actions.libvirt_util import libvirt_uri_problem

    problem = libvirt_uri_problem(uri)
    assert problem is not None and all(w in problem for w in words), problem


@pytest.mark.parametrize("uri", ["qemu:///system", "qemu+tcp://node/system", "qemu+tls://node.example.org/system",
                                 "qemu+ssh://root@node/system?keyfile=/var/lib/taskomatic/.ssh/id",
                                 "test+unix:///default?socket=/tmp/n/libvirt-sock", "test:///default"])
def test_ordinary_uris_are_allowed(uri: str) -> None:
    from taskomatic.actions.libvirt_util import libvirt_uri_problem

    assert libvirt_uri_problem(uri) is None


@pytest.fixture
def marker(state_dir: Path) -> Iterator[tuple[Path, Path]]:
    """A program that leaves a file when run, in a place the daemon can reach."""
    ran = state_dir / "ext-ran"
    script = state_dir / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    script.chmod(0o755)
    yield script, ran


@pytest.mark.slow
def test_a_task_on_a_host_whose_uri_runs_a_program_fails_saying_so(dsn: str, daemon_factory: Any, prefix: str,
                                                                    marker: tuple[Path, Path]) -> None:
    script, _ = marker
    host = query(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                      "VALUES ('evil', %s, 'TEST', 8, 8388608) RETURNING id",
                 (f"test+ext:///default?command={script}",))[0]["id"]
    # Work that must reach the host whatever the host-status pass makes of it: a VM the row says runs
    # there, a volume in a pool the row says is active there.
    vm, = checks.insert_vms(dsn, [f"{prefix}-ext"])
    query(dsn, "UPDATE vms SET state = 'running', host_id = %s WHERE id = %s RETURNING id", (host, vm))
    pool = query(dsn, "INSERT INTO storage_pools (name, target_path, host_id, state) "
                      "VALUES (%s, '/tmp/p', %s, 'available') RETURNING id", (f"{prefix}-ext", host))[0]["id"]
    volume = query(dsn, "INSERT INTO storage_volumes (storage_pool_id, name, size) VALUES (%s, 'v.img', 1024) "
                        "RETURNING id", (pool,))[0]["id"]
    ids = checks.insert_tasks(dsn, [("Vm", vm, "suspend_vm"), ("StorageVolume", volume, "create_volume")])
    daemon = daemon_factory(shards=1)
    checks.wait_all_ended(dsn, daemon, timeout=60)
    rows = query(dsn, "SELECT id, state, message FROM tasks WHERE id = ANY(%s) ORDER BY id", (ids,))
    assert len(rows) == 2
    for row in rows:
        assert row["state"] == "failed", row
        assert f"host {host} (evil): libvirt_uri" in row["message"] and "'ext' transport" in row["message"], row


@pytest.mark.slow
def test_no_program_named_by_a_host_uri_is_ever_run(dsn: str, daemon_factory: Any, marker: tuple[Path, Path]
                                                   ) -> None:
    script, ran = marker
    host = query(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                      "VALUES ('evil', %s, 'TEST', 8, 8388608) RETURNING id",
                 (f"test+ext:///default?command={script}",))[0]["id"]
    daemon_factory(shards=1)
    # The host-status pass at start looks at every host: it marks this one unavailable either way.
    wait_for(lambda: query(dsn, "SELECT state FROM hosts WHERE id = %s", (host,))[0]["state"] == "unavailable",
             60, what="the host-status pass to judge the host")
    assert not ran.exists(), f"{script} was run by the daemon"
