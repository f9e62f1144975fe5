"""``taskomatic demo``: the whole product on embedded defaults, start to summary.

It starts a private PostgreSQL and libvirt nodes (libvirt's test driver
behind real ``libvirtd`` daemons), seeds a fleet, queues a realistic mixed
workload the way a web UI would (plain INSERTs, some while the daemon runs),
runs the real daemon as a subprocess with a progress bar, and reads the
results back from the ``tasks`` table: throughput, latency percentiles per
action, failures with their messages, and the per-VM order check. Everything
it started is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from taskomatic.config import Config
from taskomatic.db import operator
from taskomatic.db.store import Store

# (action, state it needs, state it leaves): a random walk over these gives
# each VM a plausible history.
_MOVES = {
    "stopped": [("start_vm", "running")],
    "running": [("suspend_vm", "suspended"), ("shutdown_vm", "stopped"), ("poweroff_vm", "stopped"),
                ("save_vm", "saved"), ("migrate_vm", "running")],
    "suspended": [("resume_vm", "running")],
    "saved": [("restore_vm", "running")],
}
# A few requests a real UI lets through that cannot work, to show how they fail.
_MISTAKES = [
    ("resume_vm", "running"),   # resume of a running VM: impossible state
    ("suspend_vm", "stopped"),  # suspend of a stopped VM: impossible state
]
_MISTAKE_RATE = 0.02


def plan_workload(vms: list[int], total: int, seed: int) -> tuple[list[tuple[int, str]], dict[int, str]]:
    """Tasks in submission order (interleaved across VMs) and each VM's expected final state."""
    rng = random.Random(seed)
    per_vm = {vm: ["create_vm"] for vm in vms}
    state = dict.fromkeys(vms, "stopped")
    remaining = total - len(vms)
    while remaining > 0:
        vm = rng.choice(vms)
        if rng.random() < _MISTAKE_RATE:
            action, needs_not = rng.choice(_MISTAKES)
            if state[vm] == needs_not:
                per_vm[vm].append(action)  # fails; the state stays
                remaining -= 1
                continue
        action, after = rng.choice(_MOVES[state[vm]])
        per_vm[vm].append(action)
        state[vm] = after
        remaining -= 1
    # Interleave: repeatedly take the next task of a random VM that has some left.
    order: list[tuple[int, str]] = []
    cursors = {vm: 0 for vm in vms}
    live = list(vms)
    while live:
        index = rng.randrange(len(live))
        vm = live[index]
        order.append((vm, per_vm[vm][cursors[vm]]))
        cursors[vm] += 1
        if cursors[vm] == len(per_vm[vm]):
            live[index] = live[-1]
            live.pop()
    return order, state


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[rank]


@contextmanager
def _store(dsn: str) -> Iterator[Store]:
    """A short-lived connection that commits what it did."""
    store = Store.open(dsn, "taskomatic demo", 30)
    try:
        with store.transaction():
            yield store
    finally:
        store.close()


def _insert_tasks(dsn: str, tasks: list[tuple[int, str]]) -> None:
    with _store(dsn) as store:
        operator.demo_queue_vm_tasks(store, tasks)


def _seed(dsn: str, node_uris: list[str], vm_count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    # Each host can hold the whole fleet (4 vcpus and 1 GiB per VM at most), so the
    # maintenance phase can empty one onto the others.
    cpus, memory_kb = max(256, 4 * vm_count), max(536870912, 1048576 * vm_count)
    with _store(dsn) as store:
        for i, uri in enumerate(node_uris):
            operator.demo_add_host(store, f"demo-node{i}", uri, cpus, memory_kb)
        return operator.demo_add_vms(store, [
            (f"demo-vm-{i:04d}", rng.choice((1, 1, 2, 4)), rng.choice((262144, 524288, 1048576)))
            for i in range(vm_count)])


def _ended(dsn: str) -> int:
    with _store(dsn) as store:
        return operator.ended_task_count(store)


def _has_save_image(conn: Any, path: str) -> bool:
    import libvirt

    try:
        conn.saveImageGetXMLDesc(path, 0)
        return True
    except libvirt.libvirtError:
        return False


def _check_vms_against_libvirt(dsn: str, save_dir: Path) -> tuple[int, list[str]]:
    """Compare each VM row with its domain; return (checked, mismatches)."""
    import libvirt

    mismatches: list[str] = []
    connections: dict[str, Any] = {}
    with _store(dsn) as store:
        rows = [{**r, "save_path": f"{save_dir}/taskomatic-vm{r['id']}-{r['uuid']}.save"}
                for r in operator.vms_and_their_nodes(store)]
    for row in rows:
        real = "stopped"
        if row["libvirt_uri"]:
            lv = connections.get(row["libvirt_uri"]) or libvirt.open(row["libvirt_uri"])
            connections[row["libvirt_uri"]] = lv
            try:
                code = lv.lookupByUUIDString(row["uuid"]).state()[0]
                real = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "suspended"}.get(
                    code, "stopped")
            except libvirt.libvirtError:
                real = "stopped"
            if real == "stopped" and row["state"] == "saved" and _has_save_image(lv, row["save_path"]):
                real = "saved"
        if real != row["state"]:
            mismatches.append(f"VM {row['id']}: row says {row['state']}, libvirt says {real}")
    for lv in connections.values():
        lv.close()
    return len(rows), mismatches


