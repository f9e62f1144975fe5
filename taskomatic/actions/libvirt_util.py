"""Facts about libvirt the actions and the runtime share: domain states, transient errors, safe URIs.

No action logic here, and no import of any action module, so the runtime
(reconciler, connections) can use these without pulling the actions in.
"""

from __future__ import annotations

import posixpath
from urllib.parse import parse_qsl, urlsplit

import libvirt

from taskomatic.text import quoted

# libvirt domain state -> oVirt VM state. SHUTDOWN means "being shut down":
# the guest still runs.
_DOMAIN_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "stopped",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "suspended",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",
    libvirt.VIR_DOMAIN_SHUTOFF: "stopped",
    libvirt.VIR_DOMAIN_CRASHED: "stopped",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


def save_image_path(save_dir: str, vm_id: int, vm_uuid: str) -> str:
    """Where save_vm keeps a VM's memory image on its node: named after the VM, in save_dir."""
    return posixpath.join(save_dir, f"taskomatic-vm{vm_id}-{vm_uuid}.save")


def domain_state(code: int) -> str:
    """The oVirt VM state of a libvirt domain state code (an unknown code reads as stopped)."""
    return _DOMAIN_STATES.get(code, "stopped")


# libvirt errors that say "the node or the way to it failed", not "this request is wrong".
# A system error counts only when it comes from the RPC/remote layer (connection
# refused, reset, keepalive timeout): a file the node cannot create is permanent.
_TRANSIENT_CODES = frozenset({
    libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_ERR_OPERATION_TIMEOUT,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE,
})
_TRANSIENT_DOMAINS = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE})


def is_transient(exc: libvirt.libvirtError) -> bool:
    return exc.get_error_code() in _TRANSIENT_CODES or exc.get_error_domain() in _TRANSIENT_DOMAINS


# libvirt URI parts that make the client run a program: the ext transport runs ``command``
# locally, ssh runs ``command`` (its ssh binary) locally and ``netcat`` on the node.
_EXEC_TRANSPORTS = frozenset({"ext"})
_EXEC_PARAMETERS = frozenset({"command", "netcat"})


def libvirt_uri_problem(uri: str) -> str | None:
    """Why taskomatic must not open ``uri`` (None if it may).

    ``hosts.libvirt_uri`` is data anyone who may insert a host row controls;
    opening it must not run a program of their choosing.
    """
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        return f"libvirt_uri {quoted(uri)} is not a URI: {exc}"
    transport = parts.scheme.partition("+")[2].lower()
    if transport in _EXEC_TRANSPORTS:
        return (f"libvirt_uri {quoted(uri)} uses the {transport!r} transport, which runs a local command; "
                "refused (use unix, tcp, tls or ssh)")
    risky = sorted({name.lower() for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
                   & _EXEC_PARAMETERS)
    if risky:
        return (f"libvirt_uri {quoted(uri)} sets {', '.join(risky)}, which names a program to run; refused "
                "(configure ssh in ~/.ssh/config instead)")
    return None
