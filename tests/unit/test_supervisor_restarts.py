"""The supervisor's restart logic in process: which dead child is respawned, when, and when it gives up.

No real processes: children get fake process objects, and the supervisor's
spawn is replaced by one that records the slot it restarts.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import pytest

from taskomatic.config import Config
from taskomatic.exitcodes import EXIT_CHILD_FAILING, EXIT_OK
from taskomatic.runtime.children import (
    CHILD_BOOT_SECONDS,
    MAX_BOOT_FAILURES,
    Child,
    children_to_respawn,
    note_death,
)
from taskomatic.runtime.supervisor import STOP_SIGNAL_REPEAT, Supervisor


@dataclass
class FakeProcess:
    """A child process that has already exited (its sentinel fired)."""

    pid: int
    exitcode: int | None = 1
    sentinel: int = -1

    def join(self, timeout: float | None = None) -> None:
        pass


def test_a_child_that_ran_a_while_is_respawned_at_once() -> None:
    child = Child("shard", 3, boot_failures=2)
    note_death(child, lived=CHILD_BOOT_SECONDS + 60, now=100.0)
    assert child.boot_failures == 0 and child.respawn_at == 100.0


def test_a_child_dying_at_boot_is_respawned_after_a_growing_delay() -> None:
    child = Child("shard", 1)
    delays = []
    for _ in range(4):
        note_death(child, lived=0.1, now=100.0)
        delays.append(child.respawn_at - 100.0)
    assert child.boot_failures == 4
    assert delays == sorted(delays) and delays[0] > 0 and delays[-1] > delays[0]


def test_only_dead_children_that_are_due_are_respawned_in_slot_order() -> None:
    alive = Child("fetcher", 0, process=FakeProcess(1))
    later = Child("shard", 0, respawn_at=50.0)
    now_a = Child("shard", 1, respawn_at=5.0)
    now_b = Child("reconciler", 0)
    due, failing = children_to_respawn([alive, later, now_a, now_b], now=10.0)
    assert due == [now_a, now_b] and failing is None


def test_a_child_failing_at_boot_too_often_is_given_up() -> None:
    fine = Child("fetcher", 0)
    failing = Child("shard", 2, boot_failures=MAX_BOOT_FAILURES)
    after = Child("reconciler", 0)
    due, gave_up = children_to_respawn([fine, failing, after], now=10.0)
    assert due == [fine] and gave_up is failing


@pytest.fixture
def supervisor(monkeypatch: pytest.MonkeyPatch) -> Supervisor:
    sup = Supervisor(Config(shards=2))
    sup.children = [Child("fetcher", 0), Child("shard", 0), Child("shard", 1), Child("reconciler", 0)]
    spawned: list[tuple[str, int]] = []
    clock = {"now": 1000.0}
    monkeypatch.setattr("taskomatic.runtime.supervisor.time.monotonic", lambda: clock["now"])
    pids = iter(range(10_000_000, 20_000_000))  # never signalled: the children are all dead when it acts

    def spawn(child: Child) -> None:
        child.process = FakeProcess(next(pids))
        child.started_at = clock["now"]
        spawned.append((child.role, child.slot))

    monkeypatch.setattr(sup, "_spawn", spawn)
    monkeypatch.setattr(sup, "_signal_children", lambda *args, **kwargs: None)
    sup.spawned = spawned  # type: ignore[attr-defined]
    sup.clock = clock  # type: ignore[attr-defined]
    return sup


def test_a_dead_shard_is_respawned_in_the_same_slot(supervisor: Supervisor) -> None:
    supervisor._keep_children_up(supervisor.clock["now"])  # type: ignore[attr-defined]
    assert supervisor.spawned == [("fetcher", 0), ("shard", 0), ("shard", 1), ("reconciler", 0)]  # type: ignore[attr-defined]
    supervisor.spawned.clear()  # type: ignore[attr-defined]
    supervisor.clock["now"] += 600  # type: ignore[attr-defined]
    shard1 = supervisor.children[2]
    supervisor._reap(shard1)
    assert shard1.process is None
    supervisor._keep_children_up(supervisor.clock["now"])  # type: ignore[attr-defined]
    assert supervisor.spawned == [("shard", 1)]  # type: ignore[attr-defined]
    assert shard1.process is not None and shard1.boot_failures == 0
    assert supervisor.exit_code == EXIT_OK and supervisor.stopping is None


def test_a_child_dying_at_boot_repeatedly_stops_the_supervisor_with_child_failing(supervisor: Supervisor) -> None:
    clock = supervisor.clock  # type: ignore[attr-defined]
    supervisor._keep_children_up(clock["now"])
    shard0 = supervisor.children[1]
    for _ in range(MAX_BOOT_FAILURES):
        clock["now"] += 0.1  # dies right after its start
        supervisor._reap(shard0)
        assert shard0.process is None and supervisor.stopping is None
        clock["now"] = shard0.respawn_at
        supervisor._keep_children_up(clock["now"])
    assert shard0.boot_failures == MAX_BOOT_FAILURES
    assert supervisor.exit_code == EXIT_CHILD_FAILING
    assert supervisor.stopping == "fast"
    assert supervisor.spawned.count(("shard", 0)) == MAX_BOOT_FAILURES  # type: ignore[attr-defined]


@pytest.mark.parametrize("stop", ["rejoin", "fast"])
def test_a_child_that_missed_the_stop_signal_gets_it_again(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    """A shard respawned just before a rejoin (or a fast stop) may miss SIGINT while it starts: the
    supervisor sends it again each STOP_SIGNAL_REPEAT until the child is gone, not only at the deadline's kill."""
    clock = supervisor.clock  # type: ignore[attr-defined]
    supervisor._keep_children_up(clock["now"])
    sent: list[int] = []
    monkeypatch.setattr(supervisor, "_signal_children", lambda signum, **kwargs: sent.append(signum))
    if stop == "rejoin":
        supervisor._begin_rejoin()
    else:
        supervisor._begin_fast_stop("test")
    assert sent == [signal.SIGINT]
    alive = [c for c in supervisor.children if c.process is not None]
    supervisor._repeat_stop_signal(clock["now"] + STOP_SIGNAL_REPEAT / 2, alive)
    assert sent == [signal.SIGINT], "sent again before the interval"
    clock["now"] += STOP_SIGNAL_REPEAT
    supervisor._repeat_stop_signal(clock["now"], alive)
    assert sent == [signal.SIGINT, signal.SIGINT]
    assert clock["now"] < supervisor.stop_deadline, "the repeat comes before the kill at the deadline"
    clock["now"] += STOP_SIGNAL_REPEAT
    supervisor._repeat_stop_signal(clock["now"], [])  # every child gone: nothing more to send
    assert sent == [signal.SIGINT, signal.SIGINT]


def test_no_stop_signal_is_repeated_while_running_or_draining(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = supervisor.clock  # type: ignore[attr-defined]
    supervisor._keep_children_up(clock["now"])
    sent: list[int] = []
    monkeypatch.setattr(supervisor, "_signal_children", lambda signum, **kwargs: sent.append(signum))
    alive = [c for c in supervisor.children if c.process is not None]
    supervisor._repeat_stop_signal(clock["now"] + 100, alive)
    supervisor.stopping = "drain"  # a drain lets the shards finish their task: no SIGINT
    supervisor._repeat_stop_signal(clock["now"] + 200, alive)
    assert sent == []
