"""Multihost: claims on ordering keys, with their fencing tokens.

An instance holds a key under a claim (``key_claims`` row, a token that grows
on every hand-over) while it has work for it; every task write checks the
claim still holds that token. Queries: ``sql/key_claims.sql``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskomatic.db.store import Row, Store


def take_over_keys(store: Store, instance_id: int, limit: int) -> list[Row]:
    """Claims of instances whose lease ran out, now ours: key_type, key_id, token, previous (holder)."""
    return store.all("take_over_keys", instance_id=instance_id, limit=limit)


def adopt_key_tasks(store: Store, instance_id: int, keys: list[Row]) -> list[Row]:
    """The unfinished tasks of keys taken over (rows of ``take_over_keys``), now claimed by us."""
    return store.all("adopt_key_tasks", instance_id=instance_id, key_types=[k["key_type"] for k in keys],
                     key_ids=[k["key_id"] for k in keys], previous=[k["previous"] for k in keys])


def free_keys(store: Store, after: tuple[str, int], limit: int, max_visit: int) -> list[Row]:
    """Unclaimed keys with queued tasks, in key order after ``after`` (key_type, key_id)."""
    return store.all("free_keys", after_type=after[0], after_id=after[1], max_visit=max_visit, limit=limit)


def claim_keys(store: Store, instance_id: int, keys: list[tuple[str, int | None]]) -> list[Row]:
    """Claim these free keys; the ones won (key_type, key_id, token)."""
    return store.all("claim_keys", instance_id=instance_id, key_types=[k[0] for k in keys],
                     key_ids=[k[1] for k in keys])


def claim_key_tasks(store: Store, instance_id: int, wanted: list[tuple[str, int | None, int, int]]) -> list[Row]:
    """Claim the next tasks of held keys: (key_type, key_id, token, how many) each."""
    return store.all("claim_key_tasks", instance_id=instance_id, key_types=[w[0] for w in wanted],
                     key_ids=[w[1] for w in wanted], tokens=[w[2] for w in wanted],
                     counts=[w[3] for w in wanted])


def release_keys(store: Store, instance_id: int, keys: list[tuple[str, int | None, int]]) -> None:
    """Release these claims (key_type, key_id, token), so any instance may take the keys."""
    store.run("release_keys", instance_id=instance_id, key_types=[k[0] for k in keys],
              key_ids=[k[1] for k in keys], tokens=[k[2] for k in keys])


def release_idle_keys(store: Store, instance_id: int) -> int:
    """Release every claim of ours with nothing running under it; how many."""
    return store.run("release_idle_keys", instance_id=instance_id)


def held_keys(store: Store, instance_id: int) -> list[Row]:
    """The key claims this instance holds (key_type, key_id, token)."""
    return store.all("held_keys", instance_id=instance_id)


def hold_key_claim(store: Store, instance_id: int, key_type: str, key_id: int, token: int) -> bool:
    """Fencing for one key (``hold_key_claims`` is the same rule for many): is the claim still ours, locked?"""
    return store.one("hold_key_claim", instance_id=instance_id, key_type=key_type, key_id=key_id,
                     token=token) is not None


def hold_key_claims(store: Store, instance_id: int, claims: list[tuple[str | None, int | None, int | None]]
                    ) -> set[tuple[str, int, int]]:
    """Fencing, in a write transaction: those of these (key_type, key_id, token) claims still ours, locked."""
    return {(r["key_type"], r["key_id"], r["token"]) for r in store.all(
        "hold_key_claims", instance_id=instance_id, key_types=[c[0] for c in claims],
        key_ids=[c[1] for c in claims], tokens=[c[2] for c in claims])}
