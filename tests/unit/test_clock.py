"""Task timestamps: one anchor per instance, carried by the monotonic clock, never the wall clock's steps."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest

from taskomatic.runtime import clock


@pytest.fixture(autouse=True)
def _fresh_anchor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock, "_anchor", None)
    monkeypatch.delenv(clock.ENV, raising=False)


def test_without_a_supervisor_it_reads_like_the_wall_clock() -> None:
    assert abs((clock.now() - datetime.now(UTC)).total_seconds()) < 1


def test_it_counts_from_the_anchor_with_the_monotonic_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    anchor = datetime(2030, 1, 1, tzinfo=UTC)  # far from this machine's wall clock
    monkeypatch.setenv(clock.ENV, f"{anchor.timestamp()!r}:100.0")
    monkeypatch.setattr(clock.time, "monotonic", lambda: 130.5)
    assert clock.now() == anchor + timedelta(seconds=30.5)


def test_a_wall_clock_step_back_does_not_move_task_times_back(monkeypatch: pytest.MonkeyPatch) -> None:
    clock.anchor_for_children()
    first = clock.now()
    monkeypatch.setattr(clock.time, "time", lambda: 0.0)  # the wall clock stepped back to 1970
    assert clock.now() >= first


def test_children_count_from_the_supervisors_anchor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes of one instance stamp on one time base (a child reads the anchor from its environment)."""
    clock.anchor_for_children()
    code = "from taskomatic.runtime import clock; import time; print(repr(clock.now().timestamp() - time.time()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                         env={**os.environ, clock.ENV: f"{clock._anchor[0] - 3600!r}:{clock._anchor[1]!r}"})  # type: ignore[index]
    # The child used the anchor it was given (an hour behind this wall clock), not its own wall clock.
    assert abs(float(out.stdout) + 3600) < 5


def test_the_anchor_is_in_the_environment_for_children() -> None:
    clock.anchor_for_children()
    wall, mono = (float(part) for part in os.environ[clock.ENV].split(":"))
    assert abs(wall - time.time()) < 5 and abs(mono - time.monotonic()) < 5
