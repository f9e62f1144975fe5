"""Assertions and workload builders shared by the acceptance tests.

Everything here reads or writes the database with plain SQL, as another
program would, and reads libvirt directly: the tests judge the daemon only by
what it leaves in the tasks table and on the nodes.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import libvirt
import psycopg2
import psycopg2.extras
from psycopg2.extras import Json

from tests.helpers import Daemon, query, wait_for

TERMINAL = ("finished", "failed", "canceled")

# What a VM's row must say after a finished action (shared/reference/ovirt-model.md).
SUCCESS_STATE = {
    "create_vm": "stopped",
    "start_vm": "running",
    "shutdown_vm": "stopped",
    "poweroff_vm": "stopped",
    "suspend_vm": "suspended",
    "resume_vm": "running",
}

_DOMAIN_TO_ROW = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "suspended",
    libvirt.VIR_DOMAIN_SHUTOFF: "stopped",
}


# -- naming ----------------------------------------------------------------------------
def unique_prefix(dsn: str) -> str:
    """A prefix for VM descriptions (libvirt domain names) no other test shares."""
    return dsn.split("dbname=", 1)[1].split()[0]


# -- workloads -------------------------------------------------------------------------
def insert_vms(dsn: str, names: Sequence[str], memory_kb: int = 65536) -> list[int]:
    """One vms row per name, as a UI would create them; the ids in the same order."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            rows = psycopg2.extras.execute_values(
                cur, "INSERT INTO vms (description, memory_allocated) VALUES %s RETURNING id",
                [(name, memory_kb) for name in names], fetch=True, page_size=1000)
        conn.commit()
    finally:
        conn.close()
    return [r[0] for r in rows]


def insert_tasks(dsn: str, tasks: Iterable[tuple[Any, ...]]) -> list[int]:
    """Bulk INSERT in one statement, as another program would.

    Each task is (task_target_type, task_target_id, action) or the same plus
    args (any JSON value). Returns the new ids in the order given.
    """
    values = []
    for task in tasks:
        target_type, target_id, action, *rest = task
        args = rest[0] if rest else {}
        values.append((target_type, target_id, action, Json(args), "acceptance"))
    if not values:
        return []
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            rows = psycopg2.extras.execute_values(
                cur,
                "INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by) "
                "VALUES %s RETURNING id",
                values, template="(%s, %s, %s, %s::jsonb, %s)", fetch=True, page_size=len(values))
        conn.commit()
    finally:
        conn.close()
    return [r[0] for r in rows]


def lifecycle_script(rng: random.Random, length: int) -> list[str]:
    """A per-VM action list that respects the state machine from a fresh (pending) VM.

    create_vm, start_vm, then random suspend/resume pairs and shutdown/poweroff
    followed by start_vm again, exactly ``length`` actions.
    """
    assert length >= 2
    script = ["create_vm", "start_vm"]
    state = "running"
    while len(script) < length:
        if state == "running":
            action = rng.choice(["suspend_vm", "suspend_vm", "shutdown_vm", "poweroff_vm"])
        elif state == "suspended":
            action = "resume_vm"
        else:
            action = "start_vm"
        script.append(action)
        state = SUCCESS_STATE[action]
    return script


def interleave(scripts: dict[int, list[str]], rounds: range) -> list[tuple[int, str]]:
    """(vm_id, action) for the given rounds, round by round across VMs (order kept per VM)."""
    out = []
    for r in rounds:
        for vm_id, script in scripts.items():
            if r < len(script):
                out.append((vm_id, script[r]))
    return out


# -- progress --------------------------------------------------------------------------
def counts(dsn: str) -> dict[str, int]:
    rows = query(dsn, "SELECT state, count(*) AS n FROM tasks GROUP BY state")
    return {r["state"]: int(r["n"]) for r in rows}


def open_tasks(dsn: str) -> int:
    return int(query(dsn, "SELECT count(*) AS n FROM tasks WHERE state IN ('queued', 'running')")[0]["n"])


def wait_all_ended(dsn: str, daemon: Daemon | None = None, timeout: float = 180.0) -> None:
    """Wait until no task is queued or running; fail early (with the log) if the daemon died."""

    def done() -> bool:
        if daemon is not None and daemon.process.poll() is not None:
            raise AssertionError(f"daemon exited with {daemon.process.returncode} while tasks were open "
                                 f"({counts(dsn)}):\n{daemon.log()[-4000:]}")
        return open_tasks(dsn) == 0

    try:
        wait_for(done, timeout, 0.2, "every task to end")
    except AssertionError as exc:
        if daemon is not None and "timed out" in str(exc):
            raise AssertionError(f"{exc}; tasks: {counts(dsn)}\n{daemon.log()[-4000:]}") from None
        raise


