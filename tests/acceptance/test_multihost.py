"""Multihost mode: several real instances share one PostgreSQL and the libvirt test nodes.

Each instance is a real daemon (its own process group, log and state dir),
started with ``--mode multihost`` and a short lease (3 s, renewed every second)
so that takeovers happen within seconds. The tests judge the instances only by
what they leave in the database (tasks, partition_leases, instances), on the nodes,
and in their logs:

- (a) three instances share 3,000 tasks over 300 VMs: each ends once, per-VM
  order holds across instances, and every instance did real work;
- (b) kill -9 of a whole instance: its partitions move to the others once its lease
  ran out; what it left running is reconciled; nothing lost or duplicated;
- (c) SIGSTOP of a whole instance past its lease: the others take its partitions
  over; resumed, it records nothing for them and rejoins under a new id;
- (d) a database restart mid-run, and one instance cut off from the database
  (tests/dbproxy.py) for longer than its lease: everyone recovers, fencing holds.

Who ended a task: ``tasks.claimed_by`` names the instance that recorded the
outcome (record_outcome and fail_unstartable require ``claimed_by`` to be the
writer and leave it as it is; takeovers only re-claim queued and running
tasks). Each test also checks this against the instances' own logs ("task N
(...) finished" lines carry the instance id), so the assumption is verified,
not trusted. (A shard logs a performed task's end before the outcome is
committed with its next transaction, so an instance killed, paused or cut off
may have logged a task that another instance then settled.)

No sleeps: every wait is a ``wait_for`` on the database, a log or a process,
with a deadline. To look at a failure: ``TKM_KEEP_LOGS=DIR`` copies every
instance's log to DIR/<test>/, ``TKM_LOG_LEVEL=debug`` makes them verbose.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from tests.acceptance import checks
from tests.dbproxy import PgProxy
from tests.helpers import Daemon, execute, query, wait_for

# Slow (not in the inner loop): several instances, lease expiries, database restarts.
pytestmark = pytest.mark.slow

LEASE_SECONDS = 3
RENEW_INTERVAL = 1
# Debug level: a finished task's line (which instance ended it) is a debug line.
MULTIHOST = ["--mode", "multihost",
             "--set", f"multihost.lease_seconds={LEASE_SECONDS}",
             "--set", f"multihost.lease_renew_interval={RENEW_INTERVAL}",
             "--log-level", os.environ.get("TKM_LOG_LEVEL", "debug")]
SHARDS = 2  # per instance: 3 instances x 2 shards on a 2-core machine
INSTANCES = 3

_ENDED_LINE = re.compile(r"\[instance (\d+) shard \d+\] \S+: task (\d+) \([^)]*\) (finished|failed)\b")
_RECONCILED_LINE = re.compile(r"\[instance (\d+) shard \d+\] \S+: task (\d+) \([^)]*\) reconciled: ")


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def prefix(dsn: str, libvirt_nodes: list[Any]) -> Iterator[str]:
    name = checks.unique_prefix(dsn)
    yield name
    checks.remove_domains([n.test_uri for n in libvirt_nodes], name)


@pytest.fixture
def frozen() -> Iterator[set[int]]:
    """Process groups a test SIGSTOPped; thawed at the end whatever happened (before the
    daemons are stopped: this fixture is torn down before daemon_factory)."""
    groups: set[int] = set()
    yield groups
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGCONT)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture
def db_proxy(dsn: str) -> Iterator[PgProxy]:
    """A TCP proxy in front of this test's database (tests/dbproxy.py); always closed."""
    proxy = PgProxy(dsn)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def private_pg(libvirt_nodes: list[Any]) -> Iterator[tuple[Any, str]]:
    """A PostgreSQL server of this test alone, free to be restarted: (server, dsn).

    The session server is not restarted: conftest's ``dsn`` fixture keeps an admin
    connection open across the test to drop the database afterwards, and a restart
    would break that teardown (and every other test's assumptions). The server is
    stopped and its directory removed at the end, also when the test fails.
    """
    from taskomatic.db import migrate
    from taskomatic.embedded.postgres import EmbeddedPostgres

    base = Path(tempfile.mkdtemp(prefix="tkm-pg-mh-", dir="/tmp"))
    base.chmod(0o755)
    server = EmbeddedPostgres(base)
    try:
        server.start()
        name = f"t_{uuid.uuid4().hex[:12]}"
        admin = psycopg2.connect(server.dsn.replace("dbname=taskomatic", "dbname=postgres"))
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        admin.close()
        dsn = server.dsn.replace("dbname=taskomatic", f"dbname={name}")
        conn = psycopg2.connect(dsn)
        migrate.upgrade(conn)
        conn.close()
        for i, node in enumerate(libvirt_nodes):
            execute(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                         "VALUES (%s, %s, 'TEST', 4096, 268435456)", (f"node{i}", node.test_uri))
        yield server, dsn
    finally:
        checks.remove_domains([n.test_uri for n in libvirt_nodes], f"{base.name}-")
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def keep_logs(request: pytest.FixtureRequest, state_dir: Path) -> Iterator[list[Daemon]]:
    """With TKM_KEEP_LOGS=DIR, every instance log of a test is copied to DIR/<test>/ at the end
    (autouse and on state_dir: torn down after the daemons stopped, before their logs go)."""
    daemons: list[Daemon] = []
    yield daemons
    target = os.environ.get("TKM_KEEP_LOGS")
    if target:
        where = Path(target) / request.node.name
        where.mkdir(parents=True, exist_ok=True)
        for n, daemon in enumerate(daemons):
            with contextlib.suppress(OSError):
                shutil.copy(daemon.log_path, where / f"instance{n}-pid{daemon.pid}.log")


