"""The clock that stamps tasks: the database's, carried forward by the monotonic clock.

``time_started`` and ``time_ended`` are taken in the shards where an action
really starts and ends, and per-key order is checked from SQL on them. Taken
from the node's wall clock, a step back (NTP, an operator, a VM resumed) made a
task seem to start before its predecessor ended (found by the clock_step
fault). So each shard reads the database server's clock once, when it
connects, and from then on counts with CLOCK_MONOTONIC, which never steps.
Every shard of every instance then stamps on one reference, the one the
multihost leases use too; the anchor's error is at most half the round trip
of the read that took it.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

from taskomatic.db import task_writes
from taskomatic.db.store import Store

log = logging.getLogger(__name__)

_anchor: tuple[datetime, float] | None = None  # (database time, monotonic time) of the same instant


def anchor(store: Store) -> None:
    """Read the database's clock on ``store`` and stamp tasks from it from now on."""
    global _anchor
    before = time.monotonic()
    moment = task_writes.database_clock(store)
    after = time.monotonic()
    store.rollback()
    _anchor = (moment, (before + after) / 2)
    skew = (moment - datetime.now(UTC)).total_seconds()
    if abs(skew) > 1.0:
        log.warning("this node's wall clock is %.1f s %s the database's; tasks are timed by the database's",
                    abs(skew), "behind" if skew > 0 else "ahead of")


def now() -> datetime:
    """The time to stamp on a task: the database's clock (the wall clock before anchor() ran)."""
    if _anchor is None:
        return datetime.now(UTC)
    moment, mono = _anchor
    return moment + timedelta(seconds=time.monotonic() - mono)
