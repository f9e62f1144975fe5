"""A VM's real state, as its node shows it, and what the VM actions share to read and describe it.

A domain is found by the VM's UUID on the host in ``vms.host_id``; a VM with
no host, or whose domain is gone, is not running anywhere. vm.py, migrate.py
and host.py act on what ``observe`` reads here.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import libvirt

from taskomatic.actions.base import ActionContext, TaskFailed, TaskRetry
from taskomatic.actions.connections import HostUnreachable
from taskomatic.actions.domain_xml import Disk, DomainSpec, vnc_port
from taskomatic.actions.libvirt_util import domain_state, is_transient, libvirt_uri_problem, save_image_path
from taskomatic.db import hosts as hosts_db
from taskomatic.db import vms as vms_db
from taskomatic.model import TaskRow
from taskomatic.text import quoted

log = logging.getLogger(__name__)

# States that only the database knows: a VM in one of these has no domain.
ROW_ONLY_STATES = ("pending", "create_failed", "invalid", "saved")
# A stopped domain with a save image is 'saved' while the row is in one of these.
_SAVE_STATES = ("saved", "saving", "restoring")

# Cleared when a VM no longer runs anywhere.
NOT_RUNNING = {"host_id": None, "vnc_port": None, "memory_used": 0, "num_vcpus_used": 0}


def domain_name(description: str) -> str:
    """The libvirt name for a VM: its description, minus what libvirt forbids.

    libvirt refuses '/' and control characters in names; everything else
    (XML metacharacters included) is kept and escaped by the XML library.
    """
    cleaned = "".join("_" if ch == "/" or not _xml_char(ch) else (" " if ord(ch) < 32 or ord(ch) == 127 else ch)
                      for ch in description)
    return cleaned.strip() or "vm"


# libvirt names files on the node after the domain (<name>.xml, <name>.log): a file name holds
# 255 bytes, minus the longest suffix.
MAX_DOMAIN_NAME_BYTES = 250


def name_problem(vm: dict[str, Any]) -> str | None:
    """Why the VM's description cannot become a libvirt domain name (None if it can)."""
    size = len(domain_name(vm["description"]).encode("utf-8", "surrogatepass"))
    if size > MAX_DOMAIN_NAME_BYTES:
        return (f"VM {vm['id']}: its description {quoted(vm['description'])} is {size} bytes long; the libvirt "
                f"domain name made from it may be at most {MAX_DOMAIN_NAME_BYTES} bytes (the node names files "
                "after it): shorten vms.description")
    return None


def _xml_char(ch: str) -> bool:
    """Allowed in an XML 1.0 document (control characters are handled by the caller)."""
    code = ord(ch)
    return code < 0xD800 or 0xE000 <= code <= 0xFFFD or code >= 0x10000


@dataclass
class Observed:
    """The VM's real state as read from its node."""

    state: str
    detail: str
    domain: libvirt.virDomain | None
    host: dict[str, Any] | None


def vm_row(ctx: ActionContext, task: TaskRow) -> dict[str, Any]:
    if task.target_id is None:
        raise TaskFailed("task_target_id is NULL; a Vm task needs the VM's id")
    vm = vms_db.get_vm(ctx.store, task.target_id)
    if vm is None:
        raise TaskFailed(f"VM {task.target_id} does not exist")
    return vm


def host_label(host: dict[str, Any]) -> str:
    return f"host {host['id']} ({host['hostname']})"


def connect_host(ctx: ActionContext, host: dict[str, Any]) -> libvirt.virConnect:
    problem = libvirt_uri_problem(host["libvirt_uri"])
    if problem:
        raise TaskFailed(f"{host_label(host)}: {problem}")
    try:
        return ctx.libvirt.get(host["libvirt_uri"])
    except HostUnreachable as exc:
        raise TaskRetry(f"{host_label(host)} is unreachable: {exc}") from None


def _read_failure(ctx: ActionContext, vm: dict[str, Any], host: dict[str, Any],
                  exc: libvirt.libvirtError) -> Exception:
    """A failed read of a domain: transient (retry) if the node or connection failed."""
    message = f"cannot read VM {vm['id']} on {host_label(host)}: {exc.get_error_message()}"
    if is_transient(exc):
        ctx.libvirt.drop(host["libvirt_uri"])
        return TaskRetry(message)
    return TaskFailed(message)


def observe(ctx: ActionContext, vm: dict[str, Any]) -> Observed:
    if vm["host_id"] is None:
        state = vm["state"] if vm["state"] in ROW_ONLY_STATES else "stopped"
        return Observed(state, f"VM {vm['id']} is not on any host", None, None)
    host = hosts_db.get_host(ctx.store, vm["host_id"])
    if host is None:  # the FK sets host_id NULL on delete; a race at most
        return Observed("stopped", f"host {vm['host_id']} no longer exists", None, None)
    conn = connect_host(ctx, host)
    try:
        domain = conn.lookupByUUIDString(vm["uuid"])
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            state = vm["state"] if vm["state"] in ROW_ONLY_STATES else "stopped"
            return Observed(state, f"no domain for VM {vm['id']} on {host_label(host)}", None, host)
        raise _read_failure(ctx, vm, host, exc) from None
    try:
        code = domain.state()[0]
    except libvirt.libvirtError as exc:
        raise _read_failure(ctx, vm, host, exc) from None
    state = domain_state(code)
    if state == "stopped" and vm["state"] in _SAVE_STATES and image_exists(conn, save_path(ctx, vm)):
        return Observed("saved", f"domain saved to {save_path(ctx, vm)} on {host_label(host)}", domain, host)
    return Observed(state, f"domain is {state} on {host_label(host)}", domain, host)


