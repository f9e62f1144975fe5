"""Packaging tests: the RPM (test_rpm.py), the systemd unit and packaged
configuration (test_unit.py), the metadata, spec and license (test_metadata.py),
the man page (test_man.py) and run.sh's setup (test_run_sh.py), checked with the
real tools.

Debian needs `apt-get install rpm rpm2cpio cpio rpmlint groff-base python3-packaging
python3-setuptools` (systemd and git are there already); Fedora `dnf install rpm-build
rpmlint cpio git groff-base python3-devel systemd-rpm-macros` (`./run.sh check` lists
what is missing).
A missing tool fails the test with the command that installs it; only where no
package manager could install it (neither apt-get nor dnf) is the test skipped.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RPM_DIR = REPO / "packaging" / "rpm"

# Which package brings each tool.
_APT = {"rpmbuild": "rpm", "rpmspec": "rpm", "rpm": "rpm", "rpm2cpio": "rpm2cpio", "cpio": "cpio",
        "rpmlint": "rpmlint", "groff": "groff-base", "man": "man-db", "systemd-analyze": "systemd",
        "systemd-sysusers": "systemd", "git": "git"}
_DNF = {"rpmbuild": "rpm-build", "rpmspec": "rpm-build", "rpm": "rpm", "rpm2cpio": "rpm", "cpio": "cpio",
        "rpmlint": "rpmlint", "groff": "groff-base", "man": "man-db", "systemd-analyze": "systemd",
        "systemd-sysusers": "systemd", "git": "git"}


def require_tools(*tools: str) -> None:
    """Fail (or, where nothing could install them, skip) unless every tool is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    if shutil.which("apt-get"):
        pytest.fail(f"{', '.join(missing)} not installed: apt-get install "
                    + " ".join(sorted({_APT.get(t, t) for t in missing})), pytrace=False)
    if shutil.which("dnf"):
        pytest.fail(f"{', '.join(missing)} not installed: dnf install "
                    + " ".join(sorted({_DNF.get(t, t) for t in missing})), pytrace=False)
    pytest.skip(f"{', '.join(missing)} not installed and no apt-get or dnf here to install it")


def run(cmd: list[str], timeout: float = 120, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; on failure the assertion shows it."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result
