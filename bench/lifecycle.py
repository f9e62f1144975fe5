"""The real VM lifecycle workload: two libvirt test nodes, TEST hosts, VMs, and the checks after a run.

A lifecycle run (``bench.run``, workloads ``lifecycle-*``) starts two
:class:`~taskomatic.embedded.libvirtd.ManagedNode` nodes of its own (a session
``libvirtd`` each, as an unprivileged user, private directories under the
bench's work directory), inserts one ``hosts`` row per node (hypervisor
``TEST``: libvirt's test driver behind the real daemon, shared by every
process that connects) and VMs 1..N, then queues the planned tasks
(:func:`bench.workloads.generate`) for the real daemon. After the run it checks
what the daemon left behind, in the tasks table, the ``vms`` rows and on the
nodes (:func:`check`); the nodes are stopped in ``finally`` blocks.

The baselines (``bench/baselines.py``) only know the bench's ``noop`` and
``sleep``: they never run this workload.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extras

from bench import measure
from bench.workloads import LIFECYCLE_ACTIONS

NODES = 2
VM_MEMORY_KB = 65_536
# Enough that placement never runs out: every VM may be running on one node.
HOST_CPUS = 65_536
HOST_MEMORY_KB = 1 << 40

# libvirt domain state -> what a VM row says (as taskomatic/actions/vm.py reads it).
_DOMAIN_STATES = {0: "stopped", 1: "running", 2: "running", 3: "suspended", 4: "running", 5: "stopped",
                  6: "stopped", 7: "suspended"}


class Nodes:
    """Two private libvirt nodes (test driver) and a save directory they can write; ``stop()`` is idempotent."""

    def __init__(self, base: Path, count: int = NODES) -> None:
        from taskomatic.embedded.libvirtd import ManagedNode

        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)  # the nodes' unprivileged user must reach their directories
        self.save_dir = base / "save"
        self.nodes = [ManagedNode(base, f"node{i}") for i in range(count)]

    def start(self) -> None:
        self.save_dir.mkdir(exist_ok=True)
        self.save_dir.chmod(0o777)  # save_vm images are written by the nodes' libvirtd (user nobody)
        for node in self.nodes:
            node.start()

    def stop(self) -> None:
        errors = []
        for node in self.nodes:
            try:
                node.stop()
            except Exception as exc:  # stop every node, whatever one of them does
                errors.append(f"{node.name}: {exc}")
        if errors:
            raise RuntimeError("libvirt nodes did not stop cleanly: " + "; ".join(errors))

    @property
    def uris(self) -> list[str]:
        return [node.test_uri for node in self.nodes]

    @property
    def pids(self) -> list[int]:
        """The libvirtd pids (each leads a process group of its own)."""
        return [node.pid for node in self.nodes if node.pid is not None]

    def daemon_settings(self) -> list[str]:
        """What the daemon needs to run the mix here: where save_vm may write its images."""
        return [f"save_dir={self.save_dir}"]


def seed_database(dsn: str, uris: list[str], vms: int) -> list[int]:
    """One TEST host per node and VMs 1..vms (``bench-vm-00001``...), as a UI would insert them; the host ids."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            host_ids = []
            for i, uri in enumerate(uris):
                cur.execute("INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                            "VALUES (%s, %s, 'TEST', %s, %s) RETURNING id",
                            (f"bench-node{i}", uri, HOST_CPUS, HOST_MEMORY_KB))
                host_ids.append(int(cur.fetchone()[0]))
            # Explicit ids: the workload's keys are VM ids 1..vms.
            cur.execute("INSERT INTO vms (id, description, memory_allocated) "
                        "SELECT g, 'bench-vm-' || lpad(g::text, 5, '0'), %s FROM generate_series(1, %s) g",
                        (VM_MEMORY_KB, vms))
            cur.execute("SELECT setval(pg_get_serial_sequence('vms', 'id'), %s)", (vms,))
        conn.commit()
    finally:
        conn.close()
    return host_ids


def node_domains(uris: list[str], host_ids: list[int]) -> dict[str, list[tuple[int, str]]]:
    """Domain UUID -> [(host id, state as a VM row would say it)] over every node."""
    import libvirt

    found: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for host_id, uri in zip(host_ids, uris, strict=True):
        conn = libvirt.open(uri)
        try:
            for dom in conn.listAllDomains(0):
                found[dom.UUIDString()].append((host_id, _DOMAIN_STATES.get(dom.state()[0], "stopped")))
        finally:
            conn.close()
    return dict(found)


