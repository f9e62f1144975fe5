"""Which hosts a VM's disks allow (storage-aware placement), without a database or libvirt."""

from __future__ import annotations

from typing import Any

import pytest

from taskomatic.actions.base import TaskFailed
from taskomatic.actions.migrate import refuse_local_disks
from taskomatic.actions.vm_storage import is_shared, storage_needs


def _pool(pool_id: int, pool_type: str = "dir", host_id: int | None = None, shared: bool = False,
          host_name: str | None = None) -> dict[str, Any]:
    return {"id": pool_id, "name": f"pool{pool_id}", "pool_type": pool_type, "host_id": host_id,
            "shared": shared, "host_name": host_name}


def test_netfs_iscsi_and_marked_dir_pools_are_shared_others_local() -> None:
    assert is_shared(_pool(1, "netfs")) and is_shared(_pool(2, "iscsi"))
    assert is_shared(_pool(3, "dir", shared=True))
    assert not is_shared(_pool(4, "dir")) and not is_shared(_pool(5, "logical", shared=True))


def test_shared_disks_and_no_disks_allow_every_host() -> None:
    for pools in ([], [_pool(1, "netfs", host_id=1), _pool(2, "dir", host_id=2, shared=True)]):
        needs = storage_needs(7, pools)
        assert needs.local_host_id is None
        assert needs.allows(1) and needs.allows(2) and needs.allows(99)


def test_a_local_disk_pins_the_vm_to_its_pools_host() -> None:
    needs = storage_needs(7, [_pool(1, "netfs", host_id=1), _pool(2, "dir", host_id=2, host_name="node2")])
    assert needs.local_host_id == 2
    assert needs.allows(2) and not needs.allows(1)
    assert "pool 2 ('pool2') on host 2 (node2)" in needs.describe_local()


def test_an_unplaced_local_pool_allows_any_host_and_is_placed_with_the_vm() -> None:
    needs = storage_needs(7, [_pool(1, "logical")])
    assert needs.local_host_id is None and needs.allows(5)
    assert [p["id"] for p in needs.unplaced_local_pools] == [1]
    # With a placed local pool beside it, the VM goes where that one is.
    assert storage_needs(7, [_pool(1, "logical"), _pool(2, "dir", host_id=3)]).local_host_id == 3


def test_local_disks_on_two_hosts_fail_naming_both() -> None:
    with pytest.raises(TaskFailed) as caught:
        storage_needs(7, [_pool(1, "dir", host_id=1, host_name="a"), _pool(2, "logical", host_id=2, host_name="b")])
    message = caught.value.message
    assert "VM 7" in message and "different hosts" in message
    assert "pool 1 ('pool1') on host 1 (a)" in message and "pool 2 ('pool2') on host 2 (b)" in message


def test_migrate_refuses_local_disks_and_accepts_shared_ones() -> None:
    refuse_local_disks(7, storage_needs(7, [_pool(1, "netfs", host_id=1), _pool(2, "dir", shared=True)]))
    with pytest.raises(TaskFailed) as caught:
        refuse_local_disks(7, storage_needs(7, [_pool(1, "netfs"), _pool(2, "dir", host_id=4)]))
    assert "local storage" in caught.value.message and "pool 2 ('pool2') of host 4" in caught.value.message
