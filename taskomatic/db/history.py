"""A fleet's history, read for capacity planning (``taskomatic plan``).

Each function runs one named query of ``sql/history.sql``; :func:`read_history`
runs them all in one read-only transaction (one snapshot: the figures agree with
each other) and ends it. Nothing here writes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from taskomatic.db.store import Row, Store


@dataclass(frozen=True)
class History:
    """What the tasks table says about a window [since, until)."""

    since: dt.datetime
    until: dt.datetime
    bucket_s: float
    window: Row  # tasks, first_created, last_created, database_now
    actions: list[Row]  # action, tasks, ran, run_mean_s, run_sd_s, run_max_s, wait_mean_s, wait_p95_s
    buckets: list[Row]  # bucket_start, tasks
    key_actions: list[Row]  # key_type, key_id, action, tasks


def window_summary(store: Store, since: dt.datetime, until: dt.datetime) -> Row:
    return store.one("history_window", since=since, until=until) or {}


def action_stats(store: Store, since: dt.datetime, until: dt.datetime) -> list[Row]:
    return store.all("history_actions", since=since, until=until)


def arrivals_per_bucket(store: Store, since: dt.datetime, until: dt.datetime, bucket_s: float) -> list[Row]:
    return store.all("history_rate_buckets", since=since, until=until, bucket_s=bucket_s)


def tasks_per_key_and_action(store: Store, since: dt.datetime, until: dt.datetime) -> list[Row]:
    return store.all("history_key_actions", since=since, until=until)


def read_history(store: Store, since: dt.datetime, until: dt.datetime, bucket_s: float) -> History:
    """Every figure of the window from one read-only snapshot; the transaction is rolled back after."""
    conn = store.conn
    # psycopg2 reports the server's defaults as None; "DEFAULT" sets them back.
    previous = ("DEFAULT" if conn.readonly is None else conn.readonly,
                "DEFAULT" if conn.isolation_level is None else conn.isolation_level, conn.autocommit)
    conn.rollback()
    conn.set_session(readonly=True, isolation_level="REPEATABLE READ", autocommit=False)
    try:
        return History(since=since, until=until, bucket_s=bucket_s,
                       window=window_summary(store, since, until), actions=action_stats(store, since, until),
                       buckets=arrivals_per_bucket(store, since, until, bucket_s),
                       key_actions=tasks_per_key_and_action(store, since, until))
    finally:
        conn.rollback()
        conn.set_session(readonly=previous[0], isolation_level=previous[1], autocommit=previous[2])
