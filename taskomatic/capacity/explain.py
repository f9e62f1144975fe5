"""The planner's long answer, with its model spelled out (``python -m bench.plan``)."""

from __future__ import annotations

from taskomatic.capacity.model import Plan

HASH_MODEL = [
    "Routing hash (this plan): not the pool above. Partition p = hash(key) mod P always runs on shard p mod N,",
    "so shard j is its own M/G/1 queue of the keys hashed to it (rate λ_j; Pollaczek-Khinchine, same tail); a",
    "task waits for its shard's queue only. The pool columns below are the busiest shard's; it sets the answer.",
]


def _s(value: float | None) -> str:
    if value is None:
        return "inf (rho >= 1)"
    return f"{value:.3f}" if value < 10 else f"{value:,.1f}"


def render(result: Plan, overhead_source: str) -> str:
    w, svc = result.workload, result.service
    lines = ["Workload:"]
    for action, per_hour in sorted(w.tasks_per_hour.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {action:<16} {per_hour:>10,.0f} tasks/h  latency {w.latency_s[action]:g} s "
                     f"(sd {w.latency_cv * w.latency_s[action]:g} s)")
    lines += [
        f"  total {w.rate_per_s * 3600:,.0f} tasks/h = {w.rate_per_s:.4g} tasks/s over {w.vms:,} VMs, "
        f"keys {w.skew} (seed {w.seed})",
        f"  per-task overhead {w.overhead_s * 1000:.3f} ms ({overhead_source})",
        f"  service time: mean {svc.mean_s:.4g} s, E[S²] {svc.second_moment_s2:.4g} s², cv {svc.cv:.3f}; "
        f"offered load a = λE[S] = {result.offered_load:.3f} shards",
        f"  hottest key {result.hottest_key}: {result.hottest_key_per_hour:,.0f} tasks/h, utilisation "
        f"{result.hottest_key_utilisation:.3f} on its own, p95 wait behind its own tasks "
        f"{_s(result.hottest_key_alone_p95_s)} s; the most one key can take for the target: "
        f"{result.hottest_key_max_per_hour:,.0f} tasks/h",
        "",
        "Model: the shards are a pool of c servers fed from one queue (a key with nothing in flight goes to",
        "whichever shard has room; one task at a time per shard; Poisson arrivals): an M/G/c queue with a = λE[S],",
        "rho = a/c. Pool wait: Erlang C, C(c,a) = P(wait), with the Allen-Cunneen correction for general service",
        "times, Wq = C(c,a)·E[S]/(c-a)·(1+Cs²)/2; p95 by the exponential tail P(wait > t) = C·exp(-C·t/Wq),",
        "i.e. p95 = (Wq/C)·ln(C/0.05) (exact for M/M/c). Each key is also its own M/G/1 queue (per-key order runs",
        "its tasks one at a time): rho_k = λ_k·E[S] < 1, Pollaczek-Khinchine W_k = λ_k·E[S²]/(2(1-rho_k)) with the",
        "same tail; a key's task waits W_k + the pool's wait (independent; the sum's p95 solved exactly). No shard",
        "count shortens W_k. Service = latency + constant overhead; the action mix is the same for every key.",
        "Instances: their shards taken as one pool (a free key goes to an instance with room); instances =",
        "ceil(c / shards per instance). Not modelled: fetcher limits beyond the measured overhead, a key held by",
        "one instance waiting for that instance's shards only, bursts, retries.",
        *(HASH_MODEL if result.routing == "hash" else []),
        "",
        f"Target: p95 queueing delay (enqueue to start) <= {result.target_p95_s:g} s, for the pool and for the "
        f"hottest key's tasks.",
        "",
        "| shards | instances | rho | P(wait) | pool mean wait s | pool p95 s | hottest key p95 s | all tasks p95 s "
        "| meets |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    shown = _rows_to_show(result)
    for row in result.rows:
        if row.shards in shown or result.verdict.startswith("impossible"):
            meets = "yes" if row.meets_target else f"no ({row.limited_by})"
            lines.append(f"| {row.shards} | {row.instances} | {row.utilisation:.3f} | "
                         f"{row.wait_probability:.3f} | {_s(row.pool_mean_wait_s)} | "
                         f"{_s(row.pool_p95_wait_s)} | {_s(row.hottest_key_p95_wait_s)} | "
                         f"{_s(row.overall_p95_wait_s)} | {meets} |")
    lines += ["", f"Answer: {result.verdict}"]
    return "\n".join(lines)


def _rows_to_show(result: Plan) -> set[int]:
    n = result.rows[-1].shards if result.rows else 0
    shown = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256} & set(range(1, n + 1))
    shown |= set(range(max(1, n - 3), n + 1))
    if result.pool_shards is not None:
        shown.add(result.pool_shards)
    return shown

