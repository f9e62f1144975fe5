"""The real daemon runs storage work on real libvirt dir pools, submitted by plain SQL.

Two pools on two nodes, each with refresh_pool, three create_volume and a
delete_volume (and one bad volume name), all inserted in one statement before
the volume rows' pool ever existed in libvirt. The daemon must end every task
once, as expected, and run each pool's tasks (volume tasks are keyed by their
pool) one at a time in id order.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import psycopg2
import psycopg2.extras
import pytest
from psycopg2.extras import Json

from tests.acceptance.checks import assert_all_ended_once, assert_key_order, wait_all_ended
from tests.helpers import query

STORAGE_ACTIONS = {"refresh_pool", "create_volume", "delete_volume"}
MiB = 1024 * 1024


@pytest.fixture
def pool_dirs(dsn: str, libvirt_nodes: list[Any]) -> Iterator[list[Path]]:
    """One pool directory per node (writable for the nodes' unprivileged libvirtd); pools removed after."""
    prefix = dsn.split("dbname=", 1)[1].split()[0]
    base = Path(tempfile.mkdtemp(prefix=f"tkm-acc-{prefix}-", dir="/tmp"))
    base.chmod(0o755)
    dirs = []
    for node in libvirt_nodes:
        path = base / node.name
        path.mkdir(mode=0o777)
        path.chmod(0o777)
        dirs.append(path)
    try:
        yield dirs
    finally:
        for node in libvirt_nodes:
            conn = libvirt.open(node.qemu_uri)
            try:
                for pool in conn.listAllStoragePools(0):
                    if pool.name().startswith(prefix):
                        if pool.isActive():
                            pool.destroy()
                        pool.undefine()
            finally:
                conn.close()
        shutil.rmtree(base, ignore_errors=True)


def _insert(dsn: str, sql: str, rows: list[tuple[Any, ...]]) -> list[int]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            ids = psycopg2.extras.execute_values(cur, sql, rows, fetch=True)
        conn.commit()
    finally:
        conn.close()
    return [r[0] for r in ids]


def test_storage_work_runs_in_pool_order(dsn: str, libvirt_nodes: list[Any], pool_dirs: list[Path],
                                         daemon_factory: Any) -> None:
    from taskomatic.actions.registry import load_actions

    missing = STORAGE_ACTIONS - set(load_actions())
    assert not missing, f"storage actions not registered in load_actions(): {sorted(missing)}"

    prefix = dsn.split("dbname=", 1)[1].split()[0]
    host_ids = _insert(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                            "VALUES %s RETURNING id",
                       [(node.name, node.qemu_uri, "QEMU", 4, 4194304) for node in libvirt_nodes])
    pool_ids = []
    for node, host_id, directory in zip(libvirt_nodes, host_ids, pool_dirs, strict=True):
        with open(directory / "found.img", "wb") as f:  # there before taskomatic looks
            f.truncate(5 * MiB)
        # A dir pool placed on its node (host_id is what refresh_pool would choose).
        pool_ids.append(query(dsn, "INSERT INTO storage_pools (name, pool_type, target_path, host_id) "
                                   "VALUES (%s, 'dir', %s, %s) RETURNING id",
                              (f"{prefix}-{node.name}", str(directory), host_id))[0]["id"])

    # The UI's rows: three volumes per pool, and one with a name that cannot be a file.
    volumes: dict[int, dict[str, int]] = {}
    for pool_id in pool_ids:
        names = ["v1.img", "v2.img", "v3.img", "../escape.img"]
        ids = _insert(dsn, "INSERT INTO storage_volumes (storage_pool_id, name, size) VALUES %s RETURNING id",
                      [(pool_id, name, (i + 1) * 10240) for i, name in enumerate(names)])
        volumes[pool_id] = dict(zip(names, ids, strict=True))

    tasks: list[tuple[str, int, str]] = []
    for pool_id in pool_ids:
        v = volumes[pool_id]
        tasks += [("StoragePool", pool_id, "refresh_pool"),
                  ("StorageVolume", v["v1.img"], "create_volume"),
                  ("StorageVolume", v["v2.img"], "create_volume"),
                  ("StorageVolume", v["../escape.img"], "create_volume"),
                  ("StorageVolume", v["v3.img"], "create_volume"),
                  ("StorageVolume", v["v2.img"], "delete_volume"),
                  ("StoragePool", pool_id, "refresh_pool")]
    # Interleave the two pools' tasks, as independent submitters would.
    interleaved = [t for pair in zip(tasks[:7], tasks[7:], strict=True) for t in pair]
    task_ids = _insert(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by) "
                            "VALUES %s RETURNING id",
                       [(t[0], t[1], t[2], Json({}), "acceptance") for t in interleaved])

    daemon = daemon_factory(shards=4)
    wait_all_ended(dsn, daemon, timeout=120)

    assert_all_ended_once(dsn, single_attempt=True)
    assert_key_order(dsn)  # per pool: one at a time, in id order
    rows = query(dsn, "SELECT id, task_target_type, task_target_id, action, state, message, "
                      "key_type, key_id FROM tasks ORDER BY id")
    assert [r["id"] for r in rows] == task_ids
    bad_ids = {volumes[p]["../escape.img"] for p in pool_ids}
    for row in rows:
        bad_name = row["task_target_type"] == "StorageVolume" and row["task_target_id"] in bad_ids
        assert row["state"] == ("failed" if bad_name else "finished"), (row, daemon.log()[-4000:])
        if bad_name:
            assert "must not contain '/'" in row["message"]
        # Volume work is keyed by its pool.
        pool_of = row["task_target_id"] if row["task_target_type"] == "StoragePool" else next(
            p for p in pool_ids if row["task_target_id"] in volumes[p].values())
        assert (row["key_type"], row["key_id"]) == ("StoragePool", pool_of)

    for pool_id, directory in zip(pool_ids, pool_dirs, strict=True):
        pool = query(dsn, "SELECT * FROM storage_pools WHERE id = %s", (pool_id,))[0]
        assert pool["state"] == "available" and pool["capacity"] > 0
        by_name = {r["name"]: r for r in query(
            dsn, "SELECT * FROM storage_volumes WHERE storage_pool_id = %s", (pool_id,))}
        assert set(by_name) == {"found.img", "v1.img", "v3.img", "../escape.img"}
        assert (by_name["found.img"]["state"], by_name["found.img"]["size"]) == ("available", 5120)
        assert by_name["../escape.img"]["state"] == "pending_setup"
        for name, size_kb in (("v1.img", 10240), ("v3.img", 30720)):
            assert by_name[name]["state"] == "available" and by_name[name]["path"] == str(directory / name)
            st = os.stat(directory / name)
            assert st.st_size == size_kb * 1024 and st.st_blocks * 512 < MiB
        assert sorted(os.listdir(directory)) == ["found.img", "v1.img", "v3.img"]
        assert not (directory.parent / "escape.img").exists()
