"""Fault: the nodes' save directory full, or read-only, while VMs are being saved (issue 19).

``save_vm`` writes the VM's memory image to ``libvirt.save_dir`` on its node
(``taskomatic-vm<id>-<uuid>.save``, written by the node's libvirtd, user nobody).
Here that directory is a small tmpfs of the test's own, shared by both local nodes;
at the seed's moment it is filled up (ENOSPC) or remounted read-only (EROFS), as the
seed decides, and stays so until 1-4 ``save_vm`` tasks failed on it (or the work
ended); then it is repaired. The workload saves and restores VMs (harness.save_workload).

A save that cannot write must fail with a message and leave its VM running (the
domain keeps running); a saved row must have its image (the checker looks in the
directory); the rest is the usual verdict (tasks ended once, in order, rows agree
with the nodes, new work finishes).
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance import checks
from tests.faults.harness import FaultRun
from tests.faults.test_faults import start_some, verdict
from tests.helpers import query, wait_for

SIZE = "2m"  # room for every image of the workload (the test driver's are ~1 KB)


class SaveDir:
    """A tmpfs on ``path`` that anyone may write: broken and repaired on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0777", "tmpfs", str(path)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs for the save directory (needs root): {result.stderr.strip()}")

    def fill(self) -> None:
        """Write until the filesystem is full (ENOSPC for the next image)."""
        with open(self.filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise

    def make_read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)

    def repair(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(self.path)], check=True)
        self.filler.unlink(missing_ok=True)

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", "-l", str(self.path)], check=True, capture_output=True)


@pytest.fixture
def save_dir() -> Iterator[SaveDir]:
    base = Path(tempfile.mkdtemp(prefix="tkm-save-", dir="/tmp"))
    base.chmod(0o755)  # libvirtd (nobody) must reach the mount point
    directory = SaveDir(base / "dir")
    try:
        yield directory
    finally:
        directory.close()
        shutil.rmtree(base, ignore_errors=True)


def failed_saves(dsn: str) -> int:
    return int(query(dsn, "SELECT count(*) AS n FROM tasks WHERE action = 'save_vm' AND state = 'failed'")[0]["n"])


# save_dir before make_run: the daemons stop before the directory is unmounted.
def test_save_dir_broken(seed: int, dsn: str, save_dir: SaveDir, make_run: Any) -> None:
    run: FaultRun = make_run("save_dir", seed, dsn)
    run.save_dir = save_dir.path
    run.add_hosts()
    start_some(run, extra=["--set", f"libvirt.save_dir={save_dir.path}"])
    scripts = run.save_workload()
    run.wait_ended(run.moment)
    kind = run.rng.choice(["full", "read_only"])
    wanted = run.rng.randint(1, 4)
    before = failed_saves(dsn)
    if kind == "full":
        save_dir.fill()
    else:
        save_dir.make_read_only()
    wait_for(lambda: failed_saves(dsn) >= before + wanted or not checks.open_tasks(dsn), 60, 0.05,
             f"{wanted} save_vm tasks to fail on the {kind} directory")
    save_dir.repair()
    failed = query(dsn, "SELECT id, task_target_id, message FROM tasks WHERE action = 'save_vm' "
                        "AND state = 'failed' ORDER BY id")
    run.notes.update(kind=kind, wanted_failures=wanted, failed_saves=len(failed) - before,
                     examples=[r["message"] for r in failed[before:before + 2]])
    violations = run.finish(scripts, must_finish=False)
    # A save that failed on the directory says so.
    violations += [f"a failed save_vm has no message saying why: {r}" for r in failed if not r["message"]]
    verdict(violations)