# -- instances ---------------------------------------------------------------------------------
def start_instances(daemon_factory: Any, keep_logs: list[Daemon], count: int = INSTANCES,
                    shards: int = SHARDS, dbs: list[str] | None = None) -> list[Daemon]:
    """``count`` multihost instances, started together; each is ready when this returns."""
    daemons = [daemon_factory(shards=shards, extra=MULTIHOST, wait_ready=False,
                              db=None if dbs is None else dbs[i]) for i in range(count)]
    keep_logs.extend(daemons)
    for daemon in daemons:
        daemon.wait_ready(90)
    return daemons


def group_pids(daemon: Daemon) -> set[int]:
    return {daemon.pid, *checks.live_group_members(daemon.pid)}


def instance_ids(dsn: str, daemon: Daemon) -> list[int]:
    """Every instances row this daemon registered (any of its processes), oldest first."""
    rows = query(dsn, "SELECT id FROM instances WHERE pid = ANY(%s) ORDER BY id", (list(group_pids(daemon)),))
    return [r["id"] for r in rows]


def current_instance(dsn: str, daemon: Daemon) -> int:
    ids = wait_for(lambda: instance_ids(dsn, daemon), 30, 0.05, f"daemon {daemon.pid} to register")
    return ids[-1]


def assert_alive(daemons: list[Daemon]) -> None:
    for daemon in daemons:
        if daemon.process.poll() is not None:
            raise AssertionError(f"instance {daemon.pid} exited with {daemon.process.returncode}:\n"
                                 f"{daemon.log()[-4000:]}")


def wait_all_ended(dsn: str, daemons: list[Daemon], timeout: float = 120.0) -> None:
    """No task queued or running; fails early (with the logs) if an instance died."""

    def done() -> bool:
        assert_alive(daemons)
        return checks.open_tasks(dsn) == 0

    try:
        wait_for(done, timeout, 0.1, "every task to end")
    except AssertionError as exc:
        if "timed out" not in str(exc):
            raise
        stuck = query(dsn, "SELECT id, action, key_id, state, claimed_by, attempts FROM tasks "
                           "WHERE state IN ('queued', 'running') ORDER BY id LIMIT 10")
        claims = partition_counts(dsn)
        instances = query(dsn, "SELECT id, pid, stopped_at, lease_expires_at, clock_timestamp() AS now "
                               "FROM instances ORDER BY id")
        logs = "\n".join(f"--- instance {d.pid}:\n{d.log()[-2500:]}" for d in daemons)
        raise AssertionError(f"{exc}; tasks: {checks.counts(dsn)}; stuck: {stuck}; claims: {claims}; "
                             f"instances: {instances}; sessions: {stuck_sessions(dsn)}\n{logs}") from None


def group_signal(daemon: Daemon, signum: int) -> None:
    """Signal every process of the instance (its own process group, made by Daemon)."""
    os.killpg(daemon.pid, signum)


# -- workloads ---------------------------------------------------------------------------------
def roomy_hosts(dsn: str) -> None:
    """Room for every VM running at once (the fixture's 64 cpus per host fit 128 VMs)."""
    execute(dsn, "UPDATE hosts SET num_cpus = 4096")


def fleet(dsn: str, prefix: str, vms: int, per_vm: int, daemons: list[Daemon]) -> dict[int, list[str]]:
    """VMs with a lifecycle script each; every create_vm run to the end first (alone: an
    interruption landing on a create_vm is a separate matter, see test_lifecycle_signals)."""
    scripts = checks.vm_workload(dsn, prefix, vms=vms, per_vm=per_vm, seed=prefix, rounds=range(0, 1))
    wait_all_ended(dsn, daemons, timeout=120)
    assert checks.counts(dsn) == {"finished": vms}
    return scripts


def more_work(dsn: str, prefix: str, vms: int, per_vm: int) -> dict[int, list[str]]:
    """New VMs with their whole scripts, queued now (work submitted after a recovery)."""
    return checks.vm_workload(dsn, f"{prefix}-later", vms=vms, per_vm=per_vm, seed=f"{prefix}-later")


def finished_count(dsn: str) -> int:
    return checks.counts(dsn).get("finished", 0)


# -- what the database and the logs say ----------------------------------------------------------
def ended_by(dsn: str) -> dict[int, int]:
    """instance id -> how many tasks it ended (claimed_by of ended tasks)."""
    rows = query(dsn, "SELECT claimed_by, count(*) AS n FROM tasks WHERE state IN ('finished', 'failed') "
                      "GROUP BY claimed_by")
    return {r["claimed_by"]: int(r["n"]) for r in rows}