def wait_task_ended(dsn: str, task_id: int, timeout: float = 60.0) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        row = query(dsn, "SELECT * FROM tasks WHERE id = %s", (task_id,))[0]
        return row if row["state"] in TERMINAL else None

    row = wait_for(ended, timeout, 0.1, f"task {task_id} to end")
    assert row is not None
    return row


# -- the contract ----------------------------------------------------------------------
def not_ended_properly(dsn: str) -> list[dict[str, Any]]:
    """Tasks (20 at most) not ended exactly once: not terminal, times missing or reversed, a failure without message."""
    return query(dsn, """
        SELECT id, action, task_target_id, state, message, time_started, time_ended, attempts, claimed_by
        FROM tasks
        WHERE state NOT IN ('finished', 'failed', 'canceled')
           OR time_ended IS NULL
           OR (state <> 'canceled' AND time_started IS NULL)
           OR time_started > time_ended
           OR (state = 'failed' AND coalesce(btrim(message), '') = '')
           OR (state IN ('finished', 'failed') AND attempts < 1)
        ORDER BY id LIMIT 20""")


def key_order_violations(dsn: str) -> list[str]:
    """Per ordering key, [time_started, time_ended] that overlap or do not follow id order (20 at most of each).

    Checked over every task that started (queued and canceled ones never did):
    each must start no earlier than the previous task of its key (by id) ended,
    and a task that has not ended yet may not have a started successor; and,
    belt and braces, within a key start times increase with id.
    """
    overlap = query(dsn, """
        WITH started AS (
            SELECT id, key_type, key_id, action, state, time_started, time_ended,
                   lag(id) OVER w AS prev_id,
                   lag(state) OVER w AS prev_state,
                   lag(time_ended) OVER w AS prev_ended
            FROM tasks
            WHERE time_started IS NOT NULL AND key_id IS NOT NULL
            WINDOW w AS (PARTITION BY key_type, key_id ORDER BY id)
        )
        SELECT key_type, key_id, prev_id, prev_state, prev_ended, id, action, state, time_started
        FROM started
        WHERE prev_id IS NOT NULL AND (prev_ended IS NULL OR time_started < prev_ended)
        ORDER BY key_type, key_id, id
        LIMIT 20""")
    reordered = query(dsn, """
        SELECT key_type, key_id, id, time_started, next_id, next_started FROM (
            SELECT key_type, key_id, id, time_started,
                   lead(id) OVER w AS next_id, lead(time_started) OVER w AS next_started
            FROM tasks WHERE time_started IS NOT NULL AND key_id IS NOT NULL
            WINDOW w AS (PARTITION BY key_type, key_id ORDER BY id)) s
        WHERE next_id IS NOT NULL AND next_started < time_started LIMIT 20""")
    return ([f"per-key order violated (overlap or out of id order): {r}" for r in overlap]
            + [f"tasks of one key started out of id order: {r}" for r in reordered])


def assert_all_ended_once(dsn: str, single_attempt: bool = False) -> None:
    """Every task ended once, in a terminal state, with consistent times and a message on failure."""
    bad = not_ended_properly(dsn)
    assert not bad, f"tasks that did not end properly: {bad}"
    if single_attempt:
        rerun = query(dsn, "SELECT id, action, state, attempts, message FROM tasks "
                           "WHERE state <> 'canceled' AND attempts <> 1 ORDER BY id LIMIT 20")
        assert not rerun, f"tasks run more than once (or never marked running): {rerun}"


def assert_no_running(dsn: str) -> None:
    running = query(dsn, "SELECT id, action, time_started, claimed_by FROM tasks WHERE state = 'running'")
    assert not running, f"tasks left running: {running}"


def assert_key_order(dsn: str) -> None:
    """Per ordering key, [time_started, time_ended] never overlap and follow id order."""
    violations = key_order_violations(dsn)
    assert not violations, "\n".join(violations)


