"""Task timestamps follow the database's clock and the monotonic clock, never the wall clock's steps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from taskomatic.runtime import clock


class _ClockStore:
    """A store whose database clock reads ``moment``."""

    def __init__(self, moment: datetime) -> None:
        self.moment = moment
        self.rolled_back = False

    def scalar(self, name: str, /, **params: Any) -> Any:
        assert name == "database_clock" and not params
        return self.moment

    def rollback(self) -> None:
        self.rolled_back = True


@pytest.fixture(autouse=True)
def _fresh_anchor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock, "_anchor", None)


def test_before_anchoring_it_is_the_wall_clock() -> None:
    assert abs((clock.now() - datetime.now(UTC)).total_seconds()) < 1


def test_it_counts_from_the_database_clock_with_the_monotonic_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    database = datetime(2030, 1, 1, tzinfo=UTC)  # far from this machine's wall clock
    ticks = iter([100.0, 100.2, 130.2])  # the read took 0.2 s; then 30 s pass
    monkeypatch.setattr(clock.time, "monotonic", lambda: next(ticks))
    store = _ClockStore(database)
    clock.anchor(store)  # type: ignore[arg-type]
    assert store.rolled_back  # no transaction left open on the shard's connection
    assert clock.now() == database + timedelta(seconds=30.1)  # from the read's midpoint


def test_a_wall_clock_step_back_does_not_move_task_times_back(monkeypatch: pytest.MonkeyPatch) -> None:
    clock.anchor(_ClockStore(datetime.now(UTC)))  # type: ignore[arg-type]
    first = clock.now()

    class _SteppedBack(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return datetime.fromtimestamp(0, tz)

    monkeypatch.setattr(clock, "datetime", _SteppedBack)
    assert clock.now() >= first