def _summary(dsn: str, expected: dict[int, str], save_dir: Path) -> list[str]:
    lines: list[str] = []
    with _store(dsn) as store:
        counts = operator.task_state_counts(store)
        span = operator.task_time_span(store)
        timings = operator.ended_task_timings(store)
        failures = operator.failure_kinds(store)
        order = operator.order_violations(store)
        final = operator.vm_states(store)
    total = sum(counts.values())
    busy = (span["last"] - span["first"]).total_seconds() if span and span["first"] else 0.0
    lines.append("")
    lines.append("taskomatic demo summary")
    lines.append("=======================")
    lines.append(f"tasks: {total}  " + "  ".join(f"{k}: {v}" for k, v in counts.items()))
    if busy > 0:
        lines.append(f"throughput: {total / busy:,.0f} tasks/s ({total} tasks from the first start "
                     f"to the last end: {busy:.2f} s)")
    lines.append("")
    lines.append(f"{'action':<14}{'count':>7}{'run p50':>10}{'run p95':>10}{'run p99':>10}"
                 f"{'wait p50':>11}{'wait p95':>11}")
    by_action: dict[str, tuple[list[float], list[float]]] = {}
    for t in timings:
        runs, waits = by_action.setdefault(t["action"], ([], []))
        runs.append(float(t["run"]) * 1000)
        waits.append(float(t["wait"]) * 1000)
    for action in sorted(by_action):
        runs, waits = (sorted(v) for v in by_action[action])
        run_cells = "".join(f"{_percentile(runs, q):>8.1f}ms" for q in (0.5, 0.95, 0.99))
        wait_cells = "".join(f"{_percentile(waits, q):>9.0f}ms" for q in (0.5, 0.95))
        lines.append(f"{action:<14}{len(runs):>7}{run_cells}{wait_cells}")
    lines.append("(run: time_started to time_ended; wait: created_at to time_started, "
                 "which includes the backlog queued at once)")
    lines.append("")
    if failures:
        lines.append("failures (expected: the workload includes a few impossible requests):")
        for f in failures:
            lines.append(f"  {f['n']:>4} x like: {f['message']}")
        lines.append("")
    violations = order["violations"] if order else None
    lines.append(f"per-VM order check: {violations} overlapping or out-of-order tasks "
                 f"across {order['keys'] if order else 0} VMs "
                 f"({'OK' if violations == 0 else 'VIOLATED'})")
    wrong_final = [vm for vm, want in expected.items() if final.get(vm) != want]
    lines.append(f"VM rows in the state their last task implies: {len(expected) - len(wrong_final)}/{len(expected)}")
    checked, mismatches = _check_vms_against_libvirt(dsn, save_dir)
    lines.append(f"VM rows matching libvirt: {checked - len(mismatches)}/{checked}")
    for m in mismatches[:5]:
        lines.append(f"  {m}")
    return lines


