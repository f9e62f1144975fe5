"""run.sh installs only what is missing: on a machine that has everything, `./run.sh
demo` and `./run.sh test` call no package manager (no network, no sudo) and leave the
virtualenv alone; `./run.sh check` says what they would install without installing it.

The package manager is a stand-in on PATH that records its arguments (and "installs"
a tool by linking it into the fake PATH), and the virtualenv is a stand-in whose
`taskomatic` only echoes, so these tests run in a second and change nothing.
"""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.packaging import REPO

RUN_SH = REPO / "run.sh"

# Where run.sh looks for PostgreSQL's initdb (Debian, Fedora, PGDG). The old check passed
# all three to one `ls`, which failed whenever one of them was absent.
INITDB_PATTERNS = ["/usr/lib/postgresql/*/bin/initdb", "/usr/bin/initdb", "/usr/pgsql-*/bin/initdb"]


def venv_stamp_name() -> str:
    """The stamp setup_venv leaves: a hash of the package definition files."""
    content = b"".join((REPO / name).read_bytes() for name in ("pyproject.toml", "setup.py")
                       if (REPO / name).exists())
    return ".installed-" + hashlib.sha1(content).hexdigest()[:12]


@pytest.fixture
def fake_venv(tmp_path: Path) -> Path:
    """A virtualenv that run.sh takes as installed and current; its taskomatic echoes."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    taskomatic = venv / "bin" / "taskomatic"
    taskomatic.write_text('#!/bin/sh\necho "fake taskomatic $*"\n')
    taskomatic.chmod(0o755)
    (venv / venv_stamp_name()).touch()
    return venv


def fake_package_managers(bin_dir: Path, log: Path, link_from: Path | None = None) -> None:
    """apt-get, dnf and sudo stand-ins that append their arguments to log. Given link_from,
    `apt-get install` links each tool from there into bin_dir, as if the package had
    brought it (the stand-in "package" is the tool's own name)."""
    install = (f'if [ "$1" = install ]; then for a in "$@"; do [ -e "{link_from}/$a" ] && '
               f'ln -sf "{link_from}/$a" "{bin_dir}/$a"; done; fi\n') if link_from else ""
    for name in ("apt-get", "dnf", "sudo"):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n' + (install if name != "sudo" else ""))
        script.chmod(0o755)


def path_without(tmp_path: Path, *left_out: str) -> Path:
    """A directory of links to every program on PATH except left_out (first one wins, as in PATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        for program in sorted(glob.glob(os.path.join(directory, "*"))):
            name = os.path.basename(program)
            if name in left_out or (bin_dir / name).exists() or not os.access(program, os.X_OK):
                continue
            if os.path.isfile(program):
                (bin_dir / name).symlink_to(program)
    return bin_dir


def run_sh(*args: str, venv: Path, path: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TASKOMATIC_VENV": str(venv), "PATH": path}
    return subprocess.run(["/bin/bash", str(RUN_SH), *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_installed_machine_needs_no_install(tmp_path: Path, fake_venv: Path) -> None:
    # This machine has PostgreSQL in one of the three places only: the old single `ls`
    # reported it missing here on every run.
    assert [p for p in INITDB_PATTERNS if not glob.glob(p)], "every initdb location exists: no regression check"
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    log = tmp_path / "package-manager.log"
    fake_package_managers(fakes, log)
    path = f"{fakes}{os.pathsep}{os.environ['PATH']}"

    check = run_sh("check", venv=fake_venv, path=path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.splitlines() == ["system: nothing to install", f"venv {fake_venv}: up to date"]

    # The real setup path (demo and test share it), twice: no package manager, no pip.
    for _ in range(2):
        result = run_sh("demo", "--vms", "3", venv=fake_venv, path=path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "fake taskomatic demo --vms 3"
        assert "installing" not in result.stderr, result.stderr
    assert not log.exists(), log.read_text()
    assert sorted(p.name for p in fake_venv.iterdir()) == sorted(["bin", venv_stamp_name()])


def test_check_names_the_missing_tools_and_their_packages(tmp_path: Path, fake_venv: Path) -> None:
    bin_dir = path_without(tmp_path, "rpmlint", "gcc", "apt-get", "dnf", "sudo")
    log = tmp_path / "package-manager.log"
    fake_package_managers(bin_dir, log)
    result = run_sh("check", venv=fake_venv, path=str(bin_dir))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "system: missing: have_tool gcc",
        "system: missing: have_tool rpmlint",
        "system: would run: apt-get install gcc rpmlint",
        f"venv {fake_venv}: up to date",
    ]
    assert not log.exists(), "check installed something: " + log.read_text()


def test_setup_installs_what_is_missing_once(tmp_path: Path, fake_venv: Path) -> None:
    real_rpmlint = next(Path(d) / "rpmlint" for d in os.environ["PATH"].split(os.pathsep)
                        if (Path(d) / "rpmlint").exists())
    bin_dir = path_without(tmp_path, "rpmlint", "apt-get", "dnf", "sudo")
    log = tmp_path / "package-manager.log"
    fake_package_managers(bin_dir, log, link_from=real_rpmlint.parent)

    first = run_sh("demo", venv=fake_venv, path=str(bin_dir))
    assert first.returncode == 0, first.stderr
    assert "installing system packages with apt-get: rpmlint" in first.stderr
    assert log.read_text().splitlines() == [
        "apt-get update -q",
        "apt-get install -y -q --no-install-recommends rpmlint",
    ]
    assert first.stdout.strip() == "fake taskomatic demo"

    log.unlink()
    second = run_sh("demo", venv=fake_venv, path=str(bin_dir))
    assert second.returncode == 0 and second.stdout.strip() == "fake taskomatic demo", second.stderr
    assert not log.exists(), "the second run called the package manager: " + log.read_text()


def test_venv_is_reinstalled_only_when_the_package_definition_changes(fake_venv: Path) -> None:
    stamp = fake_venv / venv_stamp_name()
    stamp.rename(fake_venv / ".installed-000000000000")
    result = run_sh("check", venv=fake_venv, path=os.environ["PATH"])
    assert result.returncode == 1
    assert f"venv {fake_venv}: package definition changed" in result.stdout


def test_the_system_python_check_is_not_fooled_by_the_checkout(tmp_path: Path) -> None:
    # The checkout has a packaging/ directory: a Python started in it imports that as a namespace
    # package "packaging". run.sh runs from the checkout, so its check of the system Python's
    # packaging module must give the same answer there as anywhere else (on a fresh Debian it
    # said "present" and python3-packaging was never installed; rpm's generator then made no Requires).
    text = RUN_SH.read_text()
    function = text[text.index("have_system_python() {"):]
    function = function[:function.index("\n}\n") + 3]
    script = tmp_path / "check.sh"
    script.write_text(function + "have_system_python; echo $?\n")
    answers = {cwd: subprocess.run(["/bin/bash", str(script)], capture_output=True, text=True, cwd=cwd,
                                   timeout=30).stdout.strip() for cwd in (REPO, tmp_path)}
    assert answers[REPO] == answers[tmp_path] in ("0", "1"), answers
