"""The host-status pass: make the database agree with the hypervisors.

Every ``reconcile_interval`` seconds (and once at start) it reads each node:
an unreachable host becomes ``unavailable`` and its VMs ``unreachable``; a
host that answers again becomes ``available``; each VM with no task running
gets the state its domain really has (running/blocked -> running, paused ->
suspended, shut off, crashed or gone -> stopped). A VM with a task in flight
is left to that task, and every correction re-checks that in the same
UPDATE, so the pass and the actions never argue over a row (the old daemon's
optimistic-lock fights). Interrupted tasks are not settled here: that is each
action's own reconcile.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import libvirt
import psycopg2

from taskomatic import metrics
from taskomatic.actions.connections import HostUnreachable, LibvirtConnections
from taskomatic.actions.libvirt_util import domain_state, is_transient, save_image_path
from taskomatic.config import Config
from taskomatic.db import hosts
from taskomatic.db import vms as vms_db
from taskomatic.db.storage_placement import forget_lost_save, idle_vms, record_vm_location
from taskomatic.db.store import Store
from taskomatic.logsetup import set_process_title, setup_logging
from taskomatic.retention import RetentionJob
from taskomatic.text import first_line

log = logging.getLogger(__name__)

# The database went away (restart, network): the supervisor replaces this process.
_CONNECTION_LOST = (psycopg2.OperationalError, psycopg2.InterfaceError)

# Row states the pass does not touch: they have no domain by design, or a
# stopped domain is expected (a saved VM keeps a stopped definition).
_LEAVE_ALONE = frozenset({"pending", "create_failed", "invalid", "saved"})
# Domain states that mean "the VM is here".
_ACTIVE = frozenset({"running", "suspended"})


@dataclass
class PassResult:
    hosts_down: int = 0
    hosts_up: int = 0
    corrections: int = 0


def reconcile_once(store: Store, connections: LibvirtConnections, save_dir: str | None = None) -> PassResult:
    result = PassResult()
    # Every idle VM's row before any node is read, to find domains running where their row
    # does not say (same guard as below: a row changed since then is left alone).
    everywhere = idle_vms(store)
    store.rollback()
    readings: list[HostReading] = []
    for host in hosts.all_hosts(store):
        # The rows before the node: a VM a task starts between the two reads then
        # shows as changed (updated_at) and is left alone, instead of being
        # "corrected" from a domain list older than its row.
        vms = vms_db.idle_vms_on_host(store, host["id"])
        store.rollback()
        domains = _read_domains(connections, host)
        metrics.node_seen(host["id"], host["hostname"], domains is not None)
        readings.append(HostReading(host, vms, domains))
    # A VM found running elsewhere is recorded there first: its own host's pass below would
    # otherwise call it stopped (its row has changed by then, so that correction is skipped).
    result.corrections += record_moved_vms(store, everywhere, readings)
    if save_dir is not None:
        result.corrections += forget_lost_saves(store, connections, everywhere, readings, save_dir)
    for host, vms, domains in readings:
        if domains is None:
            result.hosts_down += 1
            if hosts.set_host_state(store, host["id"], "unavailable"):
                log.warning("host %s (%s) is unreachable: marked unavailable", host["id"], host["hostname"])
            for vm in vms:
                if vm["state"] not in _LEAVE_ALONE | {"unreachable"}:
                    result.corrections += _correct(store, vm, "unreachable", clear_host=False,
                                                   why=f"host {host['id']} is unreachable")
            store.commit()
            continue
        result.hosts_up += 1
        if hosts.set_host_state(store, host["id"], "available"):
            log.info("host %s (%s) answers again: marked available", host["id"], host["hostname"])
        for vm in vms:
            if vm["state"] in _LEAVE_ALONE:
                continue
            real = domains.get(vm["uuid"], "stopped")
            if real != vm["state"]:
                result.corrections += _correct(store, vm, real, clear_host=real == "stopped",
                                               why=f"host {host['id']} reports it {real}")
        store.commit()
    return result


@dataclass
class HostReading:
    """One host as the pass read it: its idle VM rows, then its domains (None: unreachable)."""

    host: dict[str, Any]
    vms: list[dict[str, Any]]
    domains: dict[str, str] | None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.host, self.vms, self.domains))


def _label(row: dict[str, Any]) -> str:
    return f"host {row['id']} ({row['hostname']})"


def record_moved_vms(store: Store, rows: list[dict[str, Any]], readings: list[HostReading]) -> int:
    """A domain active on a host its VM's row does not name (moved outside taskomatic, a
    half-finished migration): record the VM where it really is. A VM with a task running is
    left to that task; one active on two hosts at once (a migration ending) waits for the next pass.
    """
    active: dict[str, list[tuple[dict[str, Any], str]]] = {}
    for reading in readings:
        for uuid, state in (reading.domains or {}).items():
            if state in _ACTIVE:
                active.setdefault(uuid, []).append((reading.host, state))
    hosts = {reading.host["id"]: reading.host for reading in readings}
    corrections = 0
    for vm in rows:
        places = active.get(vm["uuid"], [])
        if len(places) != 1 or places[0][0]["id"] == vm["host_id"]:
            continue
        host, state = places[0]
        if record_vm_location(store, vm["id"], host["id"], state, vm["updated_at"]):
            store.commit()
            was = _label(hosts[vm["host_id"]]) if vm["host_id"] in hosts else "no host"
            log.warning("VM %s (%s): its domain is %s on %s, but its row said %s on %s; recorded where it is",
                        vm["id"], vm["description"], state, _label(host), vm["state"], was)
            metrics.row_corrected(state)
            corrections += 1
        else:
            store.rollback()
    return corrections


def forget_lost_saves(store: Store, connections: LibvirtConnections, rows: list[dict[str, Any]],
                      readings: list[HostReading], save_dir: str) -> int:
    """A ``saved`` VM whose image is gone from its node is stopped (and its leftover definition removed)."""
    by_host = {reading.host["id"]: reading for reading in readings}
    corrections = 0
    for vm in rows:
        reading = by_host.get(vm["host_id"])
        if vm["state"] != "saved" or reading is None or reading.domains is None:
            continue
        if reading.domains.get(vm["uuid"]) in _ACTIVE:
            continue  # restored behind our back: not a lost image
        path = save_image_path(save_dir, vm["id"], vm["uuid"])
        try:
            conn = connections.get(reading.host["libvirt_uri"])
            if not _image_gone(conn, path):
                continue
        except (HostUnreachable, libvirt.libvirtError):
            continue  # the next pass looks again
        if not forget_lost_save(store, vm["id"], vm["updated_at"]):
            store.rollback()
            continue
        store.commit()
        log.warning("VM %s (%s) was saved on %s, but its image %s is gone: now stopped, on no host",
                    vm["id"], vm["description"], _label(reading.host), path)
        metrics.row_corrected("stopped")
        corrections += 1
        _undefine_leftover(conn, vm["uuid"])
    return corrections


def _image_gone(conn: libvirt.virConnect, path: str) -> bool:
    """True only when the node says the file does not exist (not for an unsupported call or a node fault)."""
    try:
        conn.saveImageGetXMLDesc(path, 0)
        return False
    except libvirt.libvirtError as exc:
        return exc.get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR and "No such file" in (exc.get_error_message()
                                                                                           or "")


def _undefine_leftover(conn: libvirt.virConnect, uuid: str) -> None:
    """The stopped definition a saved VM kept on its node: without its image it is only clutter."""
    try:
        for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE):
            if domain.UUIDString() == uuid:
                domain.undefine()
    except libvirt.libvirtError as exc:
        log.info("could not remove the leftover definition of %s: %s", uuid, exc.get_error_message())


def _read_domains(connections: LibvirtConnections, host: dict[str, Any]) -> dict[str, str] | None:
    """uuid -> oVirt state of every domain on the host; None if the host cannot be read.

    A connection kept from an earlier pass that fails as the node's or the network's fault is
    dropped and the host read once more on a new one before it counts as down: the node may have
    closed it meanwhile (it restarted, or this process was frozen longer than the node's keepalive,
    which is how a node fences a frozen instance), and a host marked unavailable for that would
    hold every placement back until the next pass.
    """
    uri = host["libvirt_uri"]
    kept = connections.is_open(uri)
    for attempt in (1, 2):
        try:
            return _list_domains(connections.get(uri))
        except HostUnreachable:
            return None
        except libvirt.libvirtError as exc:
            connections.drop(uri)
            if attempt == 1 and kept and is_transient(exc):
                continue
            if not is_transient(exc):
                log.warning("cannot list the domains of host %s: %s", host["id"], exc.get_error_message())
            return None
    return None


def _list_domains(conn: libvirt.virConnect) -> dict[str, str]:
    found = {}
    for domain in conn.listAllDomains(0):
        try:
            found[domain.UUIDString()] = domain_state(domain.state()[0])
        except libvirt.libvirtError as exc:
            # Undefined between the listing and this call (a task's work): it is gone, not
            # the host. Left out, so its VM reads as stopped unless its row changed meanwhile.
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
    return found


def _correct(store: Store, vm: dict[str, Any], new_state: str, clear_host: bool, why: str) -> int:
    changed = vms_db.correct_vm(store, vm["id"], old_state=vm["state"], new_state=new_state, clear_host=clear_host,
                                seen=vm["updated_at"])
    if changed:
        log.info("VM %s: row said %s, now %s (%s)", vm["id"], vm["state"], new_state, why)
        metrics.row_corrected(new_state)
        return 1
    return 0


class Reconciler:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.stop = False
        self.store = Store.open(config.dsn, "taskomatic reconciler", config.connect_timeout)
        self.connections = LibvirtConnections(config.keepalive_interval, config.keepalive_count)
        # Ended tasks leave the tasks table here, off the shards' and the fetcher's path.
        self.retention = RetentionJob(config)

    def _record_signal(self, signum: int, _frame: object) -> None:
        self.stop = True

    def serve(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._record_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        next_pass = time.monotonic()
        while not self.stop:
            if time.monotonic() >= next_pass:
                result = reconcile_once(self.store, self.connections, self.config.save_dir)
                log.debug("host-status pass: %d hosts up, %d down, %d corrections",
                          result.hosts_up, result.hosts_down, result.corrections)
                next_pass = time.monotonic() + self.config.reconcile_interval
            self.retention.run_if_due(self.store, lambda: self.stop)
            time.sleep(min(0.5, max(0.0, next_pass - time.monotonic())))  # timer, not synchronisation
        return 0


def reconciler_main(config: Config) -> None:
    setup_logging(config.log_level, role="reconciler")
    set_process_title("taskomatic: reconciler")
    try:
        reconciler = Reconciler(config)
    except KeyboardInterrupt:
        # The supervisor stops its processes fast (SIGINT) while this one was still connecting,
        # e.g. to rejoin after a lost lease: nothing to clean up, nothing to report.
        raise SystemExit(0) from None
    except _CONNECTION_LOST as exc:
        log.error("reconciler cannot reach the database (%s); exiting to be restarted", first_line(exc))
        raise SystemExit(3) from None
    except Exception:
        log.exception("reconciler failed to start")
        raise SystemExit(3) from None
    try:
        code = reconciler.serve()
    except _CONNECTION_LOST as exc:
        # Expected when the database restarts or is cut off: one line, no traceback.
        log.error("reconciler lost its database connection (%s); exiting to be replaced", first_line(exc))
        raise SystemExit(1) from None
    raise SystemExit(code)
