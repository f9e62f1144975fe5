"""The oVirt VM state machine (see shared/reference/ovirt-model.md)."""

from __future__ import annotations

from dataclasses import dataclass

VM_STATES = frozenset({
    "pending", "creating", "running", "unreachable", "powering_off", "stopping", "stopped",
    "starting", "suspending", "suspended", "resuming", "saving", "saved", "restoring",
    "migrating", "create_failed", "invalid",
})

# What a transient state means once the work behind it is over or lost.
EFFECTIVE_STATE = {
    "creating": "stopped",
    "starting": "running",
    "stopping": "stopped",
    "powering_off": "stopped",
    "suspending": "suspended",
    "resuming": "running",
    "saving": "saved",
    "restoring": "running",
    "migrating": "running",
}


@dataclass(frozen=True)
class StateTransition:
    """An action's states: needs ``start``, shows ``transient`` while it runs."""

    start: str
    transient: str
    success: str
    failure: str


VM_TRANSITIONS: dict[str, StateTransition] = {
    "create_vm": StateTransition("pending", "creating", "stopped", "create_failed"),
    "start_vm": StateTransition("stopped", "starting", "running", "stopped"),
    "shutdown_vm": StateTransition("running", "stopping", "stopped", "running"),
    "poweroff_vm": StateTransition("running", "powering_off", "stopped", "running"),
    "suspend_vm": StateTransition("running", "suspending", "suspended", "running"),
    "resume_vm": StateTransition("suspended", "resuming", "running", "suspended"),
    "save_vm": StateTransition("running", "saving", "saved", "running"),
    "restore_vm": StateTransition("saved", "restoring", "running", "saved"),
    "migrate_vm": StateTransition("running", "migrating", "running", "running"),
}


def effective_state(state: str) -> str:
    return EFFECTIVE_STATE.get(state, state)


class Verdict:
    """What to do with an action given the VM's real state."""

    RUN = "run"
    ALREADY_DONE = "already_done"
    IMPOSSIBLE = "impossible"


def precondition(action: str, real_state: str) -> str:
    """RUN, ALREADY_DONE (no-op success) or IMPOSSIBLE for ``action`` from ``real_state``."""
    transition = VM_TRANSITIONS[action]
    if real_state == transition.start:
        return Verdict.RUN
    if real_state == transition.success and action != "migrate_vm":
        return Verdict.ALREADY_DONE
    return Verdict.IMPOSSIBLE
