"""The clock that stamps tasks: the wall clock read once per instance, carried forward by CLOCK_MONOTONIC.

``time_started`` and ``time_ended`` are taken in the shards where an action
really starts and ends, and per-key order is checked from SQL on them. Read
from the wall clock at each stamp, a step back (NTP, an operator, a VM
resumed) made a task seem to start before its predecessor ended (found by the
clock_step fault). So the supervisor reads the wall clock once, before any
child starts, and hands that instant to its children in the environment;
every process of the instance then stamps anchor + (monotonic now - monotonic
then). CLOCK_MONOTONIC is one clock for the whole machine and never steps (NTP
slews it as it slews the wall clock), so the processes of an instance agree to
the microsecond, and so do instances started on one machine with no step in
between; across machines it is as good as their clock sync, as before.

(Anchoring each shard on the database's clock instead put up to half a round
trip of error between two shards, more under load: a task could seem to start
a fraction of a millisecond before its predecessor on another shard ended.)
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

ENV = "TASKOMATIC_CLOCK_ANCHOR"

_anchor: tuple[float, float] | None = None  # (wall seconds since the epoch, monotonic seconds), one instant


def anchor_for_children() -> None:
    """Supervisor, before any child starts: the one instant every process of this instance counts from."""
    global _anchor
    _anchor = (time.time(), time.monotonic())
    os.environ[ENV] = f"{_anchor[0]!r}:{_anchor[1]!r}"


def _current() -> tuple[float, float]:
    global _anchor
    if _anchor is None:
        given = os.environ.get(ENV, "")
        try:
            wall, mono = (float(part) for part in given.split(":"))
            _anchor = (wall, mono)
        except ValueError:  # not started by a supervisor (a tool, a test): this process's own anchor
            _anchor = (time.time(), time.monotonic())
    return _anchor


def now() -> datetime:
    """The time to stamp on a task."""
    wall, mono = _current()
    return datetime.fromtimestamp(wall + (time.monotonic() - mono), UTC)
