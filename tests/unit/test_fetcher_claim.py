"""The multihost fetcher's choice of claim statement and what it reports back, in process.

No database: the fetcher is built without its connections, and the two claim
statements are replaced by fakes that record their calls and return the rows
a test gives them. What the statements themselves do is tested against a real
PostgreSQL (tests/integration/test_partitions_sql.py, the protocol model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from taskomatic.config import Config
from taskomatic.runtime import fetcher as fetcher_mod
from taskomatic.runtime.dispatch import Dispatcher
from taskomatic.runtime.fetcher import Fetcher, ShardLink
from taskomatic.runtime.partition_book import PartitionBook

P = 8


class FakeStore:
    @contextmanager
    def transaction(self) -> Iterator[None]:
        yield


def _row(task_id: int, partition: int) -> dict[str, Any]:
    return {"id": task_id, "task_target_type": "Vm", "task_target_id": task_id, "action": "noop", "args": "{}",
            "key_type": "Vm", "key_id": task_id, "state": "queued", "partition": partition}


@pytest.fixture
def claims(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The statements the fetcher sends: their calls, and the rows (and window fill) each will return."""
    state: dict[str, Any] = {"calls": [], "window_rows": [], "scanned": 0, "partition_rows": []}

    def window(store: Any, instance_id: int, held: dict[int, int], window: int, limit: int,
               last: bool = False) -> tuple[list[dict[str, Any]], int]:
        state["calls"].append(("window", window, limit))
        return state["window_rows"], state["scanned"]

    def per_partition(store: Any, instance_id: int, held: dict[int, int], caps: dict[int, int], limit: int,
                      last: bool = False) -> list[dict[str, Any]]:
        state["calls"].append(("per partition", limit))
        return state["partition_rows"]

    monkeypatch.setattr(fetcher_mod.partitions, "claim_partition_window", window)
    monkeypatch.setattr(fetcher_mod.partitions, "claim_partition_tasks", per_partition)
    monkeypatch.setattr(fetcher_mod, "limit_idle_transaction", lambda store, config: None)
    return state


def _fetcher(held: range) -> Fetcher:
    fetcher = object.__new__(Fetcher)  # no connections, no socket: only what _claim reads
    fetcher.config = Config(mode="multihost", shards=2, claim_batch=20)
    fetcher.multihost = True
    fetcher.instance_id = 1
    fetcher.store = FakeStore()  # type: ignore[assignment]
    fetcher.slots = [ShardLink(i) for i in range(2)]
    fetcher.dispatch = Dispatcher(2)
    fetcher.book = PartitionBook(P)
    for partition in held:
        fetcher.book.hold(partition, 7)
    return fetcher


def test_holding_every_partition_the_fetcher_claims_by_window_and_routes_the_rows(claims: dict[str, Any]) -> None:
    fetcher = _fetcher(range(P))
    claims["window_rows"], claims["scanned"] = [_row(10, 1), _row(11, 2)], 2
    assert not fetcher._claim()  # the window was not full: nothing more waits
    assert claims["calls"] == [("window", 20, 20)]
    assert fetcher.dispatch.held() == 2 and fetcher.book.busy(1) and fetcher.book.busy(2)


def test_a_full_window_of_others_tasks_sends_the_next_claim_per_partition_at_once(claims: dict[str, Any]) -> None:
    fetcher = _fetcher(range(P))
    claims["scanned"] = 20  # full, none of ours
    assert fetcher._claim()  # claim again at once
    claims["partition_rows"] = [_row(30, 3)]
    assert not fetcher._claim()  # short: ours are claimed
    assert claims["calls"] == [("window", 20, 20), ("per partition", 20)]
    assert fetcher.book.claim_window(20) == 20  # the next claim tries the window again


def test_holding_fewer_than_half_the_fetcher_claims_per_partition(claims: dict[str, Any]) -> None:
    fetcher = _fetcher(range(P // 2 - 1))
    claims["partition_rows"] = [_row(40, 0)]
    fetcher._claim()
    assert claims["calls"] == [("per partition", 20)]
