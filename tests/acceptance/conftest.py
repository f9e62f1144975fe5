"""Fixtures shared by the acceptance modules."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.plugin import write_dist_info
from tests.helpers import Daemon


@pytest.fixture
def noop_daemon(dsn: str, state_dir: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Daemon]]:
    """start(extra=[...]) -> a ready daemon with the benchmark's noop/sleep plugin installed (as any site's
    plugin would be, through its entry point); ``SHARDS`` of the test module, else 2; all stopped at the end."""
    started: list[Daemon] = []
    plugin = write_dist_info(state_dir / "plugin")
    shards = getattr(request.module, "SHARDS", 2)

    def start(extra: list[str] | None = None) -> Daemon:
        daemon = Daemon(dsn, state_dir / f"d{len(started)}", shards=shards, extra=extra, python_path=[str(plugin)])
        started.append(daemon)
        daemon.wait_ready()
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
