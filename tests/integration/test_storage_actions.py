"""The storage actions against real libvirt dir pools and a real PostgreSQL.

Each action is driven the way a shard drives it (runtime/shard.py): the task
is claimed, ``prepare`` reads, ``plan.begin`` runs in the transaction that
marks the task running, ``perform`` works on the node, and the outcome is
recorded with its row updates under the claim. Crash windows are reproduced
by stopping between those steps and asking ``reconcile``.

The nodes are the session's shared libvirtd nodes (qemu driver, session
mode, running as ``nobody``), so every pool name starts with this test's
database name and each test removes the pools it made.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import libvirt
import psycopg2.errors
import pytest
from psycopg2.extras import Json

from taskomatic.actions import storage
from taskomatic.actions.base import (
    Action,
    ActionContext,
    Outcome,
    Plan,
    Reconciled,
    Settlement,
    TaskFailed,
    TaskRetry,
)
from taskomatic.actions.connections import LibvirtConnections
from taskomatic.config import Config
from taskomatic.db.store import Store
from taskomatic.model import TaskRow
from tests.helpers import query

ACTIONS: dict[str, Action] = {a.name: a for a in storage.ACTIONS}
MiB = 1024 * 1024


def now() -> datetime:
    return datetime.now(UTC)


# -- a shard, step by step ---------------------------------------------------------------------
@dataclass
class Started:
    """A task marked running with its plan begun (perform not called yet)."""

    task: TaskRow
    action: Action
    plan: Plan


@dataclass
class Env:
    dsn: str
    prefix: str
    node: Any
    store: Store
    ctx: ActionContext
    instance_id: int
    tmp: Path
    host_id: int = 0
    made_pools: list[str] = field(default_factory=list)

    # -- rows ---------------------------------------------------------------------------------
    def add_host(self, name: str = "node0", uri: str | None = None, state: str = "available",
                 disabled: bool = False) -> int:
        return int(query(self.dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, state, is_disabled, "
                                   "num_cpus, memory) VALUES (%s, %s, 'QEMU', %s, %s, 4, 4194304) RETURNING id",
                         (name, uri or self.node.qemu_uri, state, disabled))[0]["id"])

    def pool_dir(self) -> Path:
        # libvirtd runs as nobody: the directory must be writable for it.
        path = Path(tempfile.mkdtemp(prefix="pool-", dir=self.tmp))
        path.chmod(0o777)
        return path

    def add_pool(self, suffix: str = "p", target: Path | None = None, pool_type: str = "dir",
                 **columns: Any) -> int:
        name = f"{self.prefix}-{suffix}"
        self.made_pools.append(name)
        values = {"name": name, "pool_type": pool_type,
                  "target_path": str(target) if target is not None else None, **columns}
        names = ", ".join(values)
        marks = ", ".join(["%s"] * len(values))
        return int(query(self.dsn, f"INSERT INTO storage_pools ({names}) VALUES ({marks}) RETURNING id",
                         tuple(values.values()))[0]["id"])

    def add_volume(self, pool_id: int, name: str, size: int = 1024, state: str = "pending_setup") -> int:
        return int(query(self.dsn, "INSERT INTO storage_volumes (storage_pool_id, name, size, state) "
                                   "VALUES (%s, %s, %s, %s) RETURNING id", (pool_id, name, size, state))[0]["id"])

    def pool(self, pool_id: int) -> dict[str, Any]:
        return query(self.dsn, "SELECT * FROM storage_pools WHERE id = %s", (pool_id,))[0]

    def volume(self, volume_id: int) -> dict[str, Any] | None:
        rows = query(self.dsn, "SELECT * FROM storage_volumes WHERE id = %s", (volume_id,))
        return rows[0] if rows else None

    def volumes(self, pool_id: int) -> dict[str, dict[str, Any]]:
        rows = query(self.dsn, "SELECT * FROM storage_volumes WHERE storage_pool_id = %s", (pool_id,))
        return {r["name"]: r for r in rows}

    def task(self, task_id: int) -> dict[str, Any]:
        return query(self.dsn, "SELECT * FROM tasks WHERE id = %s", (task_id,))[0]

    # -- libvirt -----------------------------------------------------------------------------
    def libvirt_pool(self, name: str) -> libvirt.virStoragePool | None:
        conn = self.ctx.libvirt.get(self.node.qemu_uri)
        try:
            return conn.storagePoolLookupByName(name)
        except libvirt.libvirtError:
            return None

    # -- driving an action like a shard ---------------------------------------------------------
    def submit(self, target_type: str, target_id: int | None, action: str, args: Any = None) -> TaskRow:
        row = query(self.dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by) "
                              "VALUES (%s, %s, %s, %s, 'test') RETURNING id, key_type, key_id",
                    (target_type, target_id, action, Json({} if args is None else args)))[0]
        query(self.dsn, "UPDATE tasks SET claimed_by = %s, claimed_at = clock_timestamp() WHERE id = %s",
              (self.instance_id, row["id"]))
        return TaskRow(row["id"], target_type, target_id, action, {} if args is None else args,
                       row["key_type"], row["key_id"], "queued")

    def _fail(self, task: TaskRow, failure: TaskFailed) -> None:
        with self.store.transaction():
            assert self.store.one("fail_unstartable", task_id=task.id, instance_id=self.instance_id,
                                  message=failure.message, time=now()) is not None
            for update in failure.row_updates:
                self.store.update_row(update.table, update.row_id, update.values)

    def record(self, task: TaskRow, outcome: Outcome, mark_running: bool = False) -> bool:
        with self.store.transaction():
            if mark_running:
                assert self.store.one("mark_running", shard=0, task_ids=[task.id], instance_id=self.instance_id,
                                      time_started=now()) is not None
            written = self.store.one("record_outcome", task_id=task.id, instance_id=self.instance_id,
                                     state=outcome.state, message=outcome.message, time_started=None,
                                     time_ended=now()) is not None
            if written:
                for update in outcome.row_updates:
                    self.store.update_row(update.table, update.row_id, update.values)
        return written

    def start(self, task: TaskRow) -> Started | None:
        """Check, prepare, mark running + begin. None: it ended before starting (failed or no-op).

        TaskRetry (a transient failure) propagates: the shard would park the task.
        """
        action = ACTIONS[task.action]
        try:
            action.validate_args(task.args)
            plan = action.prepare(self.ctx, task)
            self.store.rollback()
        except TaskFailed as failure:
            self.store.rollback()
            self._fail(task, failure)
            return None
        if plan.already_done is not None:
            self.record(task, plan.already_done, mark_running=True)
            return None
        try:
            with self.store.transaction():
                assert self.store.one("mark_running", shard=0, task_ids=[task.id], instance_id=self.instance_id,
                                      time_started=now()) is not None
                plan.begin(self.store)
        except TaskFailed as failure:
            self._fail(task, failure)
            return None
        return Started(task, action, plan)

    def perform(self, started: Started) -> Outcome:
        outcome = started.action.perform(self.ctx, started.plan)
        self.store.rollback()
        return outcome

    def run(self, target_type: str, target_id: int | None, action: str, args: Any = None) -> dict[str, Any]:
        """The whole task, as a shard runs it; returns the task row at the end."""
        task = self.submit(target_type, target_id, action, args)
        started = self.start(task)
        if started is not None:
            self.record(task, self.perform(started))
        row = self.task(task.id)
        assert row["state"] in ("finished", "failed"), row
        return row

    def reconcile(self, task: TaskRow) -> Reconciled:
        settled = ACTIONS[task.action].reconcile(self.ctx, task)
        self.store.rollback()
        return settled


@pytest.fixture
def env(dsn: str, libvirt_nodes: list[Any]) -> Iterator[Env]:
    prefix = dsn.split("dbname=", 1)[1].split()[0]
    tmp = Path(tempfile.mkdtemp(prefix=f"tkm-{prefix}-", dir="/tmp"))
    tmp.chmod(0o755)
    store = Store.open(dsn, "test_storage_actions", timeout=10)
    with store.transaction():
        instance_id = store.scalar("register_instance", hostname="testhost", pid=os.getpid(), version="test",
                                   mode="standalone", shards=1, lease=None)
    connections = LibvirtConnections()
    e = Env(dsn, prefix, libvirt_nodes[0], store, ActionContext(store, Config(dsn=dsn), connections),
            int(instance_id), tmp)
    try:
        yield e
    finally:
        try:
            conn = connections.get(libvirt_nodes[0].qemu_uri)
            for pool in conn.listAllStoragePools(0):
                if pool.name() in e.made_pools or pool.name().startswith(prefix):
                    if pool.isActive():
                        pool.destroy()
                    pool.undefine()
        finally:
            connections.close_all()
            store.close()
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def ready_pool(env: Env) -> tuple[int, Path]:
    """A dir pool refreshed onto node0: (pool id, its directory)."""
    env.host_id = env.add_host()
    directory = env.pool_dir()
    pool_id = env.add_pool(target=directory)
    row = env.run("StoragePool", pool_id, "refresh_pool")
    assert row["state"] == "finished", row["message"]
    return pool_id, directory


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    path.chmod(0o666)


# -- refresh_pool ---------------------------------------------------------------------------------
def test_refresh_defines_starts_and_lists_volumes(env: Env) -> None:
    host_id = env.add_host()
    directory = env.pool_dir()
    make_file(directory / "a.img", 3 * MiB)
    make_file(directory / "b.img", 1025)  # 2 KB, rounded up
    pool_id = env.add_pool(target=directory)

    row = env.run("StoragePool", pool_id, "refresh_pool")

    assert row["state"] == "finished", row["message"]
    assert "2 volume(s); 2 added" in row["message"]
    pool = env.pool(pool_id)
    assert pool["state"] == "available" and pool["host_id"] == host_id
    assert pool["capacity"] > 0 and 0 < pool["allocation"] <= pool["capacity"]
    handle = env.libvirt_pool(pool["name"])
    assert handle is not None and handle.isActive() and handle.isPersistent()
    volumes = env.volumes(pool_id)
    assert set(volumes) == {"a.img", "b.img"}
    a = volumes["a.img"]
    assert (a["state"], a["size"], a["path"], a["format"]) == ("available", 3072, str(directory / "a.img"), "raw")
    assert a["key"]
    assert volumes["b.img"]["size"] == 2


def test_refresh_builds_a_missing_target_directory(env: Env) -> None:
    env.add_host()
    target = env.pool_dir() / "not-yet"
    pool_id = env.add_pool(target=target)
    row = env.run("StoragePool", pool_id, "refresh_pool")
    assert row["state"] == "finished", row["message"]
    assert target.is_dir()
    assert env.volumes(pool_id) == {}


def test_refresh_tracks_vanished_and_reappearing_volumes(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, directory = ready_pool
    make_file(directory / "keep.img", MiB)
    make_file(directory / "goes.img", MiB)
    assert env.run("StoragePool", pool_id, "refresh_pool")["state"] == "finished"
    # Rows a queued create/delete owns are left alone, file or no file.
    pending = env.add_volume(pool_id, "pending.img", state="pending_setup")
    make_file(directory / "doomed.img", MiB)
    assert env.run("StoragePool", pool_id, "refresh_pool")["state"] == "finished"
    doomed = env.volumes(pool_id)["doomed.img"]["id"]
    query(env.dsn, "UPDATE storage_volumes SET state = 'pending_deletion' WHERE id = %s", (doomed,))
    (directory / "doomed.img").unlink()

    (directory / "goes.img").unlink()
    make_file(directory / "new.img", 2 * MiB)
    row = env.run("StoragePool", pool_id, "refresh_pool")
    assert row["state"] == "finished", row["message"]
    assert "1 added, 0 reappeared, 1 vanished" in row["message"]
    volumes = env.volumes(pool_id)
    assert {n: v["state"] for n, v in volumes.items()} == {
        "keep.img": "available", "goes.img": "vanished", "new.img": "available",
        "pending.img": "pending_setup", "doomed.img": "pending_deletion"}
    assert volumes["new.img"]["size"] == 2048

    make_file(directory / "goes.img", 4 * MiB)
    row = env.run("StoragePool", pool_id, "refresh_pool")
    assert "0 added, 1 reappeared, 0 vanished" in row["message"]
    goes = env.volumes(pool_id)["goes.img"]
    assert (goes["state"], goes["size"]) == ("available", 4096)
    assert env.volume(pending)["state"] == "pending_setup"  # type: ignore[index]


def test_refresh_reports_a_file_name_it_cannot_store(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, directory = ready_pool
    with open(os.path.join(bytes(directory), b"latin1-\xe9.img"), "wb") as f:
        f.truncate(1024)
    make_file(directory / "fine.img", 1024)
    row = env.run("StoragePool", pool_id, "refresh_pool")
    assert row["state"] == "finished", row["message"]
    assert "could not read 1: a volume whose name is not UTF-8" in row["message"]
    assert set(env.volumes(pool_id)) == {"fine.img"}


def test_refresh_without_a_usable_host_fails_and_marks_the_pool_unavailable(env: Env) -> None:
    env.add_host(state="unavailable")
    env.add_host(name="node1", disabled=True)
    pool_id = env.add_pool(target=env.pool_dir())
    row = env.run("StoragePool", pool_id, "refresh_pool")
    assert row["state"] == "failed"
    assert "no available, enabled host" in row["message"] and env.prefix in row["message"]
    assert env.pool(pool_id)["state"] == "unavailable"


def test_refresh_skips_an_unreachable_host_for_one_that_works(env: Env) -> None:
    dead = env.add_host(name="dead", uri=f"qemu+unix:///session?socket={env.tmp}/no-such-sock")
    alive = env.add_host()
    pool_id = env.add_pool(target=env.pool_dir())
    row = env.run("StoragePool", pool_id, "refresh_pool")
    assert row["state"] == "finished", row["message"]
    assert f"host {dead} (dead) is unreachable" in row["message"]
    assert env.pool(pool_id)["host_id"] == alive


def test_refresh_with_every_host_unreachable_is_retried(env: Env) -> None:
    dead = env.add_host(name="dead", uri=f"qemu+unix:///session?socket={env.tmp}/no-such-sock")
    pool_id = env.add_pool(target=env.pool_dir())
    task = env.submit("StoragePool", pool_id, "refresh_pool")
    started = env.start(task)
    assert started is not None
    with pytest.raises(TaskRetry, match=rf"host {dead} \(dead\) is unreachable"):
        env.perform(started)
    env.store.rollback()
    # It had started: the shard reconciles before the retry, and a refresh simply runs again.
    assert env.reconcile(task).kind == Settlement.NOT_STARTED
    assert env.pool(pool_id)["state"] == "pending_setup"


def test_refresh_reports_the_host_and_libvirt_error(env: Env) -> None:
    host_id = env.add_host()
    pool_id = env.add_pool(target=Path("/proc/taskomatic-cannot-be-here"))
    row = env.run("StoragePool", pool_id, "refresh_pool")
    assert row["state"] == "failed"
    assert f"refresh_pool failed on host {host_id} (node0)" in row["message"]
    assert "/proc/taskomatic-cannot-be-here" in row["message"]  # libvirt's own words name the path
    assert env.pool(pool_id)["state"] == "unavailable"
    # A definition that could not start is not left behind.
    assert env.libvirt_pool(env.pool(pool_id)["name"]) is None


def test_refresh_refuses_to_take_over_a_different_pool_of_that_name(env: Env) -> None:
    env.add_host()
    theirs, ours = env.pool_dir(), env.pool_dir()
    pool_id = env.add_pool(target=ours)
    name = env.pool(pool_id)["name"]
    conn = env.ctx.libvirt.get(env.node.qemu_uri)
    from taskomatic.actions.pool_xml import PoolSpec, pool_xml
    conn.storagePoolDefineXML(pool_xml(PoolSpec(name, "dir", target_path=str(theirs))), 0)

    row = env.run("StoragePool", pool_id, "refresh_pool")
    assert row["state"] == "failed"
    assert "already has a different pool" in row["message"]
    assert f"target path '{theirs}' (the row says '{ours}')" in row["message"]
    handle = env.libvirt_pool(name)
    assert handle is not None and not handle.isActive()  # left as we found it


def test_local_pool_does_not_move_when_its_host_is_disabled(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, _ = ready_pool
    env.add_host(name="node1")  # usable, but the dir pool's storage is not there
    query(env.dsn, "UPDATE hosts SET is_disabled = true WHERE id = %s", (env.host_id,))
    row = env.run("StoragePool", pool_id, "refresh_pool")
    assert row["state"] == "failed"
    assert f"local to host {env.host_id} (node0), which is disabled" in row["message"]
    assert "host_id to NULL" in row["message"]
    pool = env.pool(pool_id)
    assert (pool["state"], pool["host_id"]) == ("unavailable", env.host_id)


def test_refresh_refuses_a_pool_row_it_cannot_define(env: Env) -> None:
    env.add_host()
    pool_id = env.add_pool(target=None)
    row = env.run("StoragePool", pool_id, "refresh_pool")
    assert row["state"] == "failed"
    assert "cannot be defined: dir pools need target_path" in row["message"]


def test_hostile_pool_and_volume_names_stay_names(env: Env) -> None:
    env.add_host()
    directory = env.pool_dir()
    pool_id = env.add_pool(suffix="<name>x<target><path>&'\"", target=directory)
    row = env.run("StoragePool", pool_id, "refresh_pool")
    assert row["state"] == "finished", row["message"]
    name = env.pool(pool_id)["name"]
    handle = env.libvirt_pool(name)
    assert handle is not None and handle.name() == name
    volume_id = env.add_volume(pool_id, "<capacity>1<capacity>&amp;.img", size=64)
    row = env.run("StorageVolume", volume_id, "create_volume")
    assert row["state"] == "finished", row["message"]
    created = directory / "<capacity>1<capacity>&amp;.img"
    assert created.is_file() and created.stat().st_size == 64 * 1024
    # A name with '/' cannot be a libvirt name at all: refused with the reason, nothing defined.
    bad_pool = env.add_pool(suffix="</name>", target=env.pool_dir())
    row = env.run("StoragePool", bad_pool, "refresh_pool")
    assert row["state"] == "failed" and "must not contain '/'" in row["message"]


# -- create_volume ---------------------------------------------------------------------------------
def test_create_volume_makes_a_sparse_file_of_the_right_size(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, directory = ready_pool
    size_kb = 256 * 1024  # 256 MiB apparent
    volume_id = env.add_volume(pool_id, "disk1.img", size=size_kb)

    task = env.submit("StorageVolume", volume_id, "create_volume")
    assert (task.key_type, task.key_id) == ("StoragePool", pool_id)  # serialises with its pool
    started = env.start(task)
    assert started is not None
    assert env.record(task, env.perform(started))

    row = env.task(task.id)
    assert row["state"] == "finished", row["message"]
    st = os.stat(directory / "disk1.img")
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == size_kb * 1024
    assert st.st_blocks * 512 < MiB  # sparse: nothing allocated up front
    volume = env.volume(volume_id)
    assert volume is not None
    assert (volume["state"], volume["path"], volume["size"]) == ("available", str(directory / "disk1.img"), size_kb)
    assert volume["key"]


def test_create_volume_that_exists_is_a_no_op_success(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, directory = ready_pool
    make_file(directory / "there.img", 8 * MiB)
    volume_id = env.add_volume(pool_id, "there.img", size=1024)
    row = env.run("StorageVolume", volume_id, "create_volume")
    assert row["state"] == "finished"
    assert "already exists" in row["message"] and "not the 1024 KB asked for" in row["message"]
    assert row["attempts"] == 1 and row["time_started"] is not None
    volume = env.volume(volume_id)
    assert volume is not None
    assert (volume["state"], volume["size"], volume["path"]) == ("available", 8192, str(directory / "there.img"))
    assert (directory / "there.img").stat().st_size == 8 * MiB  # untouched


@pytest.mark.parametrize(("name", "expected"), [
    ("../x", "must not contain '/'"),
    ("a/b", "must not contain '/'"),
    ("..", "is not allowed"),
    ("", "is empty"),
    ("x" * 300, "300 bytes long"),
    ("..x", "must not start with '..'"),
])
def test_create_volume_refuses_bad_names(env: Env, ready_pool: tuple[int, Path], name: str,
                                         expected: str) -> None:
    pool_id, directory = ready_pool
    volume_id = env.add_volume(pool_id, name)
    row = env.run("StorageVolume", volume_id, "create_volume")
    assert row["state"] == "failed"
    assert f"create_volume: volume {volume_id}" in row["message"] and expected in row["message"]
    assert sorted(os.listdir(directory)) == []
    assert sorted(os.listdir(directory.parent)) == [directory.name]  # nothing escaped the pool
    assert env.volume(volume_id)["state"] == "pending_setup"  # type: ignore[index]


@pytest.mark.parametrize(("size", "expected"), [
    (0, "size must be greater than 0 KB, got 0"),
    (64 * 1024**3 + 1, "larger than the maximum of 68719476736 KB (64 TiB)"),
    (2**62, "larger than the maximum"),
])
def test_create_volume_refuses_bad_sizes(env: Env, ready_pool: tuple[int, Path], size: int, expected: str) -> None:
    pool_id, directory = ready_pool
    volume_id = env.add_volume(pool_id, "sized.img", size=size)
    row = env.run("StorageVolume", volume_id, "create_volume")
    assert row["state"] == "failed"
    assert expected in row["message"]
    assert os.listdir(directory) == []


def test_a_negative_size_cannot_even_be_stored(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, _ = ready_pool
    with pytest.raises(psycopg2.errors.CheckViolation):
        env.add_volume(pool_id, "neg.img", size=-1)


def test_create_volume_refuses_a_format_it_cannot_make(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, directory = ready_pool
    volume_id = env.add_volume(pool_id, "d.qcow2")
    query(env.dsn, "UPDATE storage_volumes SET format = 'qcow2' WHERE id = %s", (volume_id,))
    row = env.run("StorageVolume", volume_id, "create_volume")
    assert row["state"] == "failed" and "format 'qcow2' cannot be created" in row["message"]
    assert os.listdir(directory) == []


def test_create_volume_needs_an_available_pool(env: Env) -> None:
    env.add_host()
    pool_id = env.add_pool(target=env.pool_dir())  # never refreshed: pending_setup
    volume_id = env.add_volume(pool_id, "d.img")
    row = env.run("StorageVolume", volume_id, "create_volume")
    assert row["state"] == "failed"
    assert "is pending_setup, not available; run refresh_pool first" in row["message"]


def test_create_volume_in_a_pool_stopped_behind_our_back(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, directory = ready_pool
    handle = env.libvirt_pool(env.pool(pool_id)["name"])
    assert handle is not None
    handle.destroy()
    volume_id = env.add_volume(pool_id, "d.img")
    row = env.run("StorageVolume", volume_id, "create_volume")
    assert row["state"] == "failed"
    assert f"on host {env.host_id} (node0) is not active; run refresh_pool" in row["message"]
    assert env.pool(pool_id)["state"] == "unavailable"  # corrected to the real state
    assert env.run("StoragePool", pool_id, "refresh_pool")["state"] == "finished"
    assert env.run("StorageVolume", volume_id, "create_volume")["state"] == "finished"
    assert (directory / "d.img").is_file()


@pytest.mark.parametrize("action", ["create_volume", "delete_volume"])
def test_volume_work_on_an_unreachable_host_is_retried(env: Env, ready_pool: tuple[int, Path],
                                                       action: str) -> None:
    pool_id, _ = ready_pool
    query(env.dsn, "UPDATE hosts SET libvirt_uri = %s WHERE id = %s",
          (f"qemu+unix:///session?socket={env.tmp}/gone-sock", env.host_id))
    volume_id = env.add_volume(pool_id, "d.img")
    task = env.submit("StorageVolume", volume_id, action)
    with pytest.raises(TaskRetry, match=rf"{action}: host {env.host_id} \(node0\) is unreachable: cannot connect"):
        env.start(task)
    env.store.rollback()
    assert env.task(task.id)["state"] == "queued"  # the shard parks it and tries again later
    assert env.pool(pool_id)["state"] == "available"


@pytest.mark.parametrize("action", ["refresh_pool", "create_volume", "delete_volume"])
def test_unknown_arguments_fail_with_a_message(env: Env, ready_pool: tuple[int, Path], action: str) -> None:
    pool_id, _ = ready_pool
    target = ("StoragePool", pool_id) if action == "refresh_pool" else (
        "StorageVolume", env.add_volume(pool_id, "a.img"))
    row = env.run(*target, action, args={"size": 5, "force": True})
    assert row["state"] == "failed"
    assert row["message"] == f"{action} takes no arguments; got unknown argument(s) force, size"


def test_missing_targets_fail_with_a_message(env: Env) -> None:
    assert "storage pool 999 does not exist" in env.run("StoragePool", 999, "refresh_pool")["message"]
    assert "storage volume 999 does not exist" in env.run("StorageVolume", 999, "create_volume")["message"]
    assert "task_target_id is NULL" in env.run("StorageVolume", None, "delete_volume")["message"]


# -- delete_volume ---------------------------------------------------------------------------------
def test_delete_volume_removes_the_file_and_the_row(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, directory = ready_pool
    volume_id = env.add_volume(pool_id, "d.img")
    assert env.run("StorageVolume", volume_id, "create_volume")["state"] == "finished"
    assert (directory / "d.img").exists()

    row = env.run("StorageVolume", volume_id, "delete_volume")
    assert row["state"] == "finished", row["message"]
    assert not (directory / "d.img").exists()
    assert env.volume(volume_id) is None


def test_delete_volume_is_refused_while_a_vm_uses_it(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, directory = ready_pool
    volume_id = env.add_volume(pool_id, "d.img")
    assert env.run("StorageVolume", volume_id, "create_volume")["state"] == "finished"
    vm_id = query(env.dsn, "INSERT INTO vms (description, state) VALUES ('web1', 'stopped') RETURNING id")[0]["id"]
    query(env.dsn, "INSERT INTO vm_disks (vm_id, storage_volume_id) VALUES (%s, %s)", (vm_id, volume_id))

    row = env.run("StorageVolume", volume_id, "delete_volume")
    assert row["state"] == "failed"
    assert f"is in use as a disk by VM {vm_id} ('web1', stopped); detach it first" in row["message"]
    assert (directory / "d.img").exists()
    assert env.volume(volume_id)["state"] == "available"  # type: ignore[index]

    query(env.dsn, "DELETE FROM vm_disks WHERE vm_id = %s", (vm_id,))
    assert env.run("StorageVolume", volume_id, "delete_volume")["state"] == "finished"


def test_delete_volume_rechecks_users_when_it_starts(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, directory = ready_pool
    volume_id = env.add_volume(pool_id, "d.img")
    assert env.run("StorageVolume", volume_id, "create_volume")["state"] == "finished"
    task = env.submit("StorageVolume", volume_id, "delete_volume")
    plan = ACTIONS["delete_volume"].prepare(env.ctx, task)
    env.store.rollback()
    # A disk attached between prepare and the start: the begin transaction refuses.
    vm_id = query(env.dsn, "INSERT INTO vms (description) VALUES ('late') RETURNING id")[0]["id"]
    query(env.dsn, "INSERT INTO vm_disks (vm_id, storage_volume_id) VALUES (%s, %s)", (vm_id, volume_id))
    with pytest.raises(TaskFailed, match=f"in use as a disk by VM {vm_id}"), env.store.transaction():
        assert env.store.one("mark_running", shard=0, task_ids=[task.id], instance_id=env.instance_id,
                             time_started=now()) is not None
        plan.begin(env.store)
    assert env.task(task.id)["state"] == "queued"  # rolled back with it
    assert env.volume(volume_id)["state"] == "available"  # type: ignore[index]
    assert (directory / "d.img").exists()


def test_delete_volume_already_gone_is_a_success(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, directory = ready_pool
    make_file(directory / "old.img", MiB)
    assert env.run("StoragePool", pool_id, "refresh_pool")["state"] == "finished"
    volume_id = env.volumes(pool_id)["old.img"]["id"]
    (directory / "old.img").unlink()
    row = env.run("StorageVolume", volume_id, "delete_volume")
    assert row["state"] == "finished"
    assert "was already gone" in row["message"]
    assert env.volume(volume_id) is None


def test_delete_volume_failure_names_host_and_libvirt_error(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, directory = ready_pool
    volume_id = env.add_volume(pool_id, "stuck")
    assert env.run("StorageVolume", volume_id, "create_volume")["state"] == "finished"
    # Replace the file by a non-empty directory: libvirt cannot delete that as a file.
    (directory / "stuck").unlink()
    (directory / "stuck").mkdir()
    (directory / "stuck" / "inside").write_text("x")
    row = env.run("StorageVolume", volume_id, "delete_volume")
    assert row["state"] == "failed", row["message"]
    assert f"delete_volume failed on host {env.host_id} (node0): cannot delete volume {volume_id}" in row["message"]
    assert env.volume(volume_id)["state"] == "available"  # type: ignore[index]


def test_delete_volume_writes_nothing_after_losing_its_claim(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, directory = ready_pool
    volume_id = env.add_volume(pool_id, "d.img")
    assert env.run("StorageVolume", volume_id, "create_volume")["state"] == "finished"
    task = env.submit("StorageVolume", volume_id, "delete_volume")
    started = env.start(task)
    assert started is not None
    with env.store.transaction():
        other = env.store.scalar("register_instance", hostname="other", pid=1, version="test",
                                 mode="standalone", shards=1, lease=None)
    query(env.dsn, "UPDATE tasks SET claimed_by = %s WHERE id = %s", (other, task.id))

    outcome = env.perform(started)
    assert outcome.state == "failed" and "no longer running under this claim" in (outcome.message or "")
    assert not (directory / "d.img").exists()  # the node's work was done...
    assert env.volume(volume_id) is not None  # ...but the row is the new owner's to settle, not ours
    assert not env.record(task, outcome)


# -- reconcile: what a crash leaves behind -----------------------------------------------------------
def test_reconcile_create_volume(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, directory = ready_pool
    volume_id = env.add_volume(pool_id, "d.img", size=2048)
    task = env.submit("StorageVolume", volume_id, "create_volume")
    started = env.start(task)
    assert started is not None
    # Crash before perform: nothing happened.
    assert env.reconcile(task).kind == Settlement.NOT_STARTED
    # Crash after perform, before the outcome was recorded: it took effect.
    env.perform(started)
    settled = env.reconcile(task)
    assert settled.kind == Settlement.DONE, settled.message
    [update] = settled.row_updates
    assert update.values["state"] == "available" and update.values["path"] == str(directory / "d.img")
    assert update.values["size"] == 2048
    # The host became unreachable: nothing can be told yet, so the shard retries later.
    query(env.dsn, "UPDATE hosts SET libvirt_uri = %s WHERE id = %s",
          (f"qemu+unix:///session?socket={env.tmp}/gone-sock", env.host_id))
    with pytest.raises(TaskRetry, match="is unreachable"):
        env.reconcile(task)
    env.store.rollback()


def test_reconcile_delete_volume(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, directory = ready_pool
    volume_id = env.add_volume(pool_id, "d.img")
    assert env.run("StorageVolume", volume_id, "create_volume")["state"] == "finished"
    task = env.submit("StorageVolume", volume_id, "delete_volume")
    started = env.start(task)
    assert started is not None
    assert env.volume(volume_id)["state"] == "pending_deletion"  # type: ignore[index]
    # Crash before perform: the volume is still there, run it again.
    settled = env.reconcile(task)
    assert settled.kind == Settlement.NOT_STARTED and "before volume 'd.img' was deleted" in settled.message
    # Crash between the libvirt delete and the row removal: run again to remove the row.
    (directory / "d.img").unlink()
    settled = env.reconcile(task)
    assert settled.kind == Settlement.NOT_STARTED and "running again to remove its row" in settled.message
    # ...and the rerun (same claim, attempts + 1) does exactly that.
    plan = started.action.prepare(env.ctx, task)
    env.store.rollback()
    with env.store.transaction():
        assert env.store.one("mark_rerun", shard=0, task_id=task.id, instance_id=env.instance_id,
                             time_started=now()) is not None
        plan.begin(env.store)
    outcome = env.perform(Started(task, started.action, plan))
    assert outcome.state == "finished" and "already gone" in (outcome.message or "")
    assert env.volume(volume_id) is None
    # Crash after the row went, before the outcome: done.
    assert env.reconcile(task).kind == Settlement.DONE
    assert env.record(task, outcome)


def test_reconcile_delete_volume_when_the_pool_cannot_be_read(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, _ = ready_pool
    volume_id = env.add_volume(pool_id, "d.img")
    assert env.run("StorageVolume", volume_id, "create_volume")["state"] == "finished"
    task = env.submit("StorageVolume", volume_id, "delete_volume")
    assert env.start(task) is not None
    handle = env.libvirt_pool(env.pool(pool_id)["name"])
    assert handle is not None
    handle.destroy()
    settled = env.reconcile(task)
    assert settled.kind == Settlement.NEITHER and "is not active" in settled.message
    assert {(u.table, u.values["state"]) for u in settled.row_updates} == {
        ("storage_pools", "unavailable"), ("storage_volumes", "unavailable")}


def test_reconcile_refresh_pool(env: Env, ready_pool: tuple[int, Path]) -> None:
    pool_id, _ = ready_pool
    task = env.submit("StoragePool", pool_id, "refresh_pool")
    started = env.start(task)
    assert started is not None
    assert env.reconcile(task).kind == Settlement.NOT_STARTED  # a refresh can always run again
    env.record(task, env.perform(started))
    gone = env.submit("StoragePool", 12345, "refresh_pool")
    settled = env.reconcile(gone)
    assert settled.kind == Settlement.NEITHER and "storage pool 12345 does not exist" in settled.message
