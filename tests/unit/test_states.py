"""The oVirt VM state machine, checked against reference/ovirt-model.md written out by hand."""

from __future__ import annotations

import pytest

from taskomatic.actions.states import (
    EFFECTIVE_STATE,
    VM_STATES,
    VM_TRANSITIONS,
    StateTransition,
    Verdict,
    effective_state,
    precondition,
)

# reference/ovirt-model.md, "VM actions: start, transient, success, failure state".
OVIRT_TABLE = {
    # action:        (start,       transient,      success,     failure)
    "create_vm": ("pending", "creating", "stopped", "create_failed"),
    "start_vm": ("stopped", "starting", "running", "stopped"),
    "shutdown_vm": ("running", "stopping", "stopped", "running"),
    "poweroff_vm": ("running", "powering_off", "stopped", "running"),
    "suspend_vm": ("running", "suspending", "suspended", "running"),
    "resume_vm": ("suspended", "resuming", "running", "suspended"),
    "save_vm": ("running", "saving", "saved", "running"),
    "restore_vm": ("saved", "restoring", "running", "saved"),
    "migrate_vm": ("running", "migrating", "running", "running"),
}

# reference/ovirt-model.md, "VM states".
OVIRT_VM_STATES = {
    "pending", "creating", "running", "unreachable", "powering_off", "stopping", "stopped",
    "starting", "suspending", "suspended", "resuming", "saving", "saved", "restoring",
    "migrating", "create_failed", "invalid",
}

# reference/ovirt-model.md, "Effective state of a transient one".
OVIRT_EFFECTIVE = {
    "creating": "stopped", "starting": "running", "stopping": "stopped", "powering_off": "stopped",
    "suspending": "suspended", "resuming": "running", "saving": "saved", "restoring": "running",
    "migrating": "running",
}

# DESIGN.md, "Action catalogue", VM part.
VM_CATALOGUE = {"create_vm", "start_vm", "shutdown_vm", "poweroff_vm", "suspend_vm", "resume_vm",
                "save_vm", "restore_vm", "migrate_vm"}


def test_catalogue_has_exactly_the_vm_actions() -> None:
    assert set(VM_TRANSITIONS) == VM_CATALOGUE == set(OVIRT_TABLE)


@pytest.mark.parametrize("action", sorted(OVIRT_TABLE))
def test_transition_matches_ovirt_table(action: str) -> None:
    start, transient, success, failure = OVIRT_TABLE[action]
    assert VM_TRANSITIONS[action] == StateTransition(start, transient, success, failure)
    t = VM_TRANSITIONS[action]
    assert (t.start, t.transient, t.success, t.failure) == (start, transient, success, failure)


def test_vm_states_match_ovirt() -> None:
    assert set(VM_STATES) == OVIRT_VM_STATES


def test_every_state_in_the_table_is_a_vm_state() -> None:
    for t in VM_TRANSITIONS.values():
        assert {t.start, t.transient, t.success, t.failure} <= VM_STATES


def test_effective_state_table_matches_ovirt() -> None:
    assert EFFECTIVE_STATE == OVIRT_EFFECTIVE


@pytest.mark.parametrize("transient, settled", sorted(OVIRT_EFFECTIVE.items()))
def test_effective_state_of_transient(transient: str, settled: str) -> None:
    assert effective_state(transient) == settled


@pytest.mark.parametrize("state", sorted(OVIRT_VM_STATES - set(OVIRT_EFFECTIVE)))
def test_effective_state_of_settled_state_is_itself(state: str) -> None:
    assert effective_state(state) == state


def test_effective_state_of_unknown_text_is_itself() -> None:
    assert effective_state("weird") == "weird"


@pytest.mark.parametrize("action", sorted(OVIRT_TABLE))
def test_transient_state_settles_to_success(action: str) -> None:
    _, transient, success, _ = OVIRT_TABLE[action]
    assert effective_state(transient) == success


def test_transient_states_are_distinct() -> None:
    transients = [t.transient for t in VM_TRANSITIONS.values()]
    assert len(transients) == len(set(transients))


# -- precondition ------------------------------------------------------------------


@pytest.mark.parametrize("action, state, verdict", [
    ("start_vm", "stopped", Verdict.RUN),
    ("start_vm", "running", Verdict.ALREADY_DONE),
    ("start_vm", "suspended", Verdict.IMPOSSIBLE),
    ("start_vm", "saved", Verdict.IMPOSSIBLE),
    ("start_vm", "pending", Verdict.IMPOSSIBLE),
    ("shutdown_vm", "running", Verdict.RUN),
    ("shutdown_vm", "stopped", Verdict.ALREADY_DONE),
    ("shutdown_vm", "suspended", Verdict.IMPOSSIBLE),
    ("poweroff_vm", "running", Verdict.RUN),
    ("poweroff_vm", "stopped", Verdict.ALREADY_DONE),
    ("suspend_vm", "running", Verdict.RUN),
    ("suspend_vm", "suspended", Verdict.ALREADY_DONE),
    ("suspend_vm", "stopped", Verdict.IMPOSSIBLE),
    ("resume_vm", "suspended", Verdict.RUN),
    ("resume_vm", "running", Verdict.ALREADY_DONE),
    ("resume_vm", "stopped", Verdict.IMPOSSIBLE),
    ("save_vm", "running", Verdict.RUN),
    ("save_vm", "saved", Verdict.ALREADY_DONE),
    ("save_vm", "suspended", Verdict.IMPOSSIBLE),
    ("restore_vm", "saved", Verdict.RUN),
    ("restore_vm", "running", Verdict.ALREADY_DONE),
    ("restore_vm", "stopped", Verdict.IMPOSSIBLE),
    ("create_vm", "pending", Verdict.RUN),
    ("create_vm", "stopped", Verdict.ALREADY_DONE),
    ("create_vm", "running", Verdict.IMPOSSIBLE),
    # A migration's start and success state are both 'running': it must run, not be skipped.
    ("migrate_vm", "running", Verdict.RUN),
    ("migrate_vm", "stopped", Verdict.IMPOSSIBLE),
    ("migrate_vm", "suspended", Verdict.IMPOSSIBLE),
])
def test_precondition_examples(action: str, state: str, verdict: str) -> None:
    assert precondition(action, state) == verdict


@pytest.mark.parametrize("action", sorted(OVIRT_TABLE))
@pytest.mark.parametrize("state", sorted(OVIRT_VM_STATES))
def test_precondition_over_every_state(action: str, state: str) -> None:
    start, _, success, _ = OVIRT_TABLE[action]
    if state == start:
        expected = Verdict.RUN
    elif state == success:
        expected = Verdict.ALREADY_DONE
    else:
        expected = Verdict.IMPOSSIBLE
    assert precondition(action, state) == expected


@pytest.mark.parametrize("action", sorted(OVIRT_TABLE))
def test_transient_and_unknown_real_states_are_impossible(action: str) -> None:
    # The real state never reads as a transient one; if it does, do not act on it.
    for state in ("unreachable", "invalid", "create_failed", "nostate"):
        if state != OVIRT_TABLE[action][0]:
            assert precondition(action, state) == Verdict.IMPOSSIBLE


def test_precondition_of_unknown_action_raises() -> None:
    with pytest.raises(KeyError):
        precondition("explode_vm", "running")


def test_verdicts_are_distinct() -> None:
    assert len({Verdict.RUN, Verdict.ALREADY_DONE, Verdict.IMPOSSIBLE}) == 3
