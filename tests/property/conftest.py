"""Hypothesis profiles: ``ci`` (default) is derandomized and keeps no example database,
so every run checks the same examples; ``dev`` explores new ones
(``HYPOTHESIS_PROFILE=dev pytest tests/property``)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