def save_path(ctx: ActionContext, vm: dict[str, Any]) -> str:
    """Where save_vm keeps a VM's memory image on its node: named after the VM, in save_dir."""
    return save_image_path(ctx.config.save_dir, vm["id"], vm["uuid"])


def image_exists(conn: libvirt.virConnect, path: str) -> bool:
    # The node's own view of the file: works for remote nodes too.
    try:
        conn.saveImageGetXMLDesc(path, 0)
        return True
    except libvirt.libvirtError:
        return False


def libvirt_failure(action: str, host: dict[str, Any] | None, exc: libvirt.libvirtError) -> str:
    where = f" on {host_label(host)}" if host else ""
    return f"{action} failed{where}: {exc.get_error_message()}"


def domain_spec(ctx: ActionContext, vm: dict[str, Any], host: dict[str, Any], with_disks: bool = True) -> DomainSpec:
    problem = name_problem(vm)
    if problem:
        raise TaskFailed(problem)
    disks = []
    for row in vms_db.vm_disks(ctx.store, vm["id"]) if with_disks else ():
        if row["path"] is None or row["state"] != "available":
            raise TaskFailed(f"VM {vm['id']}: disk volume {row['id']} ({row['name']!r}) is {row['state']}"
                             f"{' and has no path' if row['path'] is None else ''}; create or refresh it first")
        disks.append(Disk(row["path"], row["format"] or "raw"))
    return DomainSpec(
        name=domain_name(vm["description"]),
        uuid=vm["uuid"],
        memory_kib=int(vm["memory_allocated"]),
        vcpus=int(vm["num_vcpus_allocated"]),
        boot_device=vm["boot_device"],
        hypervisor_type=host["hypervisor_type"],
        arch=host.get("arch") or "x86_64",
        machine=ctx.config.machine_type,
        emulator=ctx.config.emulator,
        vnc_listen=ctx.config.vnc_listen,
        mac_address=vm.get("vnic_mac_addr"),
        network=ctx.config.nic_network,
        disks=tuple(disks),
    )


def running_updates(vm: dict[str, Any], observed: Observed) -> dict[str, Any]:
    values: dict[str, Any] = {
        "state": "running",
        "memory_used": vm["memory_allocated"],
        "num_vcpus_used": vm["num_vcpus_allocated"],
    }
    if observed.host is not None:
        values["host_id"] = observed.host["id"]
    if observed.domain is not None:
        try:
            values["vnc_port"] = vnc_port(observed.domain.XMLDesc(0))
        except libvirt.libvirtError:
            pass
    return values


def undefine_quietly(ctx: ActionContext, domain: libvirt.virDomain) -> None:
    """Remove an inactive definition, as a clean-up: skipped (not an error) once the lease is too old."""
    try:
        if not domain.isActive() and ctx.lease_ok():
            domain.undefine()
    except libvirt.libvirtError:
        pass


def found_as(ctx: ActionContext, observed: Observed) -> dict[str, Any]:
    """The row of a VM as an interrupted or failed task found it: a stopped VM holds no host any more.

    (A node crash loses the domain: row and node then agree on 'stopped', so the
    host-status pass would never clear the host.) A leftover definition goes, as in prepare.
    """
    if observed.state != "stopped":
        return {"state": observed.state}
    if observed.domain is not None:
        undefine_quietly(ctx, observed.domain)
    return {"state": "stopped", **NOT_RUNNING}


def delete_save_image(ctx: ActionContext, conn: libvirt.virConnect, path: str) -> None:
    """Remove a save image on its node through libvirt's storage API (works for remote nodes).

    The save directory is wrapped in a dir pool; a node whose driver has no
    real storage (the test driver) keeps the file, which is logged.
    """
    try:
        directory = posixpath.dirname(path)
        pool = None
        for candidate in conn.listAllStoragePools(0):
            if _pool_target(candidate) == directory:
                pool = candidate
                break
        if not ctx.lease_ok():
            log.info("save image %s not removed: the lease is too old to change the node", path)
            return
        if pool is None:
            pool = conn.storagePoolCreateXML(_save_pool_xml(directory), 0)
        pool.refresh(0)
        image = pool.storageVolLookupByName(posixpath.basename(path))
        if ctx.lease_ok():
            image.delete(0)
    except libvirt.libvirtError as exc:
        log.info("save image %s not removed: %s", path, exc.get_error_message())


def _pool_target(pool: libvirt.virStoragePool) -> str | None:
    import xml.etree.ElementTree as ET

    try:
        node = ET.fromstring(pool.XMLDesc(0)).find("target/path")
    except (libvirt.libvirtError, ET.ParseError):
        return None
    return node.text if node is not None else None


def _save_pool_xml(directory: str) -> str:
    import xml.etree.ElementTree as ET

    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = "taskomatic-save-" + directory.strip("/").replace("/", "-")
    target = ET.SubElement(pool, "target")
    ET.SubElement(target, "path").text = directory
    return ET.tostring(pool, encoding="unicode")
