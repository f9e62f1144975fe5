"""systemd notifications: READY once everything is up, STATUS lines, and WATCHDOG
pings only while the fetcher is healthy, so a wedged fetcher makes systemd act."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import REPO, wait_for

# Slow (not in the inner loop): waits for the watchdog to notice a wedged fetcher.
pytestmark = pytest.mark.slow


class NotifySocket:
    """A datagram socket standing in for systemd's, recording every message."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self, prefix: str, after: float = 0.0) -> list[str]:
        return [m for t, m in list(self.messages) if m.startswith(prefix) and t >= after]

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


def _children(pid: int) -> dict[str, int]:
    # By session (the daemon leads one): a forkserver child's parent is the fork server.
    out = subprocess.run(["ps", "-o", "pid=,args=", "--sid", str(pid)], capture_output=True, text=True,
                         check=False).stdout
    return {title.strip(): int(p) for p, _, title in (line.strip().partition(" ") for line in out.splitlines())}


def test_watchdog_pings_stop_while_the_fetcher_is_wedged(dsn, state_dir):
    notify = NotifySocket(str(state_dir / "notify"))
    log_path = state_dir / "daemon.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "taskomatic", "--dsn", dsn, "--shards", "2", "--set", f"state_dir={state_dir}",
             "--set", "heartbeat_timeout=3"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(state_dir / "notify"),
                 "TMPDIR": str(state_dir)})  # its temporary files go with state_dir (tests.helpers.Daemon)
    fetcher = None
    try:
        wait_for(lambda: notify.lines("READY=1"), 60, what="READY=1")
        wait_for(lambda: notify.lines("WATCHDOG=1"), 30, what="watchdog pings")
        status = wait_for(lambda: notify.lines("STATUS="), 30, what="a STATUS line")[-1]
        assert "shards 2/2 alive" in status and "done" in status, status

        fetcher = next(pid for title, pid in _children(daemon.pid).items() if "taskomatic: fetcher" in title)
        os.kill(fetcher, signal.SIGSTOP)
        stopped_at = time.monotonic()
        # The supervisor notices the silence itself (heartbeat_timeout=3 s) and replaces the fetcher;
        # until then systemd must get no WATCHDOG=1 (at most one from a status already in flight).
        wait_for(lambda: "silent for" in log_path.read_text(), 60, what="the supervisor to notice")
        noticed_at = time.monotonic()
        pings = [t for t, m in list(notify.messages) if m == "WATCHDOG=1" and stopped_at <= t <= noticed_at]
        assert len(pings) <= 1, f"{len(pings)} watchdog pings while the fetcher was stopped"
        # A new fetcher, and the pings resume.
        wait_for(lambda: notify.lines("WATCHDOG=1", after=noticed_at), 60, what="watchdog pings to resume")
    finally:
        if fetcher is not None:
            try:
                os.kill(fetcher, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(daemon.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        daemon.wait(10)
        notify.close()
    assert notify.lines("STOPPING=1"), "a stop must announce STOPPING=1"
