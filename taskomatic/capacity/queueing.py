"""The queueing model of the capacity planner (``taskomatic plan``, ``python -m bench.plan``): M/G/c and M/G/1
waits with exponential tails.

Pure functions of a service time (:class:`Service`: mean and second moment) and an
arrival rate; bench/README.md, "Capacity planner", says why these formulas.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

P95 = 0.95


@dataclass(frozen=True)
class Service:
    """The service time of one task drawn from the action mix: its mean and second moment (seconds)."""

    mean_s: float
    second_moment_s2: float

    @property
    def cv(self) -> float:
        variance = max(0.0, self.second_moment_s2 - self.mean_s ** 2)
        return math.sqrt(variance) / self.mean_s if self.mean_s > 0 else 0.0



@dataclass(frozen=True)
class Wait:
    """A wait that is 0 with probability 1 - ``probability`` and else exponential with mean ``mean_if_waiting_s``."""

    probability: float
    mean_if_waiting_s: float

    @property
    def mean_s(self) -> float:
        return self.probability * self.mean_if_waiting_s

    @property
    def never(self) -> bool:
        return self.probability <= 0.0 or self.mean_if_waiting_s <= 0.0

    def tail(self, t: float) -> float:
        """P(wait > t), t >= 0."""
        return 0.0 if self.never else self.probability * math.exp(-t / self.mean_if_waiting_s)

    def quantile(self, q: float = P95) -> float:
        """(W / P) ln(P / (1 - q)), 0 when P <= 1 - q."""
        if self.never or self.probability <= 1.0 - q:
            return 0.0
        return self.mean_if_waiting_s * math.log(self.probability / (1.0 - q))


NO_WAIT = Wait(0.0, 0.0)


def erlang_c(servers: int, offered: float) -> float:
    """Erlang C: the probability that an arrival waits in an M/M/c queue of ``servers`` with ``offered`` erlangs.

    Through the Erlang B recursion B(0) = 1, B(k) = a B(k-1) / (k + a B(k-1)),
    then C = B / (1 - rho (1 - B)) with rho = a / c: no factorials, stable for
    any c. 1 when a >= c (every arrival waits), 0 when a = 0.
    """
    if servers < 1:
        raise ValueError("servers must be at least 1")
    if offered <= 0.0:
        return 0.0
    if offered >= servers:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    return b / (1.0 - offered / servers * (1.0 - b))


def mgc_wait(servers: int, rate: float, service: Service) -> Wait | None:
    """The wait for one of ``servers`` (M/G/c, Allen-Cunneen); None when utilisation >= 1.

    P(wait) = C(c, a); mean wait Wq = C(c, a) E[S] / (c - a) x (1 + Cs²) / 2;
    a waiting task's wait exponential with mean Wq / C(c, a). At c = 1:
    C = rho and Wq = λ E[S²] / (2 (1 - rho)), Pollaczek-Khinchine exactly.
    """
    offered = rate * service.mean_s
    if offered >= servers:
        return None
    probability = erlang_c(servers, offered)
    if probability <= 0.0:
        return NO_WAIT
    correction = (1.0 + service.cv ** 2) / 2.0  # (Ca² + Cs²) / 2, Poisson arrivals: Ca² = 1
    return Wait(probability, service.mean_s / (servers - offered) * correction)


def mg1_mean_wait(rate: float, service: Service) -> float | None:
    """Pollaczek-Khinchine: mean wait in queue of an M/G/1 server; None when utilisation >= 1."""
    rho = rate * service.mean_s
    if rho >= 1.0:
        return None
    return rate * service.second_moment_s2 / (2.0 * (1.0 - rho))


def p95_wait(rate: float, service: Service, q: float = P95, servers: int = 1) -> float | None:
    """The q-quantile of the wait of an M/G/c queue (M/G/1 by default); None when utilisation >= 1."""
    wait = mgc_wait(servers, rate, service)
    return None if wait is None else wait.quantile(q)


def sum_tail(first: Wait, second: Wait, t: float) -> float:
    """P(X + Y > t) for independent atom-plus-exponential waits X and Y."""
    if first.never:
        return second.tail(t)
    if second.never:
        return first.tail(t)
    p1, m1, p2, m2 = first.probability, first.mean_if_waiting_s, second.probability, second.mean_if_waiting_s
    if abs(m1 - m2) <= 1e-9 * max(m1, m2):
        both = math.exp(-t / m1) * (1.0 + t / m1)  # Erlang-2
    else:
        both = (m1 * math.exp(-t / m1) - m2 * math.exp(-t / m2)) / (m1 - m2)  # hypoexponential
    return p1 * (1.0 - p2) * math.exp(-t / m1) + (1.0 - p1) * p2 * math.exp(-t / m2) + p1 * p2 * both


def solve_quantile(tail: Callable[[float], float], q: float = P95) -> float:
    """The smallest t with tail(t) <= 1 - q, for a non-increasing tail (bisection)."""
    if tail(0.0) <= 1.0 - q:
        return 0.0
    high = 1.0
    while tail(high) > 1.0 - q:
        high *= 2.0
    low = 0.0
    for _ in range(100):
        mid = (low + high) / 2.0
        if tail(mid) > 1.0 - q:
            low = mid
        else:
            high = mid
        if high - low <= 1e-9 * high:
            break
    return high


def sum_quantile(first: Wait, second: Wait, q: float = P95) -> float:
    """The q-quantile of X + Y (see ``sum_tail``)."""
    if first.never:
        return second.quantile(q)
    if second.never:
        return first.quantile(q)
    return solve_quantile(lambda t: sum_tail(first, second, t), q)


def mixture_p95(groups: list[tuple[float, Wait | None]], pool: Wait, q: float = P95) -> float | None:
    """The q-quantile of the wait of a random task: groups of keys (share of all tasks, own wait), plus the pool's.

    None when a key's own queue has utilisation >= 1 (its waits grow without bound).
    """
    if any(own is None for _, own in groups):
        return None
    known = [(share, own) for share, own in groups if own is not None]
    total = sum(share for share, _ in known)
    if total <= 0:
        return 0.0
    return solve_quantile(lambda t: sum(share * sum_tail(own, pool, t) for share, own in known) / total, q)


def max_key_rate(service: Service, target_p95_s: float, q: float = P95) -> float:
    """Tasks/s at which one key's own M/G/1 queue has its p95 wait just at the target (the most a key can take)."""
    low, high = 0.0, 1.0 / service.mean_s
    for _ in range(200):
        mid = (low + high) / 2.0
        wait = mgc_wait(1, mid, service)
        if wait is not None and wait.quantile(q) <= target_p95_s:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * high:
            break
    return low


