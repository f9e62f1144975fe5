"""Fault: the wall clock stepped forward and back on the daemon's side (issue 19).

The daemons run with ``wallclock.c`` preloaded (built here with the system's C
compiler): their wall clock (CLOCK_REALTIME, gettimeofday, time) is shifted by the
seconds in an offset file of their own, their monotonic and boot-time clocks are
not, as an NTP step leaves them. PostgreSQL and the nodes keep the real clock.

At the seed's moment the clock of every instance, or of one (clock skew between
machines), is stepped by 30-3600 s forward or back, held there until 5-40 more
tasks ended, then stepped again (back to the real time, or as far the other way).
Multihost (2 instances) for two thirds of the seeds: leases must not break.

A clock step must cost no task: every task finishes, none runs twice; per-key order
holds in the database's timestamps; no instance loses its lease (its renewal and
takeover run on the database clock, its local copy on CLOCK_BOOTTIME) and no shard
is killed as stuck past task_timeout when it was not.

Found by this fault and fixed: the shards took time_started and time_ended from the
daemon's wall clock, so after a step back a task "started" before its predecessor
"ended" in the database, although the tasks ran in order. They now stamp tasks with
the wall clock read once per instance, carried forward by the monotonic clock
(runtime/clock.py), and the shard deadlines follow the monotonic clock, so every
violation fails the run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance import checks
from tests.faults.harness import SHIM_ENV, FaultRun
from tests.faults.test_faults import SHARDS, verdict
from tests.helpers import wait_for

SOURCE = Path(__file__).with_name("wallclock.c")


@pytest.fixture(scope="session")
def wallclock_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the wall-clock shim (run.sh installs gcc)")
    target = tmp_path_factory.mktemp("wallclock") / "wallclock.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(target), str(SOURCE), "-ldl"], check=True)
    return target


class Clocks:
    """One offset file per daemon: what its wall clock is off by, in seconds."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.files: list[Path] = []

    def new_file(self) -> Path:
        path = self.base / f"clock{len(self.files)}"
        path.write_text("0\n")
        self.files.append(path)
        return path

    def step(self, which: list[int], seconds: float) -> None:
        for i in which:
            tmp = self.files[i].with_suffix(".tmp")
            tmp.write_text(f"{seconds}\n")
            tmp.replace(self.files[i])  # atomic: a reader sees the old offset or the new one


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """The daemons started inside inherit these (tests.helpers.Daemon copies os.environ)."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_clock_stepped(seed: int, dsn: str, wallclock_shim: Path, make_run: Any) -> None:
    run: FaultRun = make_run("clock_step", seed, dsn)
    run.add_hosts()
    clocks = Clocks(run.base)
    multihost = run.rng.random() < 2 / 3
    count = 2 if multihost else 1
    for _ in range(count):
        with _environment(LD_PRELOAD=str(wallclock_shim), **{SHIM_ENV: str(clocks.new_file())}):
            run.start_daemon(shards=2 if multihost else SHARDS, multihost=multihost, wait=False)
    for daemon in run.daemons:
        daemon.wait_ready(90)
    scripts = run.workload()
    run.wait_ended(run.moment)
    which = list(range(count)) if count == 1 or run.rng.random() < 0.5 else [run.rng.randrange(count)]
    first = run.rng.choice([-1, 1]) * run.rng.randint(30, 3600)
    second = run.rng.choice([0, -first])
    hold = run.rng.randint(5, 40)
    offsets = run.log_from()
    clocks.step(which, first)
    base = run.ended()
    wait_for(lambda: run.ended() >= base + hold or not checks.open_tasks(dsn), 60, 0.05,
             f"{hold} tasks to end on the stepped clock")
    clocks.step(which, second)
    run.notes.update(mode="multihost" if multihost else "standalone", stepped=which, first=first,
                     second=second, hold=hold)
    violations = run.finish(scripts, must_finish=True)
    lost = run.logged_since(offsets, "lease lost")
    killed = run.logged_since(offsets, "past task_timeout")
    run.notes.update(leases_lost=lost, stuck_kills=killed)
    if lost:
        violations.append(f"{lost} lease(s) lost after a wall-clock step (leases run on the database clock)")
    if killed:
        violations.append(f"{killed} shard(s) killed as stuck past task_timeout after a wall-clock step "
                          "(the task deadline must follow the monotonic clock)")
    verdict(violations)
