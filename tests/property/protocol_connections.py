"""The database sessions of the stateful partition-lease protocol test.

One autocommit session for submits, the lease clock and invariant reads, one
for writes an invariant tries and rolls back, and one per simulated machine:
an instance's transactions are its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg2

from taskomatic.db.store import Store


@dataclass
class Connections:
    admin: Store  # autocommit: submits, the lease clock, the invariant reads
    probe: Store  # writes the invariants try and roll back
    hosts: list[Store]  # one per machine: an instance's transactions are its own


def _connect(dsn: str, application_name: str, begin_with_first: bool = False) -> Store:
    # A query that blocks on a lock is a finding, not a hang.
    conn = psycopg2.connect(dsn, application_name=application_name,
                            options="-c statement_timeout=10000 -c lock_timeout=5000")
    return Store(conn, begin_with_first=begin_with_first)


@contextmanager
def protocol_connections(dsn: str, hosts: int, application_name: str) -> Iterator[Connections]:
    conns = Connections(_connect(dsn, application_name), _connect(dsn, application_name),
                        # an instance's connections, as its fetcher and shards open them
                        [_connect(dsn, application_name, begin_with_first=True) for _ in range(hosts)])
    conns.admin.conn.autocommit = True
    try:
        yield conns
    finally:
        for store in (conns.admin, conns.probe, *conns.hosts):
            store.close()
