"""A test's daemon leaves nothing in /tmp, even when its process group has to be SIGKILLed.

A daemon killed that way cannot clean up: multiprocess's fork-server socket
directories (``pymp-*``) stayed in /tmp, about one per fault-campaign seed.
``tests.helpers.Daemon`` gives each daemon a temporary directory of its own
(``TMPDIR``) and removes it in ``stop()``.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers import Daemon, sigkill_then_stop


def test_a_sigkilled_daemon_leaves_no_temporary_files(dsn: str, state_dir: Path) -> None:
    daemon = Daemon(dsn, state_dir / "d0", shards=2)

    def children_up() -> None:
        assert {"fetcher", "shard 0", "shard 1"} <= set(daemon.child_pids())

    # The fork server's socket directory is where the daemon's temporary files now go. (Its environment is
    # not readable from /proc: the process titles are written over it.)
    sigkill_then_stop(daemon, children_up)
