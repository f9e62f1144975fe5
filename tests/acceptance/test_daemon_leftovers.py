"""A test's daemon leaves nothing in /tmp, even when its process group has to be SIGKILLed.

A daemon killed that way cannot clean up: multiprocess's fork-server socket
directories (``pymp-*``) stayed in /tmp, about one per fault-campaign seed.
``tests.helpers.Daemon`` gives each daemon a temporary directory of its own
(``TMPDIR``) and removes it in ``stop()``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.helpers import Daemon, wait_fork_server_dir


def test_a_sigkilled_daemon_leaves_no_temporary_files(dsn: str, state_dir: Path) -> None:
    daemon = Daemon(dsn, state_dir / "d0", shards=2)
    tmp = Path(daemon.tmp_dir)
    try:
        daemon.wait_ready()
        assert {"fetcher", "shard 0", "shard 1"} <= set(daemon.child_pids())
        # The fork server's socket directory is where the daemon's temporary files now go. (Its environment
        # is not readable from /proc: the process titles are written over it.)
        assert wait_fork_server_dir(tmp)
        os.killpg(daemon.pid, signal.SIGKILL)  # no exit handler runs
        daemon.process.wait(10)
        assert any(tmp.iterdir())  # what the killed daemon could not remove
    finally:
        daemon.stop()
    assert not tmp.exists()
