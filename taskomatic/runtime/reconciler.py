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
from dataclasses import dataclass
from typing import Any

import libvirt
import psycopg2

from taskomatic import metrics
from taskomatic.actions.connections import HostUnreachable, LibvirtConnections
from taskomatic.actions.libvirt_util import domain_state, is_transient
from taskomatic.config import Config
from taskomatic.db import hosts
from taskomatic.db import vms as vms_db
from taskomatic.db.store import Store
from taskomatic.logsetup import set_process_title, setup_logging
from taskomatic.text import first_line

log = logging.getLogger(__name__)

# The database went away (restart, network): the supervisor replaces this process.
_CONNECTION_LOST = (psycopg2.OperationalError, psycopg2.InterfaceError)

# Row states the pass does not touch: they have no domain by design, or a
# stopped domain is expected (a saved VM keeps a stopped definition).
_LEAVE_ALONE = frozenset({"pending", "create_failed", "invalid", "saved"})


@dataclass
class PassResult:
    hosts_down: int = 0
    hosts_up: int = 0
    corrections: int = 0


def reconcile_once(store: Store, connections: LibvirtConnections) -> PassResult:
    result = PassResult()
    for host in hosts.all_hosts(store):
        # The rows before the node: a VM a task starts between the two reads then
        # shows as changed (updated_at) and is left alone, instead of being
        # "corrected" from a domain list older than its row.
        vms = vms_db.idle_vms_on_host(store, host["id"])
        store.rollback()
        domains = _read_domains(connections, host)
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


def _read_domains(connections: LibvirtConnections, host: dict[str, Any]) -> dict[str, str] | None:
    """uuid -> oVirt state of every domain on the host; None if the host cannot be read."""
    try:
        conn = connections.get(host["libvirt_uri"])
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
    except HostUnreachable:
        return None
    except libvirt.libvirtError as exc:
        connections.drop(host["libvirt_uri"])
        if not is_transient(exc):
            log.warning("cannot list the domains of host %s: %s", host["id"], exc.get_error_message())
        return None


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

    def _record_signal(self, signum: int, _frame: object) -> None:
        self.stop = True

    def serve(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._record_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        next_pass = time.monotonic()
        while not self.stop:
            if time.monotonic() >= next_pass:
                result = reconcile_once(self.store, self.connections)
                log.debug("host-status pass: %d hosts up, %d down, %d corrections",
                          result.hosts_up, result.hosts_down, result.corrections)
                next_pass = time.monotonic() + self.config.reconcile_interval
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
