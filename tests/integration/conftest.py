"""Shared by the integration tests: several database sessions on one test database."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from taskomatic.db.store import Store

StoreFactory = Callable[..., Store]


@pytest.fixture
def stores(dsn: str) -> Iterator[StoreFactory]:
    """open() -> a new Store (its own session) on this test's database; all closed at the end.

    Two of them are two sessions: how concurrency between fetchers, shards and
    instances is reproduced.
    """
    opened: list[Store] = []

    def open_store(begin_with_first: bool = True) -> Store:
        # As the shards and the fetcher open theirs: BEGIN with the first statement. A test that runs
        # statements of its own on store.conn (locks held to the end of a transaction) asks for False.
        store = Store.open(dsn, "taskomatic tests", timeout=10, begin_with_first=begin_with_first)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()