def ended_ids(dsn: str, instance: int) -> set[int]:
    rows = query(dsn, "SELECT id FROM tasks WHERE claimed_by = %s AND state IN ('finished', 'failed')",
                 (instance,))
    return {r["id"] for r in rows}


def logged_enders(daemons: list[Daemon]) -> dict[int, set[int]]:
    """task id -> the instance ids whose shards logged its end ("task N (...) finished/failed").

    A shard logs a performed task's end when it has the outcome in hand; the
    outcome is committed with its next transaction. So an instance killed, paused
    or cut off right after that line may never have recorded it: then another
    instance settles the task and logs it too.
    """
    seen: dict[int, set[int]] = {}
    for daemon in daemons:
        for match in _ENDED_LINE.finditer(daemon.log()):
            seen.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    return seen


def logged_reconciled(daemons: list[Daemon]) -> dict[int, set[int]]:
    """task id -> instance ids that logged reconciling it."""
    found: dict[int, set[int]] = {}
    for daemon in daemons:
        for match in _RECONCILED_LINE.finditer(daemon.log()):
            found.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    return found


def assert_enders_match_logs(dsn: str, daemons: list[Daemon], lost: AbstractSet[int] = frozenset()) -> None:
    """claimed_by of every ended task names an instance that logged ending it.

    Only an instance in ``lost`` (killed, or whose lease ran out while it was
    paused or cut off) may also have logged the end of a task another recorded.
    """
    logged = logged_enders(daemons)
    rows = query(dsn, "SELECT id, claimed_by FROM tasks WHERE state IN ('finished', 'failed')")
    in_db = {r["id"]: r["claimed_by"] for r in rows}
    missing = [(t, i) for t, i in sorted(in_db.items()) if i not in logged.get(t, set())][:20]
    assert not missing, f"ended tasks whose claimed_by did not log ending them (task, claimed_by): {missing}"
    extra = sorted(set(logged) - set(in_db))[:20]
    assert not extra, f"tasks an instance logged as ended that the database does not show ended: {extra}"
    twice = [(t, in_db[t], sorted(logged[t])) for t in sorted(in_db)
             if not logged[t] - {in_db[t]} <= set(lost)][:20]
    assert not twice, f"tasks logged as ended by more than one live instance (task, claimed_by, loggers): {twice}"


def assert_everything_finished(dsn: str, scripts: dict[int, list[str]]) -> None:
    not_finished = query(dsn, "SELECT id, action, task_target_id, state, attempts, claimed_by, message "
                              "FROM tasks WHERE state <> 'finished' ORDER BY id LIMIT 20")
    assert not not_finished, f"tasks that did not finish: {not_finished}"
    assert checks.counts(dsn) == {"finished": sum(len(s) for s in scripts.values())}
    checks.assert_vms_in_expected_state(dsn, checks.expected_states(scripts))
    checks.assert_vms_match_libvirt(dsn, list(scripts))


def assert_scripts_ran_in_order(dsn: str, scripts: dict[int, list[str]]) -> None:
    ran = query(dsn, "SELECT task_target_id AS vm, array_agg(action ORDER BY time_started, id) AS actions "
                     "FROM tasks WHERE task_target_id = ANY(%s) GROUP BY task_target_id", (list(scripts),))
    wrong = {r["vm"]: r["actions"] for r in ran if r["actions"] != scripts[r["vm"]]}
    assert not wrong, f"VMs whose tasks ran out of script order: {dict(list(wrong.items())[:5])}"


def assert_contract(dsn: str, scripts: dict[int, list[str]], daemons: list[Daemon],
                    lost: AbstractSet[int] = frozenset()) -> None:
    """Exactly once, per-key order, nothing running, rows = libvirt, logs = claimed_by."""
    checks.assert_all_ended_once(dsn)
    checks.assert_no_running(dsn)
    checks.assert_key_order(dsn)
    checks.assert_reconciled_consistent(dsn)
    assert_everything_finished(dsn, scripts)
    assert_scripts_ran_in_order(dsn, scripts)
    assert_enders_match_logs(dsn, daemons, lost)


def assert_kept_lease(dsn: str, daemons: list[Daemon], isolated: Daemon | None = None) -> None:
    """Instances nobody disturbed never lost their lease: one instances row each (and the
    isolated one, if any, one rejoin at most: the one its isolation caused)."""
    rejoined = {d.pid: instance_ids(dsn, d) for d in daemons if len(instance_ids(dsn, d)) != 1}
    if isolated is not None and len(instance_ids(dsn, isolated)) > 2:
        rejoined[isolated.pid] = instance_ids(dsn, isolated)
    if rejoined:
        lines = [line for d in [*daemons, *([isolated] if isolated else [])] for line in d.log().splitlines()
                 if "lease lost" in line or "rejoined as" in line]
        raise AssertionError(f"instances lost their lease without being disturbed (pid: instance ids): "
                             f"{rejoined}\n" + "\n".join(lines[:20]))


def replaced_ids(dsn: str, daemons: list[Daemon]) -> set[int]:
    """Instance ids some daemon left behind by rejoining under a new one."""
    return {i for d in daemons for i in instance_ids(dsn, d)[:-1]}