def compare_vms(rows: list[dict[str, Any]], planned: dict[int, str],
                domains: dict[str, list[tuple[int, str]]]) -> list[dict[str, Any]]:
    """Every VM whose row disagrees with its planned final state or with libvirt (empty: all agree).

    running/suspended: exactly one domain active in that state, on the row's host.
    saved: no active domain, the row keeps its host (the image is on that node).
    stopped/pending: no active domain anywhere and no host.
    """
    problems = []
    for row in rows:
        vm, state, host = row["id"], row["state"], row["host_id"]
        found = domains.get(str(row["uuid"]), [])
        active = [(h, s) for h, s in found if s != "stopped"]
        why = []
        want = planned.get(vm)
        if want is not None and state != want:
            why.append(f"row is {state}, its last task leaves it {want}")
        if state in ("running", "suspended"):
            if active != [(host, state)]:
                why.append(f"row {state} on host {host}, domains {found}")
        elif state == "saved":
            if active or host is None:
                why.append(f"row saved on host {host}, domains {found}")
        elif state in ("stopped", "pending"):
            if active or host is not None:
                why.append(f"row {state} on host {host}, domains {found}")
        else:
            why.append(f"row in transient state {state}")
        if why:
            problems.append({"vm": vm, "state": state, "host_id": host, "why": "; ".join(why)})
    return problems


TASK_CHECK_SQL = """
SELECT count(*) FILTER (WHERE state NOT IN ('finished', 'failed', 'canceled')) AS not_ended,
       count(*) FILTER (WHERE time_started IS NULL OR time_ended IS NULL OR time_started > time_ended)
           AS bad_times,
       count(*) FILTER (WHERE attempts <> 1) AS attempts_not_1,
       count(*) FILTER (WHERE state = 'failed') AS failed
FROM tasks
"""


def check(conn: Any, uris: list[str], host_ids: list[int], planned: dict[int, str]) -> dict[str, Any]:
    """After the daemon stopped: every task ended once, the VM rows match the plan and libvirt."""
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute(TASK_CHECK_SQL)
        tasks = {k: int(v) for k, v in cur.fetchone().items()}
        cur.execute("SELECT id, action, task_target_id AS vm, message FROM tasks WHERE state = 'failed' "
                    "ORDER BY id LIMIT 10")
        failures = [dict(r) for r in cur.fetchall()]
        cur.execute("SELECT id, uuid::text AS uuid, state, host_id FROM vms ORDER BY id")
        rows = [dict(r) for r in cur.fetchall()]
    conn.rollback()
    try:
        domains = node_domains(uris, host_ids)
        problems = compare_vms(rows, planned, domains)
        libvirt_error = None
    except Exception as exc:  # a node that cannot be read is a finding, not a crash of the bench
        domains, problems, libvirt_error = {}, [], f"{type(exc).__name__}: {exc}"
    states: dict[str, int] = defaultdict(int)
    for row in rows:
        states[row["state"]] += 1
    ok = (tasks["not_ended"] == 0 and tasks["bad_times"] == 0 and tasks["attempts_not_1"] == 0
          and tasks["failed"] == 0 and not problems and libvirt_error is None)
    return {
        "ok": ok,
        "tasks": tasks,
        "failures": failures,
        "vms": len(rows),
        "vm_states": dict(sorted(states.items())),
        "domains": sum(len(v) for v in domains.values()),
        "vm_mismatches": len(problems),
        "vm_mismatch_examples": problems[:10],
        "libvirt_error": libvirt_error,
    }


def action_durations(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per action: how many ran, and their time_started -> time_ended in ms (mean, p50, p95, max)."""
    by_action: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["started"] is not None and r["ended"] is not None:
            by_action[r["action"]].append((r["ended"] - r["started"]) * 1000.0)
    out = {}
    for action in sorted(by_action, key=lambda a: (LIFECYCLE_ACTIONS.index(a) if a in LIFECYCLE_ACTIONS else 99, a)):
        values = sorted(by_action[action])
        out[action] = {"count": len(values), "mean_ms": round(sum(values) / len(values), 3),
                       "p50_ms": round(measure.percentile(values, 0.5) or 0.0, 3),
                       "p95_ms": round(measure.percentile(values, 0.95) or 0.0, 3),
                       "max_ms": round(values[-1], 3)}
    return out


def node_cpu_members(pids: list[int], stats: list[measure.ProcStat] | None = None) -> list[measure.ProcStat]:
    """Every process of the nodes' libvirtd process groups."""
    stats = stats if stats is not None else measure.all_stats()
    groups = set(pids)
    return [s for s in stats if s.pgrp in groups]


def short_dir(work_dir: Path, index: int) -> Path:
    """A short directory for a run's nodes: unix socket paths are limited to 107 bytes."""
    path = work_dir / f"n{index:02d}"
    if len(str(path / "node0" / "run" / "libvirt-sock")) > 107:
        raise ValueError(f"{path}: too long for the nodes' unix sockets")
    return path


__all__ = ["Nodes", "action_durations", "check", "compare_vms", "node_cpu_members", "node_domains",
           "seed_database", "short_dir"]