def run_demo(config: Config, args: argparse.Namespace) -> int:
    from taskomatic.db import migrate
    from taskomatic.db.store import connect
    from taskomatic.embedded.libvirtd import ManagedNode
    from taskomatic.embedded.postgres import EmbeddedPostgres

    if args.vms < 1 or args.tasks < args.vms or args.nodes < 1 or config.shards < 1:
        print("taskomatic demo: need --vms >= 1, --tasks >= --vms, --nodes >= 1, --shards >= 1", file=sys.stderr)
        return 2
    started = time.monotonic()
    if config.log_level != "debug":  # the summary is the output; server start-up chatter is not
        logging.getLogger("taskomatic").setLevel(logging.WARNING)
    base = Path(tempfile.mkdtemp(prefix="taskomatic-demo-", dir="/tmp"))
    base.chmod(0o755)  # the unprivileged server users must reach it
    daemon: subprocess.Popen[bytes] | None = None
    print(f"demo directory: {base}")
    keep = getattr(args, "keep", False)  # --keep: the directory and a running PostgreSQL, for `taskomatic plan`
    with ExitStack() as stack:
        if not keep:
            stack.callback(shutil.rmtree, base, True)
        print("starting a private PostgreSQL ...", flush=True)
        pg = EmbeddedPostgres(base / "postgres", user=config.embedded_user or None)
        pg.start()
        if keep:
            stack.callback(_kept, base, pg.pid)
        else:
            stack.callback(pg.stop)
        print(f"starting {args.nodes} libvirt nodes (test driver behind libvirtd) ...", flush=True)
        nodes = [ManagedNode(base / "nodes", f"node{i}") for i in range(args.nodes)]
        for node in nodes:
            node.start()
            stack.callback(node.stop)
        conn = connect(pg.dsn, "taskomatic demo", 30)
        migrate.upgrade(conn)
        conn.close()
        vms = _seed(pg.dsn, [n.test_uri for n in nodes], args.vms, args.seed)
        order, expected = plan_workload(vms, args.tasks, args.seed)
        first, rest = order[: len(order) // 2], order[len(order) // 2:]
        _insert_tasks(pg.dsn, first)
        print(f"seeded {len(vms)} VMs on {args.nodes} hosts; queued {len(first)} tasks, "
              f"{len(rest)} more arrive while the daemon runs", flush=True)

        save_dir = base / "save"  # the nodes' libvirtd (an unprivileged user) writes the images here
        save_dir.mkdir(mode=0o777)
        save_dir.chmod(0o777)
        log_path = base / "daemon.log"
        log_file = stack.enter_context(open(log_path, "wb"))
        # The demo's --config, --set and --log-level reach its daemon; the database and state
        # directory are the demo's own.
        given = ([f"--config={args.config}"] if getattr(args, "config", None) else []) + [
            f"--set={pair}" for pair in getattr(args, "settings", None) or []]
        daemon = subprocess.Popen(
            [sys.executable, "-m", "taskomatic", *given, "--dsn", pg.dsn, "--shards", str(config.shards),
             "--set", f"state_dir={base / 'state'}", "--set", f"save_dir={save_dir}",
             # Every demo node is on this machine: save_dir is one directory for all (clear_vms moves saved VMs).
             "--set", "save_dir_shared=yes",
             "--log-level", "debug" if config.log_level == "debug" else "warning"],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))},
        )
        stack.callback(_stop_daemon, daemon)
        ok = _follow(pg.dsn, order, rest, daemon, log_path, progress=not args.no_progress)
        wall = time.monotonic() - started
        if not ok:
            return 1
        print("\n".join(_summary(pg.dsn, expected, save_dir)))
        print("\n".join(_storage_phase(pg.dsn, daemon)))
        print("\n".join(_clear_host_phase(pg.dsn, daemon)))
        if _stop_daemon(daemon) != 0:
            print(f"daemon exited with {daemon.returncode}; log: {log_path}", file=sys.stderr)
        print(f"\ntotal demo time {wall:.1f} s; stopping the daemon, the libvirt nodes"
              + (" (PostgreSQL stays: --keep)" if keep else " and PostgreSQL"))
    return 0


def _kept(base: Path, pid: int | None) -> None:
    print(f"kept {base}: its PostgreSQL (pid {pid}) still runs, so read-only commands can use it, e.g.\n"
          f"  taskomatic --embedded-db --state-dir {base} plan --since 1h --bucket 10s\n"
          f"stop it with: kill -INT {pid}; then rm -rf {base}")