def partition_counts(dsn: str) -> dict[int | None, int]:
    """holder (None: free) -> how many partitions it holds."""
    rows = query(dsn, "SELECT instance_id, count(*) AS n FROM partition_leases GROUP BY instance_id")
    return {r["instance_id"]: int(r["n"]) for r in rows}


def wait_balanced(dsn: str, daemons: list[Daemon], timeout: float = 20.0) -> None:
    """Every partition is held by a live instance of ``daemons``, each within one of an even share."""
    current = [current_instance(dsn, d) for d in daemons]

    def balanced() -> bool:
        assert_alive(daemons)
        counts = partition_counts(dsn)
        total = sum(counts.values())
        held = [counts.get(i, 0) for i in current]
        return sum(held) == total and max(held) - min(held) <= 1

    try:
        wait_for(balanced, timeout, 0.1, f"the partitions to be spread evenly over instances {current}")
    except AssertionError as exc:
        if "timed out" not in str(exc):
            raise
        raise AssertionError(f"{exc}: {partition_counts(dsn)}") from None


def db_now(dsn: str) -> Any:
    return query(dsn, "SELECT clock_timestamp() AS now")[0]["now"]


def held_partitions(dsn: str, instance: int) -> dict[int, int]:
    """partition -> token of the partitions the instance holds."""
    rows = query(dsn, "SELECT partition, token FROM partition_leases WHERE instance_id = %s", (instance,))
    return {r["partition"]: r["token"] for r in rows}


def running_of(dsn: str, instance: int) -> list[dict[str, Any]]:
    return query(dsn, "SELECT id, action, key_type, key_id FROM tasks WHERE state = 'running' "
                      "AND claimed_by = %s ORDER BY id", (instance,))


def lease_of(dsn: str, instance: int) -> dict[str, Any]:
    return query(dsn, "SELECT lease_expires_at, stopped_at, lease_expires_at <= clock_timestamp() AS expired "
                      "FROM instances WHERE id = %s", (instance,))[0]


def isolate_mid_task(dsn: str, daemon: Daemon, isolate: Any, undo: Any,
                     timeout: float = 60.0) -> tuple[int, list[dict[str, Any]]]:
    """Isolate an instance (freeze it, cut it off) while the database shows it running tasks.

    ``isolate()`` is applied, then the database is asked again; if the instance
    no longer runs anything, ``undo()`` and another try. (instance id, its running rows).
    """
    found: dict[str, Any] = {}

    def attempt() -> list[dict[str, Any]] | None:
        assert_alive([daemon])
        instance = current_instance(dsn, daemon)  # the latest: it may have rejoined meanwhile
        if not running_of(dsn, instance):
            if not checks.open_tasks(dsn):
                raise AssertionError(f"inconclusive: the work ended before instance {instance} was "
                                     f"seen running a task ({checks.counts(dsn)})")
            return None
        isolate()
        rows = running_of(dsn, instance)
        if rows:
            found["instance"] = instance
            return rows
        undo()
        return None

    rows = wait_for(attempt, timeout, 0.005, f"instance {daemon.pid} to be running a task")
    assert rows is not None
    return found["instance"], rows


def wait_takeover(dsn: str, lost: int, leases: dict[int, int], held: set[int],
                  others: list[Daemon], timeout: float = 30.0) -> list[dict[str, Any]]:
    """Wait until the lost instance's lease ran out and another instance took over its partitions.

    Evidence, any of: a lease row of one of ``leases`` under another instance with
    a higher token (seen while polling); one of ``leases`` no longer held by the
    lost instance under its token (it cannot let go itself: a takeover took it);
    a task ``lost`` held (``held``) now held or ended by another instance.
    Returns the lease rows seen moved.
    """
    moved: dict[int, dict[str, Any]] = {}

    def taken() -> bool:
        assert_alive(others)
        rows = query(dsn, "SELECT partition, instance_id, token, acquired_at FROM partition_leases "
                          "WHERE partition = ANY(%s::smallint[]) AND instance_id <> %s",
                     (sorted(leases), lost))
        for row in rows:
            moved.setdefault(row["partition"], row)
        adopted = query(dsn, "SELECT 1 FROM tasks WHERE id = ANY(%s) AND claimed_by IS NOT NULL "
                             "AND claimed_by <> %s LIMIT 1", (list(held), lost))
        still = held_partitions(dsn, lost)
        let_go = [p for p, token in leases.items() if still.get(p) != token]
        return bool(lease_of(dsn, lost)["expired"] and (moved or adopted or let_go))

    try:
        wait_for(taken, timeout, 0.05, f"another instance to take over the partitions of instance {lost}")
    except AssertionError as exc:
        if "timed out" not in str(exc):
            raise
        raise AssertionError(f"{exc}; lease: {lease_of(dsn, lost)}; partitions held: {partition_counts(dsn)}; "
                             f"sessions in a transaction or waiting: {stuck_sessions(dsn)}") from None
    lease_end = lease_of(dsn, lost)["lease_expires_at"]
    for partition, row in moved.items():
        assert row["token"] > leases[partition], (
            f"partition {partition} moved without a higher token: {leases[partition]} -> {row}")
        assert row["acquired_at"] >= lease_end, (
            f"partition {partition} was taken over at {row['acquired_at']}, before the lease of instance {lost} "
            f"ran out ({lease_end})")
    return list(moved.values())


