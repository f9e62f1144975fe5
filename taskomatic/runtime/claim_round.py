"""Multihost: one instance's claim round over ordering keys, in one transaction.

Each round takes over the keys of instances whose lease ran out (their
in-flight tasks come back ``running``, to be reconciled), claims free keys up
to the instance's capacity, tops up the held keys with their next tasks, and
releases the keys that drained (``keys.KeyBook`` decides which). The fetcher
runs a round when it is due and routes what was claimed to its shards.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from taskomatic import metrics
from taskomatic.config import Config
from taskomatic.db import key_claims
from taskomatic.db.store import Store
from taskomatic.model import OrderingKey, TaskRow, key_of, task_from_row
from taskomatic.runtime.dispatch import Dispatcher
from taskomatic.runtime.keys import KeyBook
from taskomatic.runtime.lease import limit_idle_transaction

log = logging.getLogger(__name__)

TAKEOVER_BATCH = 1000  # expired keys taken over in one round at most
FREE_KEYS_START = ("", -(2**63) + 1)  # before every key (-2**63 does not parse as a bigint literal)


class ClaimRound:
    def __init__(self, store: Store, config: Callable[[], Config], instance_id: int, book: KeyBook,
                 dispatch: Dispatcher, settling_slot: Callable[[TaskRow, int | None], int | None]) -> None:
        self.store = store
        self.config = config  # the fetcher's current configuration (it reloads on SIGHUP)
        self.instance_id = instance_id
        self.book = book
        self.dispatch = dispatch
        self.settling_slot = settling_slot
        self.free_cursor = FREE_KEYS_START
        self.next_takeover = 0.0

    def round(self, now: float) -> bool:
        """One multihost claim round, in one transaction; True if free keys may be left to claim.

        Take over expired keys (when due), claim free ones, top up the held ones,
        release the drained ones. The statements that can wait on another
        instance (claim inserts, in key order) come before the release, and the
        rest skip or touch only our own keys, so two rounds cannot wait on each
        other in a cycle.
        """
        takeover_due = now >= self.next_takeover
        if takeover_due:
            self.next_takeover = now + self.config().lease_renew_interval
        with self.store.transaction():
            limit_idle_transaction(self.store, self.config())
            if takeover_due:
                self._take_over()
            more = self._claim_free_keys() if self.book.key_room() > 0 else False
            self._top_up()
            self._release_drained()
        return more

    def _take_over(self) -> None:
        """Keys of instances whose lease ran out: we take them all, keep what we can run.

        We keep those with a task to reconcile and as many more as we have room
        for; the rest we release at once, so every instance with room can claim
        them, instead of one survivor moving them a few at a time.
        """
        keys = key_claims.take_over_keys(self.store, self.instance_id, TAKEOVER_BATCH)
        if not keys:
            return
        rows = key_claims.adopt_key_tasks(self.store, self.instance_id, keys)
        to_settle = {(r["key_type"], r["key_id"]) for r in rows if r["state"] == "running"}
        room = self.book.key_room()
        kept: list[dict] = []
        passed_on: list[dict] = []
        for key in keys:
            if (key["key_type"], key["key_id"]) in to_settle:
                kept.append(key)  # beyond our room if need be: one per shard of the dead, plus its parked tasks
            elif room > 0:
                kept.append(key)
                room -= 1
            else:
                passed_on.append(key)
        kept_pairs = {(k["key_type"], k["key_id"]) for k in kept}
        for key in kept:
            self.book.hold(OrderingKey(key["key_type"], key["key_id"]), key["token"])
        self.route_claimed([r for r in rows if (r["key_type"], r["key_id"]) in kept_pairs])
        if passed_on:
            key_claims.release_keys(self.store, self.instance_id,
                                    [(k["key_type"], k["key_id"], k["token"]) for k in passed_on])
        log.info("took over %d keys from instances %s whose lease ran out: kept %d (%d tasks to reconcile), "
                 "passed %d on to whoever has room", len(keys),
                 ", ".join(str(i) for i in sorted({k["previous"] for k in keys})), len(kept), len(to_settle),
                 len(passed_on))
        metrics.keys_claimed(len(keys), "takeover")

    def _claim_free_keys(self) -> bool:
        asked = self.book.key_room() * 2  # more than we take: other instances may win some
        rows = key_claims.free_keys(self.store, self.free_cursor, limit=asked, max_visit=asked + 256)
        candidates = [OrderingKey(r["key_type"], r["key_id"]) for r in rows]
        chosen = self.book.choose_free(candidates)
        # Rotate through the key space, so every key with work gets its turn: the next
        # round starts after the last key taken (those read but not taken come first
        # then), or after the last one read, or from the start once the end was reached.
        if chosen and len(chosen) < len(candidates):
            self.free_cursor = (chosen[-1].kind, chosen[-1].ident or 0)
        elif len(rows) == asked:
            self.free_cursor = (candidates[-1].kind, candidates[-1].ident or 0)
        else:
            self.free_cursor = FREE_KEYS_START
        if not chosen:
            return False
        won = key_claims.claim_keys(self.store, self.instance_id, [(k.kind, k.ident) for k in chosen])
        for row in won:
            self.book.hold(OrderingKey(row["key_type"], row["key_id"]), row["token"])
        if won:
            log.debug("claimed %d keys", len(won))
            metrics.keys_claimed(len(won), "free")
        return bool(won) and len(rows) == asked

    def _top_up(self) -> None:
        """Claim the next tasks of held keys that run low."""
        asked = self.book.wanting_tasks()
        if not asked:
            return
        rows = key_claims.claim_key_tasks(self.store, self.instance_id,
                                          [(k.kind, k.ident, token, n) for k, token, n in asked])
        got = Counter(key_of(task_from_row(r)) for r in rows)
        self.route_claimed(rows)
        self.book.topped_up(asked, got)

    def route_claimed(self, rows: list[dict]) -> None:
        for row in sorted(rows, key=lambda r: r["id"]):
            task = task_from_row(row, self.book.token_of(key_of(task_from_row(row))))
            self.dispatch.route(task, self.settling_slot(task, row.get("run_by_shard")))
            self.book.add(task)

    def _release_drained(self) -> None:
        drained = self.book.drained()
        if not drained:
            return
        key_claims.release_keys(self.store, self.instance_id, [(k.kind, k.ident, token) for k, token in drained])
        self.book.release([k for k, _ in drained])
        metrics.keys_released(len(drained))