def last_finished_actions(dsn: str) -> dict[int, str]:
    """vm id -> the action of its last (highest id) task, which must have finished."""
    rows = query(dsn, """
        SELECT DISTINCT ON (task_target_id) task_target_id AS vm_id, action, state, message
        FROM tasks WHERE task_target_type = 'Vm' AND task_target_id IS NOT NULL
        ORDER BY task_target_id, id DESC""")
    return {r["vm_id"]: r["action"] for r in rows}


def assert_vms_in_expected_state(dsn: str, expected: dict[int, str]) -> None:
    rows = {r["id"]: r["state"] for r in query(dsn, "SELECT id, state FROM vms WHERE id = ANY(%s)",
                                                   (list(expected),))}
    wrong = {vm: (rows.get(vm), want) for vm, want in expected.items() if rows.get(vm) != want}
    assert not wrong, f"VM rows not in the state their last task implies (row, expected): {wrong}"


def assert_vms_match_libvirt(dsn: str, vm_ids: Iterable[int] | None = None) -> None:
    """Each VM row agrees with the real domain on every host.

    running <=> domain running; suspended <=> paused; stopped (or a state only the
    database knows) <=> no domain or a shut-off one; an active domain only on the
    host of vms.host_id, and a stopped VM holds no host.
    """
    hosts = query(dsn, "SELECT id, libvirt_uri FROM hosts ORDER BY id")
    if vm_ids is None:
        vms = query(dsn, "SELECT id, uuid::text AS uuid, state, host_id, description FROM vms ORDER BY id")
    else:
        vms = query(dsn, "SELECT id, uuid::text AS uuid, state, host_id, description FROM vms "
                         "WHERE id = ANY(%s) ORDER BY id", (list(vm_ids),))
    conns = {h["id"]: libvirt.open(h["libvirt_uri"]) for h in hosts}
    problems = []
    try:
        for vm in vms:
            found: dict[int, str] = {}
            for host_id, conn in conns.items():
                try:
                    dom = conn.lookupByUUIDString(vm["uuid"])
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        continue
                    raise
                found[host_id] = _DOMAIN_TO_ROW.get(dom.state()[0], f"libvirt state {dom.state()[0]}")
            active = {h: s for h, s in found.items() if s != "stopped"}
            state = vm["state"]
            if state in ("running", "suspended"):
                if active != {vm["host_id"]: state}:
                    problems.append((vm["id"], state, vm["host_id"], "domains found:", found))
            elif state in ("stopped", "pending", "create_failed"):
                if active or vm["host_id"] is not None:
                    problems.append((vm["id"], state, vm["host_id"], "domains found:", found))
            else:
                problems.append((vm["id"], state, vm["host_id"], "transient or unexpected row state", found))
    finally:
        for conn in conns.values():
            conn.close()
    assert not problems, f"VM rows disagree with libvirt: {problems[:20]}"


def assert_reconciled_consistent(dsn: str) -> list[dict[str, Any]]:
    """Tasks settled by reconciliation ended sensibly; returns them.

    A re-run (attempts > 1) or a settled-as-done task ("interrupted" in its
    message) must agree with the VM's history: settled as done or re-run, it
    finished; settled as neither, it failed saying what was found.
    """
    rows = query(dsn, """
        SELECT id, action, state, message, attempts, task_target_id FROM tasks
        WHERE attempts > 1 OR message ILIKE '%%interrupted%%' ORDER BY id""")
    for row in rows:
        message = row["message"] or ""
        assert row["state"] in ("finished", "failed"), row
        assert row["attempts"] >= 1, row
        if row["state"] == "failed":
            assert "interrupted" in message, f"a reconciled task failed without saying why: {row}"
    return rows


# -- libvirt hygiene -------------------------------------------------------------------
def remove_domains(uris: Iterable[str], prefix: str) -> None:
    """Destroy and undefine the domains a test left on the shared nodes."""
    for uri in uris:
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError:
            continue
        try:
            for dom in conn.listAllDomains():
                try:
                    if not dom.name().startswith(prefix):
                        continue
                    if dom.isActive():
                        dom.destroy()
                    if dom.isPersistent():
                        dom.undefine()
                except libvirt.libvirtError:
                    pass
        finally:
            conn.close()