def stuck_sessions(dsn: str) -> list[dict[str, Any]]:
    """The daemon's database sessions that wait for a lock or sit in an open transaction."""
    return query(dsn, """
        SELECT pid, application_name, state, wait_event_type, wait_event, pg_blocking_pids(pid) AS blocked_by,
               round(extract(epoch FROM clock_timestamp() - xact_start)::numeric, 1) AS xact_seconds,
               left(regexp_replace(query, '\\s+', ' ', 'g'), 120) AS last_query
        FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
          AND (wait_event_type = 'Lock' OR state LIKE 'idle in transaction%%')
        ORDER BY xact_start""")


def assert_takeovers_after_lease(dsn: str, lost: int, held: set[int]) -> None:
    """The tasks ``lost`` held were re-claimed only once its lease had run out."""
    lease_end = lease_of(dsn, lost)["lease_expires_at"]
    early = query(dsn, "SELECT id, claimed_by, claimed_at FROM tasks WHERE id = ANY(%s) AND claimed_by <> %s "
                       "AND claimed_at < %s ORDER BY id LIMIT 10", (list(held), lost, lease_end))
    assert not early, f"tasks of instance {lost} re-claimed before its lease ran out ({lease_end}): {early}"


def task_rows(dsn: str, ids: Any) -> list[dict[str, Any]]:
    return query(dsn, "SELECT id, action, key_id, state, attempts, claimed_by, time_started, time_ended, "
                      "message FROM tasks WHERE id = ANY(%s) ORDER BY id", (sorted(ids),))


def held_tasks(dsn: str, instance: int) -> set[int]:
    rows = query(dsn, "SELECT id FROM tasks WHERE claimed_by = %s AND state IN ('queued', 'running')",
                 (instance,))
    return {r["id"] for r in rows}


def wait_rejoined(dsn: str, daemon: Daemon, old: int, timeout: float = 40.0) -> int:
    """The instance registered again under a new id (lost lease -> new id); the new id."""

    def rejoined() -> int | None:
        assert_alive([daemon])
        newer = [i for i in instance_ids(dsn, daemon) if i > old]
        return newer[-1] if newer else None

    try:
        new = wait_for(rejoined, timeout, 0.1, f"instance {old} to rejoin under a new id")
        assert new is not None
        # Up again: its fetcher and every shard of the new id (before new work is queued for it).
        wait_for(lambda: all(f"[instance {new} fetcher] taskomatic.runtime.fetcher: shard {slot} connected"
                             in daemon.log() for slot in range(SHARDS)),
                 timeout, 0.1, f"instance {new} to be up")
    except AssertionError as exc:
        if "timed out" not in str(exc):
            raise
        raise AssertionError(f"{exc}\n{daemon.log()[-4000:]}") from None
    return new


def wait_progress(dsn: str, daemons: list[Daemon], tasks: int, timeout: float = 20.0) -> None:
    """These instances end ``tasks`` more tasks (or all that are left) within ``timeout``."""
    ids = [i for d in daemons for i in instance_ids(dsn, d)]

    def ended() -> int:
        return int(query(dsn, "SELECT count(*) AS n FROM tasks WHERE claimed_by = ANY(%s) "
                              "AND state IN ('finished', 'failed')", (ids,))[0]["n"])

    start = ended()
    try:
        wait_for(lambda: ended() >= start + tasks or not checks.open_tasks(dsn), timeout, 0.1,
                 f"instances {ids} to end {tasks} more tasks")
    except AssertionError as exc:
        if "timed out" not in str(exc):
            raise
        raise AssertionError(f"{exc} (they ended {ended() - start}; {checks.counts(dsn)}); "
                             f"sessions in a transaction or waiting: {stuck_sessions(dsn)}") from None


def wait_did_work(dsn: str, instance: int, daemons: list[Daemon], timeout: float = 60.0) -> None:
    def worked() -> bool:
        assert_alive(daemons)
        return bool(query(dsn, "SELECT 1 FROM tasks WHERE claimed_by = %s AND state = 'finished' LIMIT 1",
                          (instance,)))

    wait_for(worked, timeout, 0.1, f"instance {instance} to finish a task")


# -- the proxy itself ------------------------------------------------------------------------------
def test_db_proxy_cuts_and_restores(dsn, db_proxy):
    conn = psycopg2.connect(db_proxy.dsn, connect_timeout=5)
    with conn.cursor() as cur:
        cur.execute("SELECT current_database()")
        assert cur.fetchone()[0] == checks.unique_prefix(dsn)
    conn.commit()
    assert db_proxy.connections() == 1
    assert db_proxy.cut() == 1
    with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.close()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(db_proxy.dsn, connect_timeout=5).close()
    assert db_proxy.refused >= 1
    # The server did not notice anything but a closed connection.
    assert query(dsn, "SELECT 1 AS one") == [{"one": 1}]
    db_proxy.restore()
    conn = psycopg2.connect(db_proxy.dsn, connect_timeout=5)
    with conn.cursor() as cur:
        cur.execute("SELECT 41 + 1")
        assert cur.fetchone()[0] == 42
    conn.close()
    wait_for(lambda: db_proxy.connections() == 0, 5, 0.02, "the proxied connection to close")


