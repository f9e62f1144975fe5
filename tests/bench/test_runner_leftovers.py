"""A benchmark's runner leaves nothing in /tmp, even when its process group is SIGKILLed.

``bench.multihost`` SIGKILLs an instance on purpose (the takeover), and
``Runner.stop`` SIGKILLs a group that did not drain in time. A daemon killed
that way cannot clean up: its fork server's socket directory (``pymp-*``)
stayed in /tmp, one per killed instance. ``bench.runners.Runner`` gives each
runner a temporary directory of its own (``TMPDIR``) and removes it in ``stop()``.
"""

from __future__ import annotations

from pathlib import Path

from bench.runners import Runner, RunnerSpec
from tests.helpers import sigkill_then_stop, wait_fork_server_dir


def _runner(dsn: str, state_dir: Path) -> Runner:
    """A 2-shard daemon as the benchmarks start it (no plugin needed: it runs no task)."""
    return Runner(RunnerSpec("taskomatic", 2), dsn, state_dir / "runner", plugin_path=state_dir,
                  baseline_poll=1.0, daemon_settings=[])


def test_a_sigkilled_runner_leaves_no_temporary_files(dsn: str, state_dir: Path) -> None:
    sigkill_then_stop(_runner(dsn, state_dir))


def test_a_killed_runner_the_bench_forgets_leaves_no_temporary_files(dsn: str, state_dir: Path) -> None:
    """The multihost takeover's victim is never stopped (its group id may be somebody else's by then):
    ``Harness.forget_killed`` closes what the bench holds of it, its TMPDIR included."""
    from types import SimpleNamespace

    from bench.harness import Harness
    from bench.multihost.suite import kill_group, wait_group_gone

    runner = _runner(dsn, state_dir)
    tmp = Path(runner.tmp_dir)
    bench = SimpleNamespace(started=[runner])  # what forget_killed uses of a Harness
    try:
        runner.wait_ready()
        assert wait_fork_server_dir(tmp)
        kill_group(runner)
        assert wait_group_gone(runner), "the killed runner's processes are still there"
        assert any(tmp.iterdir())
        Harness.forget_killed(bench, runner)  # type: ignore[arg-type]
    finally:
        if runner in bench.started:  # not forgotten: stop it
            runner.stop()
    assert not tmp.exists() and bench.started == []
