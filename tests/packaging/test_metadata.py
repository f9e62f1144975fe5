"""The package's metadata and the spec, read as files (the built RPM is test_rpm.py's):

- pyproject.toml has a [build-system] and PEP 621 [project] metadata with the console
  script and the taskomatic.actions entry points; the version has one source,
  taskomatic/__init__.py, which the installed metadata and the spec agree with;
- the spec has a URL (pyproject's Homepage), no hand-written Requires of Python modules
  (rpm's generator derives them from the metadata), and takes the %pyproject branch on
  Fedora and EL >= 10 only (rpmspec evaluates it as for each distribution);
- LICENSE is the full text of the GNU GPL version 2.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import taskomatic
from tests.packaging import REPO, RPM_DIR, require_tools, run

SPEC = RPM_DIR / "taskomatic.spec"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def spec_tag(name: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(rf"(?mi)^{name}:\s*(.+)$", SPEC.read_text())]


def test_pyproject_declares_its_build_system_and_pep621_metadata() -> None:
    build = PYPROJECT["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    assert any(re.fullmatch(r"setuptools\s*>=\s*6[1-9].*", r) for r in build["requires"]), build
    project = PYPROJECT["project"]
    assert project["name"] == "taskomatic"
    assert project["requires-python"] == ">=3.11"
    assert project["license"] == {"text": "GPL-2.0-or-later"}
    assert project["scripts"] == {"taskomatic": "taskomatic.cli:main"}
    assert project["entry-points"]["taskomatic.actions"]["vm"] == "taskomatic.actions.vm:ACTIONS"
    names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in project["dependencies"]}  # type: ignore[union-attr]
    assert {"psycopg2", "libvirt-python", "multiprocess", "sdnotify"} <= names
    assert {"test", "bench"} <= set(project["optional-dependencies"])


def test_version_has_one_source() -> None:
    # Only taskomatic/__init__.py writes it down; pyproject reads it, setup.py says nothing.
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "taskomatic.__version__"}
    setup_py = REPO / "setup.py"
    if setup_py.exists():
        assert re.search(r"\bsetup\(\s*\)", setup_py.read_text()), "setup.py passes metadata: it belongs in pyproject"
    versions = [p for p in REPO.joinpath("taskomatic").rglob("*.py")
                if re.search(r"(?m)^__version__\s*=", p.read_text())]
    assert versions == [REPO / "taskomatic" / "__init__.py"]
    # What `import taskomatic` says is what the installed metadata and the spec say.
    printed = run([sys.executable, "-c", "import taskomatic; print(taskomatic.__version__)"], cwd=REPO).stdout.strip()
    assert printed == taskomatic.__version__ == importlib.metadata.version("taskomatic")
    assert spec_tag("Version") == [printed]


def test_spec_has_url_and_only_generated_python_requirements() -> None:
    assert spec_tag("URL") == [PYPROJECT["project"]["urls"]["Homepage"]]
    assert re.match(r"https://[^/\s]+/", spec_tag("URL")[0])
    requires = spec_tag("Requires")
    python_modules = [r for r in requires if re.match(r"(python3|python%\{python3_pkgversion\})[-.]|python3dist", r)]
    # The one exception: taskomatic-bench's plotting dependency, the bench extra of pyproject.toml, which
    # the generator does not turn into a subpackage's Requires. Spelled as the generator would, and equal.
    bench_extra = PYPROJECT["project"]["optional-dependencies"]["bench"]
    extra = [re.fullmatch(r"([A-Za-z0-9_.-]+)>=([\d.]+)", r) for r in bench_extra]
    assert python_modules == [f"python3dist({m.group(1)}) >= {m.group(2)}" for m in extra if m], \
        f"hand-written Requires of Python modules (the generator makes them): {python_modules}"
    bench = SPEC.read_text().split("%package bench", 1)[1].split("%description bench", 1)[0]
    assert all(r in bench for r in python_modules), "the plotting dependency belongs to taskomatic-bench only"
    for dependency in PYPROJECT["project"]["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", dependency).group(0)  # type: ignore[union-attr]
        assert name not in SPEC.read_text(), f"{name} is repeated in the spec"


@pytest.mark.parametrize(("distribution", "pyproject"), [
    ("fedora 41", True), ("rhel 10", True), ("rhel 9", False), ("rhel 8", False), (None, False),
])
def test_spec_uses_pyproject_macros_on_fedora_and_el10_only(distribution: str | None, pyproject: bool) -> None:
    require_tools("rpmspec")
    defines = ["--define", distribution] if distribution else []
    parsed = run(["rpmspec", "-P", *defines, str(SPEC)]).stdout
    # Fedora's macros are not defined here: the %pyproject ones stay as written.
    setup_py = re.findall(r"(?m)^\S*python3 setup\.py (build|install)\b", parsed)
    macros = re.findall(r"(?m)^%(pyproject_wheel|pyproject_install)\b", parsed)
    if pyproject:
        assert macros == ["pyproject_wheel", "pyproject_install"] and not setup_py, parsed
    else:
        assert setup_py == ["build", "install"] and not macros, parsed


def test_license_file_is_the_full_gpl2_text() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("GNU GENERAL PUBLIC LICENSE\n                       Version 2, June 1991")
    for heading in ("Preamble", "TERMS AND CONDITIONS FOR COPYING, DISTRIBUTION AND MODIFICATION",
                    "NO WARRANTY", "END OF TERMS AND CONDITIONS", "How to Apply These Terms to Your New Programs"):
        assert heading in text, heading
    # All thirteen numbered sections of the terms.
    sections = re.findall(r"(?m)^\s{2}(\d+)\. ", text)
    assert [int(s) for s in sections[:13]] == list(range(13)), sections
    assert len(text.splitlines()) > 300
    debian = Path("/usr/share/common-licenses/GPL-2")
    if debian.exists():
        assert text == debian.read_text()


def test_setup_py_shim_builds_the_same_metadata(tmp_path: Path) -> None:
    """The spec's fallback (`setup.py build/install`) reads pyproject.toml through the shim."""
    result = subprocess.run(["/usr/bin/python3", "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    info = (tmp_path / "taskomatic.egg-info" / "PKG-INFO").read_text()
    assert "Name: taskomatic" in info and f"Version: {taskomatic.__version__}" in info
    entry_points = (tmp_path / "taskomatic.egg-info" / "entry_points.txt").read_text()
    assert "taskomatic = taskomatic.cli:main" in entry_points and "[taskomatic.actions]" in entry_points