# -- (a) three instances share the work -----------------------------------------------------------
def test_three_instances_share_three_thousand_tasks(dsn, hosts, daemon_factory, prefix, keep_logs):
    vms, per_vm = 300, 10
    roomy_hosts(dsn)
    daemons = start_instances(daemon_factory, keep_logs)
    ids = [current_instance(dsn, d) for d in daemons]
    assert len(set(ids)) == INSTANCES, ids
    modes = query(dsn, "SELECT id, mode, lease_expires_at > clock_timestamp() AS live FROM instances "
                       "WHERE id = ANY(%s)", (ids,))
    assert all(r["mode"] == "multihost" and r["live"] for r in modes), modes

    started = time.monotonic()
    scripts = checks.vm_workload(dsn, prefix, vms=vms, per_vm=per_vm, seed=prefix)
    assert sum(len(s) for s in scripts.values()) == 3000
    wait_all_ended(dsn, daemons, timeout=150)
    elapsed = time.monotonic() - started

    assert_contract(dsn, scripts, daemons, lost=replaced_ids(dsn, daemons))
    # Nobody left, nobody rejoined: the three instances did everything, each task in one go.
    assert_kept_lease(dsn, daemons)
    checks.assert_all_ended_once(dsn, single_attempt=True)
    assert set(ended_by(dsn)) <= set(ids), (ended_by(dsn), ids)
    share = ended_by(dsn)
    for instance in ids:
        assert share.get(instance, 0) >= 150, f"an instance did (almost) no work: {share} in {elapsed:.1f}s"
    keys = query(dsn, "SELECT claimed_by, count(DISTINCT key_id) AS n FROM tasks GROUP BY claimed_by")
    assert all(r["n"] >= 10 for r in keys), f"keys per instance: {keys}"
    wait_balanced(dsn, daemons)
    assert "Traceback" not in "".join(d.log() for d in daemons)


# -- (b) kill -9 of a whole instance ---------------------------------------------------------------
def test_killed_instance_partitions_move_to_the_others(dsn, hosts, daemon_factory, prefix, keep_logs):
    vms, per_vm = 90, 16
    roomy_hosts(dsn)
    daemons = start_instances(daemon_factory, keep_logs)
    scripts = fleet(dsn, prefix, vms, per_vm, daemons)
    victim, survivors = daemons[1], [daemons[0], daemons[2]]
    checks.insert_rounds(dsn, scripts, range(1, per_vm))
    wait_for(lambda: finished_count(dsn) >= vms + 30, 60, 0.02, "the run to be under way")

    lost, running = isolate_mid_task(dsn, victim, lambda: group_signal(victim, signal.SIGSTOP),
                                     lambda: group_signal(victim, signal.SIGCONT))
    frozen_at = db_now(dsn)
    group_signal(victim, signal.SIGKILL)
    victim.wait(30)
    checks.assert_daemon_gone(victim)
    keys = held_partitions(dsn, lost)
    held = held_tasks(dsn, lost)
    left_running = {r["id"] for r in running_of(dsn, lost)} | running_ids(running)
    assert checks.open_tasks(dsn) > 100, f"inconclusive: the workload nearly ended ({checks.counts(dsn)})"

    moved = wait_takeover(dsn, lost, keys, held, survivors)
    ended_before = ended_ids(dsn, lost)  # a commit in flight at the kill has landed by now
    wait_all_ended(dsn, survivors)
    wait_for(lambda: not held_partitions(dsn, lost), 10, 0.1, "no partition left in the dead instance's name")
    wait_balanced(dsn, survivors)  # the survivors took over all of its partitions

    # Nothing lost, duplicated or reordered, rows agree with libvirt.
    assert_contract(dsn, scripts, daemons, lost={lost} | replaced_ids(dsn, daemons))
    # The dead instance ended nothing after its death; the others ended all it held.
    assert ended_ids(dsn, lost) == ended_before
    assert not query(dsn, "SELECT id FROM tasks WHERE claimed_by = %s AND time_ended > %s",
                     (lost, frozen_at))
    survivor_ids = {i for d in survivors for i in instance_ids(dsn, d)}
    assert_settled_by_others(dsn, held | left_running, lost, frozen_at, survivor_ids,
                             "tasks the killed instance held")
    assert_takeovers_after_lease(dsn, lost, held)
    # What it left running was settled by reconciliation in another instance.
    interrupted = assert_settled_by_others(dsn, left_running, lost, frozen_at, survivor_ids,
                                           "tasks the killed instance left running")
    assert interrupted, f"inconclusive: every task running at the kill had its outcome committed ({running})"
    reconciled = logged_reconciled(survivors)
    unsettled = sorted(t for t in interrupted if not reconciled.get(t, set()) & survivor_ids)
    assert not unsettled, ("tasks left running by the killed instance but not reconciled by another: "
                           f"{task_rows(dsn, unsettled)}")
    assert moved or held, "inconclusive: the killed instance held nothing"
    assert_kept_lease(dsn, survivors, victim)


