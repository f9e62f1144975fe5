"""One fault-injection run: nodes, hosts, daemons, a VM workload, the moment, the finish.

A ``FaultRun`` owns everything it starts (daemons in their own process groups,
proxies, frozen process groups) and ``close()`` stops it all; the conftest
calls it in a finalizer, so nothing survives a failing test.

The moment of injection is drawn from the seed (``random.Random(f"{fault}:{seed}")``):
"once N tasks have ended", N somewhere in the first half of the workload,
waited for with a condition (``wait_ended``), never a sleep. Every other
choice a fault makes (which node, which instance, how long it stays broken,
counted in events the daemon logs or in database time) comes from the same
generator, so a seed replays the same scenario (the daemon's own timing still
varies, which is the point of running many seeds).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from tests.acceptance import checks
from tests.faults import checker
from tests.helpers import Daemon, execute, query, wait_for

# Short everything, so each fault plays out in seconds: keepalive declares a silent
# node dead after 2 s, a shard stuck 8 s on one task is killed, transient failures
# are retried every second at most, the host-status pass runs every second.
COMMON = ["--set", "daemon.reconcile_interval=1",
          "--set", "libvirt.keepalive_interval=1", "--set", "libvirt.keepalive_count=2",
          "--set", "libvirt.shutdown_timeout=3", "--set", "libvirt.migration_timeout=3",
          "--set", "daemon.task_timeout=8", "--set", "daemon.retry_backoff_max=1",
          "--set", "daemon.fast_stop_timeout=3", "--set", "daemon.drain_timeout=5"]
# Longer than the test nodes' server keepalive (2 s, taskomatic/embedded/libvirtd.py) plus a
# renewal interval, as the README asks of real nodes: a frozen instance's libvirt connections are
# closed before another instance can take its partitions over.
LEASE_SECONDS = 4
MULTIHOST = ["--mode", "multihost", "--set", f"multihost.lease_seconds={LEASE_SECONDS}",
             "--set", "multihost.lease_renew_interval=1"]
if os.environ.get("TKM_LOG_LEVEL"):
    COMMON += ["--log-level", os.environ["TKM_LOG_LEVEL"]]

# The clock_step fault's wall-clock shim (wallclock.c) reads the daemon's offset from this file.
SHIM_ENV = "TKM_CLOCK_OFFSET_FILE"

VMS = 24
PER_VM = 12


class FaultRun:
    def __init__(self, fault: str, seed: int, dsn: str, nodes: list[Any], base: Path) -> None:
        self.fault = fault
        self.seed = seed
        self.dsn = dsn
        self.nodes = nodes
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(f"{fault}:{seed}")
        self.daemons: list[Daemon] = []
        self.state_names: dict[int, str] = {}
        self.frozen: set[int] = set()
        self.closers: list[Any] = []
        self.started = time.monotonic()
        self.moment: int | None = None
        self.notes: dict[str, Any] = {}
        self.prefix = f"f{seed}"
        # The nodes' save directory when the workload saves VMs: the checker looks for their images.
        self.save_dir: Path | None = None
        # The work queued after the fault (must all finish); a test may give its own.
        self.later_work = self.more_work

    # -- setup -------------------------------------------------------------------------------
    def add_hosts(self, uris: list[str] | None = None, hypervisor: str = "TEST") -> list[int]:
        """One hosts row per node (room for every VM at once); ``uris`` overrides the node URIs.
        ``hypervisor`` QEMU: the nodes' qemu driver (real guests), not the test driver."""
        ids = []
        for i, node in enumerate(self.nodes):
            uri = uris[i] if uris else node.qemu_uri if hypervisor == "QEMU" else node.test_uri
            rows = query(self.dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                                   "VALUES (%s, %s, %s, 4096, 268435456) RETURNING id", (f"n{i}", uri, hypervisor))
            ids.append(rows[0]["id"])
        return ids

    def start_daemon(self, shards: int = 3, multihost: bool = False, db: str | None = None,
                     extra: list[str] | None = None, state: str | None = None, wait: bool = True) -> Daemon:
        n = len(self.daemons)
        state_name = state or f"d{n}"
        state_dir = self.base / state_name
        args = [*COMMON, *(MULTIHOST if multihost else []), *(extra or [])]
        daemon = Daemon(db or self.dsn, state_dir, shards=shards, extra=args,
                        log_path=self.base / f"daemon{n}.log")
        self.daemons.append(daemon)
        self.state_names[daemon.pid] = state_name
        if wait:
            daemon.wait_ready(90)
        return daemon

    def restart_like_systemd(self, dead: Daemon, shards: int, timeout: float = 60.0, **kwargs: Any) -> Daemon:
        """Start the instance again (same state dir) as Restart=on-failure would: a start that
        exits (the database may not have noticed the dead instance's session yet) is retried."""
        deadline = time.monotonic() + timeout
        while True:
            daemon = self.start_daemon(shards=shards, state=self.state_names[dead.pid], wait=False, **kwargs)
            try:
                daemon.wait_ready(max(1.0, deadline - time.monotonic()))
                return daemon
            except AssertionError:
                if daemon.process.poll() is None or time.monotonic() > deadline:
                    raise
                self.notes.setdefault("restart_exit_codes", []).append(daemon.process.returncode)

    # -- workload ------------------------------------------------------------------------------
    def workload(self, vms: int = VMS, per_vm: int = PER_VM) -> dict[int, list[str]]:
        """VMs with a lifecycle script each, and the moment of injection.

        Mostly, every create_vm ends first and the rest of the scripts is queued in
        one INSERT, the fault landing somewhere in the first half of the run; for a
        quarter of the seeds everything is queued at once and the fault lands among
        the first round (create_vm, start_vm), so interrupted creates and placements
        are covered too."""
        total = vms * per_vm
        self.notes["tasks_before_fault"] = total
        if self.rng.random() < 0.25:
            self.notes["early"] = True
            scripts = checks.vm_workload(self.dsn, self.prefix, vms=vms, per_vm=per_vm,
                                         seed=f"{self.fault}:{self.seed}")
            self.moment = self.rng.randint(vms // 4, vms + vms // 2)
            return scripts
        scripts = checks.vm_workload(self.dsn, self.prefix, vms=vms, per_vm=per_vm, seed=f"{self.fault}:{self.seed}",
                                     rounds=range(0, 1))
        self.wait_all_ended(60)
        checks.insert_rounds(self.dsn, scripts, range(1, per_vm))
        self.moment = self.rng.randint(vms + total // 10, vms + total // 2)
        return scripts

    def save_workload(self, vms: int = VMS, per_vm: int = PER_VM) -> dict[int, list[str]]:
        """Like ``workload`` (create_vm first, then the rest in one INSERT), with save_vm/restore_vm
        in the scripts; the moment of injection in the first half of the run."""
        rng = random.Random(f"{self.fault}:{self.seed}:scripts")
        vm_ids = checks.insert_vms(self.dsn, [f"{self.prefix}-{i:03d}" for i in range(vms)])
        scripts = {vm: save_script(rng, per_vm) for vm in vm_ids}
        checks.insert_rounds(self.dsn, scripts, range(0, 1))
        self.wait_all_ended(60)
        checks.insert_rounds(self.dsn, scripts, range(1, per_vm))
        total = vms * per_vm
        self.notes["tasks_before_fault"] = total
        self.moment = self.rng.randint(vms + total // 10, vms + total // 2)
        return scripts

    def script_workload(self, script: Any, vms: int, per_vm: int, label: str = "") -> dict[int, list[str]]:
        """VMs with ``script(rng, per_vm)`` each, every round queued at once (interleaved across VMs)."""
        rng = random.Random(f"{self.fault}:{self.seed}:scripts{label}")
        vm_ids = checks.insert_vms(self.dsn, [f"{self.prefix}{label}-{i:03d}" for i in range(vms)])
        scripts = {vm: script(rng, per_vm) for vm in vm_ids}
        checks.insert_rounds(self.dsn, scripts, range(per_vm))
        return scripts

    def more_work(self, vms: int = 6, per_vm: int = 6) -> dict[int, list[str]]:
        return checks.vm_workload(self.dsn, f"{self.prefix}-later", vms=vms, per_vm=per_vm,
                                  seed=f"{self.fault}:{self.seed}:later")

    # -- progress ------------------------------------------------------------------------------
    def ended(self) -> int:
        return int(query(self.dsn, "SELECT count(*) AS n FROM tasks WHERE state IN ('finished', 'failed', "
                                   "'canceled')")[0]["n"])

    def live(self) -> list[Daemon]:
        return [d for d in self.daemons if d.process.poll() is None]

    def assert_alive(self, daemons: list[Daemon]) -> None:
        for d in daemons:
            if d.process.poll() is not None:
                raise AssertionError(f"daemon {d.pid} exited with {d.process.returncode}:\n{d.log()[-4000:]}")

    def wait_ended(self, count: int, timeout: float = 60.0, alive: list[Daemon] | None = None) -> None:
        """At least ``count`` tasks have ended (the moment of injection)."""
        watch = self.live() if alive is None else alive

        def reached() -> bool:
            self.assert_alive(watch)
            return self.ended() >= count

        wait_for(reached, timeout, 0.01, f"{count} tasks to end")
        if not checks.open_tasks(self.dsn):
            raise AssertionError(f"inconclusive: the workload ended before the fault ({checks.counts(self.dsn)})")

    def wait_all_ended(self, timeout: float = 90.0, alive: list[Daemon] | None = None) -> None:
        watch = self.live() if alive is None else alive

        def done() -> bool:
            self.assert_alive(watch)
            return checks.open_tasks(self.dsn) == 0

        try:
            wait_for(done, timeout, 0.1, "every task to end")
        except AssertionError as exc:
            if "timed out" not in str(exc):
                raise
            stuck = query(self.dsn, "SELECT id, action, key_id, state, claimed_by, attempts FROM tasks "
                                    "WHERE state IN ('queued', 'running') ORDER BY id LIMIT 10")
            logs = "\n".join(f"--- daemon {d.pid}:\n{d.log()[-3000:]}" for d in self.daemons)
            raise AssertionError(f"{exc}; {checks.counts(self.dsn)}; stuck: {stuck}\n{logs}") from None

    def log_from(self) -> list[int]:
        """Where each daemon's log ends now (to look only at what comes after)."""
        return [len(d.log()) for d in self.daemons]

    def logged_since(self, offsets: list[int], *needles: str) -> int:
        """How many lines with any of ``needles`` the daemons logged since ``offsets``."""
        count = 0
        for i, d in enumerate(self.daemons):
            text = d.log()[offsets[i] if i < len(offsets) else 0:]
            count += sum(1 for line in text.splitlines() if any(n in line for n in needles))
        return count

    def instance_ids(self, daemon: Daemon) -> list[int]:
        pids = [daemon.pid, *checks.live_group_members(daemon.pid)]
        return [r["id"] for r in query(self.dsn, "SELECT id FROM instances WHERE pid = ANY(%s) ORDER BY id",
                                       (pids,))]

    def wait_hosts_available(self, timeout: float = 30.0) -> None:
        wait_for(lambda: not query(self.dsn, "SELECT 1 FROM hosts WHERE state <> 'available'"), timeout, 0.1,
                 "every host to be available again")

    # -- faults on process groups ----------------------------------------------------------------
    def freeze(self, daemon: Daemon) -> None:
        self.frozen.add(daemon.pid)
        os.killpg(daemon.pid, signal.SIGSTOP)

    def thaw(self, daemon: Daemon) -> None:
        os.killpg(daemon.pid, signal.SIGCONT)
        self.frozen.discard(daemon.pid)

    # -- the end -----------------------------------------------------------------------------------
    def finish(self, scripts: dict[int, list[str]], must_finish: bool, timeout: float = 90.0) -> list[str]:
        """Let the run end, queue new work and see it done, then judge; returns the violations
        (the caller asserts, after its own fault-specific checks)."""
        self.wait_all_ended(timeout)
        # Rows that disagree with the nodes the moment the last task ended (before the host-status
        # pass had its say): for the record; the verdict below allows the pass to correct them.
        stale = checker.vm_rows(self.dsn, save_dir=self.save_dir)
        self.notes["stale_rows_at_end"] = len(stale)
        if stale:
            self.notes["stale_examples"] = stale[:3]
        self.wait_hosts_available()
        later = self.later_work()
        self.wait_all_ended(timeout)
        if not self.live():
            raise AssertionError("no daemon is alive at the end")
        expected = checks.expected_states({**scripts, **later} if must_finish else later)
        # The host-status pass may still be correcting rows a node fault left stale: give it a few
        # passes (reconcile_interval is 1 s) before judging.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not checker.vm_rows(self.dsn, expected, self.save_dir), 15, 0.25,
                     "VM rows to agree with the nodes")
        violations = checker.check_run(self.dsn, [d.log() for d in self.daemons], expected, self.save_dir)
        if must_finish:
            violations += checker.all_finished(self.dsn)
            violations += checker.no_work_found_done(self.dsn)
        later_bad = query(self.dsn, "SELECT id, action, state, message FROM tasks WHERE task_target_id = ANY(%s) "
                                    "AND state <> 'finished' ORDER BY id LIMIT 10", (list(later),))
        violations += [f"work queued after the fault did not finish: {r}" for r in later_bad]
        self.record(violations)
        return violations

    def record(self, violations: list[str]) -> None:
        counts = checks.counts(self.dsn)
        stats = query(self.dsn, "SELECT count(*) FILTER (WHERE attempts > 1) AS reruns, "
                                "count(*) FILTER (WHERE message ILIKE '%%interrupted%%') AS reconciled "
                                "FROM tasks")[0]
        failures = query(self.dsn, "SELECT left(regexp_replace(message, '[0-9]+', 'N', 'g'), 70) AS m, count(*) AS n "
                                   "FROM tasks WHERE state = 'failed' GROUP BY 1 ORDER BY 2 DESC LIMIT 5")
        result = {"fault": self.fault, "seed": self.seed, "moment": self.moment, "tasks": sum(counts.values()),
                  "counts": counts, "reruns": stats["reruns"], "reconciled": stats["reconciled"],
                  "violations": len(violations), "seconds": round(time.monotonic() - self.started, 1),
                  "failures": {r["m"]: r["n"] for r in failures},
                  "tracebacks": sum(d.log().count("Traceback") for d in self.daemons), **self.notes}
        print(f"fault run: {json.dumps(result, default=str)}")
        for v in violations:
            print(f"  violation: {v}")
        target = os.environ.get("TKM_FAULT_RESULTS")
        if target:
            with open(target, "a") as f:
                f.write(json.dumps({**result, "details": violations[:10]}, default=str) + "\n")

    def close(self, keep_logs_to: str | None = None, test_name: str = "") -> None:
        for pgid in list(self.frozen):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGCONT)
        for node in self.nodes:
            node.thaw()
        for daemon in self.daemons:
            daemon.stop()
        for closer in self.closers:
            with contextlib.suppress(Exception):
                closer()
        if keep_logs_to:
            where = Path(keep_logs_to) / test_name
            where.mkdir(parents=True, exist_ok=True)
            for d in self.daemons:
                with contextlib.suppress(OSError):
                    shutil.copy(d.log_path, where / d.log_path.name)


# What each VM action leaves a VM in (checks.SUCCESS_STATE, plus saving and restoring).
SAVE_SUCCESS = {**checks.SUCCESS_STATE, "save_vm": "saved", "restore_vm": "running"}


def save_script(rng: random.Random, length: int) -> list[str]:
    """A lifecycle like ``checks.lifecycle_script`` in which a running VM is often saved and restored."""
    script = ["create_vm", "start_vm"]
    state = "running"
    while len(script) < length:
        if state == "running":
            action = rng.choice(["save_vm", "save_vm", "suspend_vm", "shutdown_vm", "poweroff_vm"])
        else:
            action = {"suspended": "resume_vm", "saved": "restore_vm", "stopped": "start_vm"}[state]
        script.append(action)
        state = SAVE_SUCCESS[action]
    return script


def set_db(dsn: str, sql: str, params: Any = None) -> None:
    execute(dsn, sql, params)
