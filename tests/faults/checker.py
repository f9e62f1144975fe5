"""The fault suite's judge: what a run left in the database and on the nodes.

``check_run`` reads the tasks, vms and hosts tables (plain SQL, as any other
program would), the real domains on every host's libvirt URI, and, for re-run
evidence, the text of the daemons' logs. It returns every violation it finds
(a list of strings, empty when the contract held), so a failing run reports
all that went wrong, not just the first thing:

1. every task ended exactly once: a terminal state, ``time_ended`` set,
   ``time_started <= time_ended``, a message on ``failed``, ``attempts >= 1``
   for a task that ran, nothing ``queued`` or ``running``;
2. per ordering key, the intervals ``time_started..time_ended`` never overlap
   and follow ``id`` order;
3. no task ran twice unless it was settled as "did not start": each attempt
   past the first (``attempts - 1``) must match a "task N (...) reconciled:
   not_started" line of some daemon's log (mark_rerun is the only way
   ``attempts`` grows on a task that had started, and it follows that line);
   a task settled by reconciliation that failed says it was interrupted;
4. every VM row agrees with the real domains (running <=> an active domain on
   ``vms.host_id`` only, suspended <=> paused there, stopped/pending <=> no
   active domain and no host, saved <=> a shut-off domain on ``vms.host_id`` only
   and its image in the save directory (when the run names it), never a
   transient state with no task running);
   with ``expected``, the rows are also in the state their last task implies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import libvirt

from tests.acceptance import checks
from tests.helpers import query

TERMINAL = ("finished", "failed", "canceled")

_DOMAIN_TO_ROW = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "suspended",
    libvirt.VIR_DOMAIN_SHUTOFF: "stopped",
}
_NOT_STARTED = re.compile(r": task (\d+) \([^)]*\) reconciled: not_started\b")


def ended_once(dsn: str) -> list[str]:
    return [f"task did not end properly (exactly once, terminal, times, message): {r}"
            for r in checks.not_ended_properly(dsn)]


def key_order(dsn: str) -> list[str]:
    return checks.key_order_violations(dsn)


def not_started_settlements(logs: Iterable[str]) -> dict[int, int]:
    """task id -> how many times some daemon logged settling it as not started."""
    found: dict[int, int] = {}
    for text in logs:
        for match in _NOT_STARTED.finditer(text):
            found[int(match.group(1))] = found.get(int(match.group(1)), 0) + 1
    return found


def reruns(dsn: str, logs: Iterable[str]) -> list[str]:
    settled = not_started_settlements(logs)
    rows = query(dsn, "SELECT id, action, task_target_id, state, attempts, message FROM tasks "
                      "WHERE attempts > 1 ORDER BY id")
    out = [f"task ran {r['attempts']} times but was settled 'not started' only {settled.get(r['id'], 0)} "
           f"times: {r}" for r in rows if settled.get(r["id"], 0) < r["attempts"] - 1]
    interrupted = query(dsn, "SELECT id, action, state, attempts, message FROM tasks "
                             "WHERE message ILIKE '%%interrupted%%' AND state NOT IN ('finished', 'failed')")
    out += [f"a task settled by reconciliation is not finished or failed: {r}" for r in interrupted]
    return out


def vm_rows(dsn: str, expected: dict[int, str] | None = None, save_dir: Path | None = None) -> list[str]:
    """Rows against the nodes; with ``save_dir`` (the nodes' save directory, local to the
    test), a ``saved`` row is checked too: its domain defined and shut off on its host only,
    its image in ``save_dir``."""
    hosts = query(dsn, "SELECT id, libvirt_uri FROM hosts ORDER BY id")
    vms = query(dsn, "SELECT id, uuid::text AS uuid, state, host_id FROM vms ORDER BY id")
    problems: list[str] = []
    conns: dict[int, Any] = {}
    try:
        for h in hosts:
            try:
                conns[h["id"]] = libvirt.open(h["libvirt_uri"])
            except libvirt.libvirtError as exc:
                problems.append(f"host {h['id']} ({h['libvirt_uri']}) cannot be read: {exc}")
        if problems:
            return problems
        for vm in vms:
            found: dict[int, str] = {}
            for host_id, conn in conns.items():
                try:
                    dom = conn.lookupByUUIDString(vm["uuid"])
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        continue
                    raise
                code = dom.state()[0]
                found[host_id] = _DOMAIN_TO_ROW.get(code, f"libvirt state {code}")
            active = {h: s for h, s in found.items() if s != "stopped"}
            state = vm["state"]
            if state in ("running", "suspended"):
                ok = active == {vm["host_id"]: state}
            elif state in ("stopped", "pending", "create_failed"):
                ok = not active and vm["host_id"] is None
            elif state == "saved" and save_dir is not None:
                image = save_dir / f"taskomatic-vm{vm['id']}-{vm['uuid']}.save"
                ok = found == {vm["host_id"]: "stopped"} and image.is_file()
            else:
                ok = False
            if not ok:
                problems.append(f"VM {vm['id']} row says {state} on host {vm['host_id']}, "
                                f"the nodes have: {found or 'no domain'}")
            if expected is not None and vm["id"] in expected and expected[vm["id"]] != state:
                problems.append(f"VM {vm['id']} row says {state}, its last task implies {expected[vm['id']]}")
    finally:
        for conn in conns.values():
            conn.close()
    return problems


def check_run(dsn: str, logs: Iterable[str], expected: dict[int, str] | None = None,
              save_dir: Path | None = None) -> list[str]:
    """Every violation of the contract the run left behind (empty: it held)."""
    logs = list(logs)
    return [*ended_once(dsn), *key_order(dsn), *reruns(dsn, logs), *vm_rows(dsn, expected, save_dir)]


def no_work_found_done(dsn: str) -> list[str]:
    """For consistent scripts on nodes nobody else touches: no task found its work already done.

    Each VM's script only asks for what its previous action made possible, so a
    "nothing to do" success means the same work had been done before: a task run
    twice (or a re-run after an effect the reconciliation missed)."""
    rows = query(dsn, "SELECT id, action, task_target_id, attempts, message FROM tasks "
                      "WHERE state = 'finished' AND message LIKE '%%nothing to do%%' ORDER BY id LIMIT 20")
    return [f"task found its work already done (it, or the same work, ran twice): {r}" for r in rows]


def all_finished(dsn: str) -> list[str]:
    """For faults that must cost no task: every task finished (none failed)."""
    rows = query(dsn, "SELECT id, action, task_target_id, state, attempts, message FROM tasks "
                      "WHERE state <> 'finished' ORDER BY id LIMIT 20")
    return [f"task did not finish although the fault should cost no task: {r}" for r in rows]