# -- (c) SIGSTOP past the lease ---------------------------------------------------------------------
def test_paused_instance_is_fenced_and_rejoins(dsn, hosts, daemon_factory, prefix, frozen, keep_logs):
    vms, per_vm = 90, 16
    roomy_hosts(dsn)
    daemons = start_instances(daemon_factory, keep_logs)
    scripts = fleet(dsn, prefix, vms, per_vm, daemons)
    victim, others = daemons[1], [daemons[0], daemons[2]]
    checks.insert_rounds(dsn, scripts, range(1, per_vm))
    wait_for(lambda: finished_count(dsn) >= vms + 30, 60, 0.02, "the run to be under way")

    def freeze() -> None:
        frozen.add(victim.pid)
        group_signal(victim, signal.SIGSTOP)

    lost, running = isolate_mid_task(dsn, victim, freeze, lambda: group_signal(victim, signal.SIGCONT))
    frozen_at = db_now(dsn)
    keys = held_partitions(dsn, lost)
    held = held_tasks(dsn, lost)
    moved = wait_takeover(dsn, lost, keys, held, others)
    # The paused instance must not hold the others up: they go on while it is still paused.
    wait_progress(dsn, others, tasks=50)
    # From here on the paused instance may write nothing for the partitions it lost (a write it had
    # begun before the pause may still commit: its open transaction holds that partition's lease).
    ended_before = ended_ids(dsn, lost)
    resumed_from = len(victim.log())
    group_signal(victim, signal.SIGCONT)
    frozen.discard(victim.pid)

    new = wait_rejoined(dsn, victim, lost)
    # More work after the rejoin (the first may be done by now), for every instance to have a go at.
    later = more_work(dsn, prefix, vms=90, per_vm=6)
    wait_did_work(dsn, new, daemons)
    wait_all_ended(dsn, daemons)

    assert_contract(dsn, {**scripts, **later}, daemons, lost={lost} | replaced_ids(dsn, daemons))
    lost_partitions = {r["partition"] for r in moved}
    late = [r for r in task_rows(dsn, ended_ids(dsn, lost) - ended_before) if r["time_ended"] > frozen_at]
    assert not late, f"the paused instance recorded outcomes after it lost its lease: {late}"
    wait_for(lambda: not held_partitions(dsn, lost), 10, 0.1, "no partition left in the old instance id's name")
    assert_takeovers_after_lease(dsn, lost, held)
    if lost_partitions:
        late = query(dsn, "SELECT id, key_id, claimed_by, time_ended FROM tasks WHERE partition = ANY(%s::smallint[]) "
                          "AND claimed_by = %s AND time_ended >= %s",
                     (sorted(lost_partitions), lost, min(r["acquired_at"] for r in moved)))
        assert not late, f"the paused instance ended tasks of partitions it had lost: {late}"
    # Its interrupted tasks were settled by the instances that took them over.
    others_ids = {i for d in others for i in instance_ids(dsn, d)} | {new}
    assert_settled_by_others(dsn, held | running_ids(running), lost, frozen_at, others_ids,
                             "tasks the paused instance held")
    # Resumed, it finds its lease lost, its writes refused, and goes on under its new id.
    after = victim.log()[resumed_from:]
    assert "lease lost" in after, warnings_of(after)
    # Whatever it was doing when frozen was cut off: a refused write (a fenced start or step, or a fenced
    # outcome: "not recorded, the task is no longer ours"), the lease check before a start or a step, the
    # server ending its frozen transaction (idle-in-transaction limit), or the node's libvirtd closing the
    # frozen client's connection (its keepalive fences a paused client: the task waits for a retry that
    # the rejoin's stop comes before).
    cut_off = ("write refused", "no longer ours", "lease too old", "idle-in-transaction timeout",
               "server closed the connection", *LIBVIRT_CUT_OFF)
    assert any(sign in after for sign in cut_off), warnings_of(after)
    assert f"instance {lost} rejoined as instance {new}" in after, warnings_of(after)
    assert query(dsn, "SELECT count(*) AS n FROM tasks WHERE claimed_by = %s", (new,))[0]["n"] > 0
    assert instance_ids(dsn, victim)[-2:] == [lost, new]
    assert_kept_lease(dsn, others, victim)


# What a shard logs when the node's libvirtd closed its connection (keepalive, while it was frozen).
LIBVIRT_CUT_OFF = ("client socket is closed", "Cannot write data", "Cannot recv data", "End of file while reading data")


def warnings_of(log: str, limit: int = 6000) -> str:
    """The lines of an instance log above debug level (what went wrong), the last ``limit`` characters:
    a log's tail is mostly debug lines of finished tasks."""
    lines = [line for line in log.splitlines() if " DEBUG " not in line]
    return "\n".join(lines)[-limit:]


def running_ids(rows: list[dict[str, Any]]) -> set[int]:
    return {r["id"] for r in rows}


def assert_settled_by_others(dsn: str, task_ids: set[int], lost: int, isolated_at: Any,
                             others: set[int], what: str) -> set[int]:
    """Tasks the isolated instance held: each ended by another instance, or by the isolated one
    only with an action that had ended before the isolation (its commit was in flight then, or
    held open by the pause). Returns those the others settled."""
    rows = query(dsn, "SELECT id, action, key_id, state, claimed_by, time_started, time_ended FROM tasks "
                      "WHERE id = ANY(%s) ORDER BY id", (sorted(task_ids),))
    bad = [r for r in rows if r["claimed_by"] not in others
           and not (r["claimed_by"] == lost and r["time_ended"] is not None and r["time_ended"] <= isolated_at)]
    assert not bad, f"{what} not settled by the other instances (isolated at {isolated_at}): {bad[:10]}"
    return {r["id"] for r in rows if r["claimed_by"] in others}