def _follow(dsn: str, order: list[tuple[int, str]], rest: list[tuple[int, str]],
            daemon: subprocess.Popen[bytes], log_path: Path, progress: bool) -> bool:
    """Feed the second half in bursts while showing progress; False if the daemon died."""
    from tqdm import tqdm

    bursts = [rest[i:i + max(1, len(rest) // 5)] for i in range(0, len(rest), max(1, len(rest) // 5))]
    deadline = time.monotonic() + 600
    with tqdm(total=len(order), unit="task", disable=not progress, dynamic_ncols=True) as bar:
        while True:
            if daemon.poll() is not None:
                print(f"\nthe daemon exited with {daemon.returncode}; last log lines:", file=sys.stderr)
                print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
                return False
            done = _ended(dsn)
            bar.update(done - bar.n)
            if bursts and done >= (len(order) - sum(len(b) for b in bursts)) * 0.6:
                _insert_tasks(dsn, bursts.pop(0))
            if done >= len(order) and not bursts:
                return True
            if time.monotonic() > deadline:
                print("\ndemo: tasks did not finish within 10 minutes", file=sys.stderr)
                return False
            time.sleep(0.2)  # a progress display's refresh, not synchronisation


def _wait_tasks(dsn: str, ids: list[int], daemon: subprocess.Popen[bytes]) -> list[dict[str, Any]] | None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and daemon.poll() is None:
        with _store(dsn) as store:
            rows = operator.tasks_by_id(store, ids)
        if all(r["state"] in ("finished", "failed", "canceled") for r in rows):
            return rows
        time.sleep(0.2)  # polling the table for the demo's report, not synchronisation
    return None


def _storage_phase(dsn: str, daemon: subprocess.Popen[bytes]) -> list[str]:
    """A storage pool refreshed, three volumes created and one deleted, as plain INSERTs."""
    with _store(dsn) as store:
        pool = operator.demo_add_pool(store, "demo-pool", "/var/lib/taskomatic-demo/images")
        ids = [operator.submit_task(store, "StoragePool", pool, "refresh_pool", {}, "taskomatic demo")]
        volumes = [operator.demo_add_volume(store, pool, f"disk{i}.img", size)
                   for i, size in enumerate((1048576, 2097152, 524288))]
        ids += [operator.submit_task(store, "StorageVolume", volume, "create_volume", {}, "taskomatic demo")
                for volume in volumes]
        ids.append(operator.submit_task(store, "StorageVolume", volumes[-1], "delete_volume", {},
                                        "taskomatic demo"))
    rows = _wait_tasks(dsn, ids, daemon)
    if rows is None:
        return ["", "storage: the tasks did not end in time"]
    with _store(dsn) as store:
        pool_state = operator.pool_state(store, pool)
        listed = ", ".join(f"{v['name']} ({v['size'] // 1024} MiB, {v['state']})"
                           for v in operator.pool_volume_list(store, pool))
    done = ", ".join(f"{r['action']} {r['state']}" for r in rows)
    lines = ["", f"storage: pool demo-pool {pool_state}; {done}", f"  volumes now: {listed or 'none'}"]
    lines += [f"  task {r['id']} {r['action']}: {r['message']}" for r in rows if r["state"] != "finished"]
    return lines


def _clear_host_phase(dsn: str, daemon: subprocess.Popen[bytes]) -> list[str]:
    """Disable the first host and empty it with clear_vms, as an operator would before maintenance."""
    with _store(dsn) as store:
        host = operator.first_host(store)
        assert host is not None  # the demo seeded its hosts
        host_id, hostname = int(host["id"]), host["hostname"]
        operator.disable_host(store, host_id)
        on_host = operator.vm_count_on_host(store, host_id)
        task_id = operator.submit_task(store, "Host", host_id, "clear_vms", {}, "taskomatic demo")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and daemon.poll() is None:
        with _store(dsn) as store:
            task = operator.tasks_by_id(store, [task_id])[0]
            state, message = task["state"], task["message"]
            left = operator.vm_count_on_host(store, host_id)
        if state in ("finished", "failed"):
            outcome = "the host is empty" if left == 0 else f"{left} VMs left on it"
            lines = ["", f"maintenance: disabled {hostname} and queued clear_vms (task {task_id}) for its "
                     f"{on_host} VMs: {state}; {outcome}"]
            if message:
                lines.append(f"  {message[:300]}{'...' if len(message) > 300 else ''}")
            return lines
        time.sleep(0.2)  # polling the table for the demo's report, not synchronisation
    return ["", f"maintenance: clear_vms (task {task_id}) did not end in time"]


def _stop_daemon(daemon: subprocess.Popen[bytes]) -> int:
    """SIGTERM (drain), then make sure its whole process group is gone."""
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(daemon.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return daemon.wait()
