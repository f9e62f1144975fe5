"""The processes under test: the taskomatic daemon and the two baselines.

Each runs as a subprocess in a session (so process group) of its own: a
Ctrl-C in the bench's terminal does not reach it, its CPU is read per process
group, and stopping it is SIGTERM to the leader, then SIGKILL to the group.
Readiness is the systemd protocol: the bench binds a datagram socket, names it
in ``NOTIFY_SOCKET``, and waits for ``READY=1`` (the daemon sends it once the
fetcher and every shard are up; the baselines once every worker is connected).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent

KINDS = ("taskomatic", "original", "pool")
ROUTINGS = ("pinned", "hash")  # the daemon's ``routing`` setting; a taskomatic run may name one


@dataclass(frozen=True)
class RunnerSpec:
    kind: str  # taskomatic | original | pool
    parallelism: int  # shards, or pool workers (1 for original)
    routing: str | None = None  # taskomatic only: passed as --set routing=...; None = the daemon's default

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown runner {self.kind!r}")
        if self.routing is not None and (self.kind != "taskomatic" or self.routing not in ROUTINGS):
            raise ValueError(f"routing {self.routing!r} is not for {self.kind}")
        if self.parallelism < 1 or (self.kind == "original" and self.parallelism != 1):
            raise ValueError(f"bad parallelism {self.parallelism} for {self.kind}")

    @property
    def label(self) -> str:
        if self.kind == "taskomatic":
            label = f"taskomatic {self.parallelism} shard{'s' if self.parallelism > 1 else ''}"
            return f"{label}, {self.routing} routing" if self.routing else label
        if self.kind == "original":
            return "original (1 process, poll loop)"
        return f"SKIP LOCKED pool {self.parallelism} worker{'s' if self.parallelism > 1 else ''}"

    @property
    def keeps_order(self) -> bool:
        return self.kind != "pool"

    @property
    def is_baseline(self) -> bool:
        return self.kind != "taskomatic"


class RunnerFailed(RuntimeError):
    pass


class Runner:
    """One started runner; ``stop()`` (idempotent) leaves nothing of it behind."""

    def __init__(self, spec: RunnerSpec, dsn: str, work_dir: Path, plugin_path: Path,
                 baseline_poll: float, daemon_settings: list[str]) -> None:
        self.spec = spec
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = work_dir / "runner.log"
        self._notify_path = work_dir / "notify.sock"
        self._notify: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(self._notify_path))
        python_path = [str(REPO), str(plugin_path)]
        if os.environ.get("PYTHONPATH"):
            python_path.append(os.environ["PYTHONPATH"])
        # Nothing from the caller's environment may change what is measured:
        # TASKOMATIC_* settings, PG* libpq defaults (PGOPTIONS...), a journald stream.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TASKOMATIC_", "PG")) and k != "JOURNAL_STREAM"}
        # The runner's temporary files (multiprocess's fork-server socket directories, pymp-*) go to a
        # directory of its own, removed when it ends (stop(), Harness.forget_killed()): a runner whose
        # group is SIGKILLed (a takeover's victim, a stop that timed out) cannot clean up after itself.
        # Short, under /tmp: AF_UNIX paths are limited to 108 bytes.
        self.tmp_dir = tempfile.mkdtemp(prefix="tkb-", dir="/tmp")
        os.chmod(self.tmp_dir, 0o1777)  # like /tmp
        env.update(PYTHONPATH=os.pathsep.join(python_path), NOTIFY_SOCKET=str(self._notify_path),
                   TMPDIR=self.tmp_dir)
        if spec.kind == "taskomatic":
            # An empty configuration file: the defaults, not /etc/taskomatic/taskomatic.conf.
            config = work_dir / "taskomatic.conf"
            config.write_text("# taskomatic bench: defaults only; overrides are on the command line\n")
            cmd = [sys.executable, "-m", "taskomatic", "--config", str(config), "--dsn", dsn,
                   "--shards", str(spec.parallelism), "--set", f"state_dir={work_dir / 'state'}"]
            for setting in daemon_settings:
                cmd += ["--set", setting]
            if spec.routing:  # last, so the run's routing is the one it is labelled with
                cmd += ["--set", f"routing={spec.routing}"]
        else:
            cmd = [sys.executable, "-m", "bench.baselines", spec.kind, "--dsn", dsn,
                   "--workers", str(spec.parallelism), "--poll", str(baseline_poll)]
        self._log: IO[bytes] | None = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, cwd=str(REPO), start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 90.0) -> float:
        """Seconds until READY=1; RunnerFailed if it exits or does not get there in time."""
        started = time.monotonic()
        deadline = started + timeout
        assert self._notify is not None
        while True:
            if self.process.poll() is not None:
                raise RunnerFailed(f"{self.spec.label} exited with {self.process.returncode} before it was ready:\n"
                                   f"{self.log_tail()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunnerFailed(f"{self.spec.label} not ready within {timeout:.0f}s:\n{self.log_tail()}")
            readable, _, _ = select.select([self._notify], [], [], min(0.2, remaining))
            if readable:
                message = self._notify.recv(4096)
                if b"READY=1" in message.split(b"\n"):
                    # Stop listening: an unread socket would fill up and block the
                    # daemon's status messages; sends to a closed one just fail.
                    self._close_notify()
                    return time.monotonic() - started

    def remove_temporary_files(self) -> None:
        """Remove the runner's TMPDIR (once its processes are gone: they may still write to it)."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _close_notify(self) -> None:
        if self._notify is not None:
            self._notify.close()
            self._notify = None
            self._notify_path.unlink(missing_ok=True)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (drain), wait, then SIGKILL the whole group; the exit code of a clean stop."""
        code: int | None = None
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                code = None
        else:
            code = self.process.returncode
        # Stragglers of the group (a child the leader did not wait for). A group
        # id is not handed out again while any member lives, so this reaches
        # only this group's processes, or nobody.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.wait(10)
        self.remove_temporary_files()
        self._close_notify()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code