# -- (d) the database goes away -----------------------------------------------------------------------
def test_database_restart_mid_run(private_pg, daemon_factory, libvirt_nodes, keep_logs):
    server, db = private_pg
    prefix = f"{Path(server.base_dir).name}-"
    vms, per_vm = 90, 16
    daemons = start_instances(daemon_factory, keep_logs, dbs=[db] * INSTANCES)
    scripts = fleet(db, prefix, vms, per_vm, daemons)
    checks.insert_rounds(db, scripts, range(1, per_vm))
    wait_for(lambda: finished_count(db) >= vms + 150 and query(db, "SELECT 1 FROM tasks WHERE state = 'running'"),
             60, 0.02, "the run to be under way")

    before = {d.pid: instance_ids(db, d) for d in daemons}
    server.restart()
    assert checks.open_tasks(db) > 100, f"inconclusive: the workload nearly ended ({checks.counts(db)})"
    wait_all_ended(db, daemons, timeout=150)

    # Work submitted after the restart reaches every instance. Liveness, not speed: an
    # instance still rejoining may miss one wave (the others finish it in a second), so
    # waves keep coming, up to five, until every instance has done some.
    restarted_at = db_now(db)
    later: dict[int, list[str]] = {}
    for wave in range(5):
        later.update(more_work(db, f"{prefix}{wave}", vms=30, per_vm=3))
        wait_all_ended(db, daemons)
        idle = [d.pid for d in daemons if not query(
            db, "SELECT 1 FROM tasks WHERE claimed_by = ANY(%s) AND created_at > %s LIMIT 1",
            (instance_ids(db, d), restarted_at))]
        if not idle:
            break
    assert not idle, f"instances {idle} did none of five waves of work submitted after the restart"
    # A restart may outlast a lease: an instance may rejoin, and its old id is fenced.
    assert_contract(db, {**scripts, **later}, daemons, lost=replaced_ids(db, daemons))
    for daemon in daemons:
        ids = instance_ids(db, daemon)
        assert ids[: len(before[daemon.pid])] == before[daemon.pid]
    wait_balanced(db, daemons)


def test_instance_cut_off_from_the_database(dsn, hosts, db_proxy, daemon_factory, prefix, keep_logs):
    vms, per_vm = 90, 16
    roomy_hosts(dsn)
    daemons = start_instances(daemon_factory, keep_logs, dbs=[dsn, db_proxy.dsn, dsn])
    victim, others = daemons[1], [daemons[0], daemons[2]]
    assert db_proxy.accepted > 0, "the cut-off instance does not talk through the proxy"
    scripts = fleet(dsn, prefix, vms, per_vm, daemons)
    checks.insert_rounds(dsn, scripts, range(1, per_vm))
    wait_for(lambda: finished_count(dsn) >= vms + 30, 60, 0.02, "the run to be under way")

    lost, running = isolate_mid_task(dsn, victim, db_proxy.cut, db_proxy.restore)
    cut_at = db_now(dsn)
    cut_from = len(victim.log())
    keys = held_partitions(dsn, lost)
    held = held_tasks(dsn, lost)
    moved = wait_takeover(dsn, lost, keys, held, daemons)
    wait_progress(dsn, others, tasks=50)  # the others go on while it is cut off
    ended_before = ended_ids(dsn, lost)
    assert victim.process.poll() is None
    db_proxy.restore()

    new = wait_rejoined(dsn, victim, lost)
    after = victim.log()[cut_from:]
    assert "lease lost" in after and f"instance {lost} rejoined as instance {new}" in after, warnings_of(after)
    assert db_proxy.refused + db_proxy.severed > 0
    later = more_work(dsn, prefix, vms=90, per_vm=6)
    wait_did_work(dsn, new, daemons)
    wait_all_ended(dsn, daemons)

    assert_contract(dsn, {**scripts, **later}, daemons, lost={lost} | replaced_ids(dsn, daemons))
    assert ended_ids(dsn, lost) == ended_before, "the cut-off instance recorded outcomes after losing its lease"
    wait_for(lambda: not held_partitions(dsn, lost), 10, 0.1, "no partition left in the old instance id's name")
    assert_takeovers_after_lease(dsn, lost, held)
    others_ids = {i for d in others for i in instance_ids(dsn, d)} | {new}
    assert_settled_by_others(dsn, held | running_ids(running), lost, cut_at, others_ids,
                             "tasks the cut-off instance held")
    assert moved or held
    # The cut-off instance works again, under its new id, with work submitted afterwards too.
    n = query(dsn, "SELECT count(*) AS n FROM tasks WHERE claimed_by = %s", (new,))[0]["n"]
    assert n > 0
    assert instance_ids(dsn, victim)[-2:] == [lost, new]
    assert_kept_lease(dsn, others, victim)
    wait_balanced(dsn, daemons)
