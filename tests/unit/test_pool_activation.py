"""Pool activation before a VM starts or arrives, on libvirt's in-process test driver."""

from __future__ import annotations

import uuid
from typing import Any

import libvirt
import pytest

from taskomatic.actions.base import ActionContext, TaskFailed
from taskomatic.actions.connections import LibvirtConnections
from taskomatic.actions.vm_storage import activate_pools
from taskomatic.config import Config

URI = "test:///default"
HOST = {"id": 1, "hostname": "t", "libvirt_uri": URI}


def _pool(name: str, path: str) -> dict[str, Any]:
    return {"id": 3, "name": name, "pool_type": "dir", "source_host": None, "source_path": None,
            "target_path": path, "host_id": None, "shared": True}


@pytest.fixture
def ctx() -> ActionContext:
    return ActionContext(store=None, config=Config(), libvirt=LibvirtConnections())  # type: ignore[arg-type]


def _state(ctx: ActionContext, name: str) -> bool:
    return bool(ctx.libvirt.get(URI).storagePoolLookupByName(name).isActive())


def test_an_unknown_pool_is_defined_and_started(ctx: ActionContext) -> None:
    name = f"act-{uuid.uuid4().hex[:8]}"
    activate_pools(ctx, HOST, [_pool(name, f"/srv/{name}")], "start_vm")
    assert _state(ctx, name)
    activate_pools(ctx, HOST, [_pool(name, f"/srv/{name}")], "start_vm")  # again: nothing to do, no error
    assert _state(ctx, name)


def test_an_inactive_pool_is_started(ctx: ActionContext) -> None:
    name = f"act-{uuid.uuid4().hex[:8]}"
    activate_pools(ctx, HOST, [_pool(name, f"/srv/{name}")], "start_vm")
    ctx.libvirt.get(URI).storagePoolLookupByName(name).destroy()
    assert not _state(ctx, name)
    activate_pools(ctx, HOST, [_pool(name, f"/srv/{name}")], "migrate_vm")
    assert _state(ctx, name)


def test_a_different_pool_of_that_name_is_refused(ctx: ActionContext) -> None:
    name = f"act-{uuid.uuid4().hex[:8]}"
    activate_pools(ctx, HOST, [_pool(name, f"/srv/{name}")], "start_vm")
    with pytest.raises(TaskFailed) as caught:
        activate_pools(ctx, HOST, [_pool(name, "/srv/elsewhere")], "start_vm")
    assert "already has a different pool" in caught.value.message and name in caught.value.message


def test_a_pool_row_that_cannot_be_defined_fails_clearly(ctx: ActionContext) -> None:
    with pytest.raises(TaskFailed) as caught:
        activate_pools(ctx, HOST, [_pool("bad/name", "/srv/x")], "start_vm")
    assert "cannot be defined" in caught.value.message and "must not contain '/'" in caught.value.message


def test_no_pools_opens_no_connection() -> None:
    class _Refusing(LibvirtConnections):
        def get(self, uri: str) -> libvirt.virConnect:
            raise AssertionError("no pool, no connection")

    activate_pools(ActionContext(store=None, config=Config(), libvirt=_Refusing()),  # type: ignore[arg-type]
                   HOST, [], "start_vm")