def vm_workload(dsn: str, prefix: str, vms: int, per_vm: int, seed: object,
                rounds: range | None = None) -> dict[int, list[str]]:
    """Create ``vms`` VMs with a random lifecycle script each; insert the given rounds
    (all by default) interleaved across VMs in one bulk INSERT. Returns the scripts."""
    rng = random.Random(str(seed))
    vm_ids = insert_vms(dsn, [f"{prefix}-{i:03d}" for i in range(vms)])
    scripts = {vm: lifecycle_script(rng, per_vm) for vm in vm_ids}
    insert_rounds(dsn, scripts, range(per_vm) if rounds is None else rounds)
    return scripts


def insert_rounds(dsn: str, scripts: dict[int, list[str]], rounds: range) -> list[int]:
    """Insert the given rounds of the scripts, interleaved across VMs, in one bulk INSERT."""
    return insert_tasks(dsn, [("Vm", vm, a) for vm, a in interleave(scripts, rounds)])


def expected_states(scripts: dict[int, list[str]]) -> dict[int, str]:
    return {vm: SUCCESS_STATE[script[-1]] for vm, script in scripts.items()}


# -- crashing shards on purpose ----------------------------------------------------------
def running_tasks_by_slot(dsn: str, shards: int) -> dict[int, dict[str, Any]]:
    """slot -> a task the database shows running on that shard (the latest marked, if a batch)."""
    rows = query(dsn, "SELECT id, action, key_type, key_id, task_target_id, run_by_shard FROM tasks "
                      "WHERE state = 'running' AND run_by_shard < %s ORDER BY time_started, id", (shards,))
    return {r["run_by_shard"]: r for r in rows}


def _sessions_idle(dsn: str, application_name: str, within: float) -> bool:
    """Wait until no session of that name runs a statement; False if one still does after ``within`` s."""
    import time

    deadline = time.monotonic() + within
    while True:
        active = query(dsn, "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = %s "
                            "AND state = 'active'", (application_name,))[0]["n"]
        if not active:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)  # polling the server's view of a frozen process, with a deadline


def kill_shard_mid_task(daemon: Daemon, dsn: str, shards: int, want: Any = None,
                        timeout: float = 60.0, prefer: int = 0) -> tuple[int, int, dict[str, Any]]:
    """SIGKILL a shard while the database shows it running a task; (slot, old pid, task row).

    The shard is frozen (SIGSTOP) first, and killed only if, frozen, it still
    holds a running task (that ``want(row)`` accepts); else it is thawed and
    another try is made. So the kill always interrupts a task.
    """
    import os
    import signal
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = daemon.child_pids()
        busy = {s: r for s, r in running_tasks_by_slot(dsn, shards).items() if want is None or want(r)}
        if not busy:
            time.sleep(0.005)
            continue
        slots = sorted(busy)
        slot = slots[prefer % len(slots)]
        pid = pids.get(f"shard {slot}")
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            continue
        killed = False
        try:
            # A commit the shard sent just before it froze may still be in the server: read the task's
            # state only once that shard's session is no longer active (else thaw and try again).
            if not _sessions_idle(dsn, f"taskomatic shard {slot}", within=2.0):
                continue
            row = running_tasks_by_slot(dsn, shards).get(slot)
            if row is not None and (want is None or want(row)) and daemon.child_pids().get(f"shard {slot}") == pid:
                os.kill(pid, signal.SIGKILL)
                killed = True
                return slot, pid, row
        finally:
            if not killed:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
    raise AssertionError(f"no shard was seen running a wanted task within {timeout}s")


def wait_slot_respawned(daemon: Daemon, slot: int, old_pid: int, timeout: float = 60.0) -> int:
    def respawned() -> int | None:
        if daemon.process.poll() is not None:
            raise AssertionError(f"the daemon exited:\n{daemon.log()[-4000:]}")
        pid = daemon.child_pids().get(f"shard {slot}")
        return pid if pid not in (None, old_pid) else None

    pid = wait_for(respawned, timeout, 0.05, f"shard {slot} to come back in its slot")
    assert pid is not None
    return pid


def live_group_members(pgid: int) -> list[int]:
    """Pids of non-zombie processes in process group ``pgid`` (a stopped daemon leaves none)."""
    import os

    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            found.append(int(entry))
    return found


def assert_daemon_gone(daemon: Daemon, timeout: float = 30.0) -> None:
    """The daemon exited and left no process of its group behind."""
    assert daemon.process.poll() is not None, "the daemon is still running"
    wait_for(lambda: not live_group_members(daemon.pid), timeout, 0.1,
             f"every process of the daemon's group {daemon.pid} to exit")
