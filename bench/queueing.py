"""The planner's queueing model now lives in the installed package: ``taskomatic.capacity.queueing``.

Re-exported here so ``bench.queueing`` keeps working in a checkout.
"""

from __future__ import annotations

from taskomatic.capacity.queueing import (
    NO_WAIT,
    P95,
    Service,
    Wait,
    erlang_c,
    max_key_rate,
    mg1_mean_wait,
    mgc_wait,
    mixture_p95,
    p95_wait,
    solve_quantile,
    sum_quantile,
    sum_tail,
)

__all__ = ["NO_WAIT", "P95", "Service", "Wait", "erlang_c", "max_key_rate", "mg1_mean_wait", "mgc_wait",
           "mixture_p95", "p95_wait", "solve_quantile", "sum_quantile", "sum_tail"]
