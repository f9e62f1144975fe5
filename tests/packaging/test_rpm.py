"""The RPM, built the way CI and a packager build it: packaging/rpm/build-rpm.sh
(plain rpmbuild, the spec's own fallbacks where Fedora's macros are missing)
from a fresh `git clone` of the committed HEAD. Then `rpm -qlp`/`-qcp` and the
header (URL, license, version, Requires generated from the metadata), the
scriptlets, the unpacked payload (rpm2cpio | cpio) running the packaged
`taskomatic --version`, its man page rendered, its license text, the sysusers.d
file applied to a scratch root, and rpmlint. Nothing is mocked.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.version import Version

from taskomatic import __version__
from tests.packaging import REPO, require_tools, run
from tests.packaging.test_man import assert_complete, render

# Slow (not in the inner loop): builds the RPM.
pytestmark = pytest.mark.slow

UNIT = "/usr/lib/systemd/system/taskomatic.service"
CONF = "/etc/taskomatic/taskomatic.conf"
CONF_D = "/etc/taskomatic/taskomatic.conf.d"
MAN_RE = re.compile(r"^/usr/share/man/man8/taskomatic\.8(\.gz|\.bz2|\.xz|\.zst)?$")
SYSUSERS = "/usr/lib/sysusers.d/taskomatic.conf"
STATE_DIR = "/var/lib/taskomatic"
SITE_RE = re.compile(r"^/usr/lib/python3\.\d+/site-packages$")



@dataclass
class Built:
    rpm: Path
    srpm: Path
    clone: Path
    root: Path  # the binary RPM's payload, unpacked
    files: list[str]
    seconds: float
    bench_rpm: Path  # taskomatic-bench, the subpackage
    bench_root: Path
    bench_files: list[str]

    @property
    def site_packages(self) -> Path:
        init = next(f for f in self.files if f.endswith("/site-packages/taskomatic/__init__.py"))
        return self.root / init.lstrip("/").rsplit("/taskomatic/", 1)[0]


def query(rpm: Path, *args: str) -> str:
    return run(["rpm", "-qp", *args, str(rpm)]).stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    require_tools("git", "rpmbuild", "rpm", "rpm2cpio", "cpio")
    base = tmp_path_factory.mktemp("rpm")
    clone = base / "clone"
    head = run(["git", "-C", str(REPO), "rev-parse", "HEAD"]).stdout.strip()
    run(["git", "clone", "-q", str(REPO), str(clone)])
    run(["git", "-C", str(clone), "checkout", "-q", "--detach", head])

    started = time.monotonic()
    result = run(["bash", str(clone / "packaging/rpm/build-rpm.sh"), str(base / "out")], timeout=600)
    seconds = time.monotonic() - started
    print(f"\nbuild-rpm.sh built {head[:12]} in {seconds:.1f}s")
    paths = [Path(line) for line in result.stdout.splitlines() if line.endswith(".rpm")]
    rpm = next(p for p in paths if p.name.startswith(f"taskomatic-{__version__}-") and p.name.endswith(".noarch.rpm"))
    bench_rpm = next(p for p in paths if p.name.startswith(f"taskomatic-bench-{__version__}-"))
    srpm = next(p for p in paths if p.name.endswith(".src.rpm"))
    assert len(paths) == 3, paths

    roots = []
    for package, name in ((rpm, "root"), (bench_rpm, "bench-root")):
        roots.append(base / name)
        roots[-1].mkdir()
        run(["bash", "-o", "pipefail", "-c", f'rpm2cpio "{package}" | cpio -idm --quiet'], cwd=roots[-1])
    return Built(rpm, srpm, clone, roots[0], query(rpm, "-l").splitlines(), seconds, bench_rpm, roots[1],
                 query(bench_rpm, "-l").splitlines())


def test_rpm_holds_entry_point_unit_config_sysusers_and_package(built: Built) -> None:
    files = set(built.files)
    expected = {"/usr/bin/taskomatic", UNIT, CONF, CONF_D, SYSUSERS, STATE_DIR,
                "/usr/share/licenses/taskomatic/LICENSE", "/usr/share/doc/taskomatic/README.md"}
    assert expected <= files, f"missing from the RPM: {sorted(expected - files)}"
    assert [f for f in files if MAN_RE.match(f)], "no man page taskomatic(8)"
    inits = [f for f in files if f.endswith("/site-packages/taskomatic/__init__.py")]
    assert len(inits) == 1 and SITE_RE.match(inits[0].rsplit("/taskomatic/", 1)[0]), inits
    site = inits[0].rsplit("/taskomatic/", 1)[0]
    # Every module and data file of the checkout's package is in it (a directory that
    # find_packages() skips, or a file package_data misses, shows up here).
    source = built.clone / "taskomatic"
    wanted = {f"{site}/taskomatic/{p.relative_to(source)}" for p in source.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    packaged = {f for f in files if f.startswith(f"{site}/taskomatic/") and "__pycache__" not in f}
    packaged_files = {f for f in packaged if (built.root / f.lstrip("/")).is_file()}
    assert not wanted - packaged_files, f"not in the RPM: {sorted(wanted - packaged_files)}"
    assert not packaged_files - wanted, f"in the RPM but not in the checkout: {sorted(packaged_files - wanted)}"
    assert any(re.match(rf"{re.escape(site)}/taskomatic-{re.escape(__version__)}[-.].*(egg|dist)-info$", f)
               for f in files), "no package metadata (egg-info or dist-info)"


def test_config_is_marked_config_noreplace_with_its_owners(built: Built) -> None:
    assert query(built.rpm, "-c").split() == [CONF]
    rows = query(built.rpm, "--queryformat",
                 r"[%{FILENAMES}\t%{FILEFLAGS:fflags}\t%{FILEMODES:perms}\t%{FILEUSERNAME}\t%{FILEGROUPNAME}\n]")
    attrs = {name: rest for name, *rest in (line.split("\t") for line in rows.splitlines())}
    flags, mode, user, group = attrs[CONF]
    assert "c" in flags and "n" in flags, f"{CONF} is not %config(noreplace): flags {flags!r}"
    assert (mode, user, group) == ("-rw-r-----", "root", "taskomatic")
    assert attrs[STATE_DIR][1:] == ["drwx------", "taskomatic", "taskomatic"]
    # The drop-in directory is the package's (created, removed with it), readable like the file.
    assert attrs[CONF_D][1:] == ["drwxr-x---", "root", "taskomatic"]
    owner = run(["rpm", "-qp", "--queryformat", r"[%{FILENAMES} %{FILEMODES:perms}\n]", str(built.rpm)]).stdout
    assert f"{CONF_D} drwxr-x---" in owner.splitlines()
    assert attrs["/usr/bin/taskomatic"][1:] == ["-rwxr-xr-x", "root", "root"]
    assert attrs[UNIT][1:] == ["-rw-r--r--", "root", "root"]
    # The payload carries the checkout's files unchanged.
    for packaged, source in ((CONF, "taskomatic.conf"), (UNIT, "taskomatic.service"),
                             (SYSUSERS, "taskomatic.sysusers")):
        assert (built.root / packaged.lstrip("/")).read_text() == \
            (built.clone / "packaging/rpm" / source).read_text(), packaged


def test_header_noarch_license_url_and_version(built: Built) -> None:
    header = query(built.rpm, "--queryformat", r"%{NAME}\t%{VERSION}\t%{ARCH}\t%{LICENSE}\t%{URL}")
    homepage = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Homepage"]
    assert header.split("\t") == ["taskomatic", __version__, "noarch", "GPL-2.0-or-later", homepage]
    # One version: the code's, the packaged metadata's and the RPM's.
    dist = next(iter(importlib.metadata.distributions(name="taskomatic", path=[str(built.site_packages)])))
    assert dist.version == __version__
    init = (built.site_packages / "taskomatic" / "__init__.py").read_text()
    assert f'__version__ = "{__version__}"' in init


def test_requires_are_generated_from_the_metadata(built: Built) -> None:
    requires = query(built.rpm, "--requires").splitlines()
    # rpm's Python dependency generator turned every runtime requirement of the package's
    # metadata into python3.X dist(name) >= version; the spec adds no python3-* of its own.
    dist = next(iter(importlib.metadata.distributions(name="taskomatic", path=[str(built.site_packages)])))
    runtime = [r for r in dist.requires or [] if "extra ==" not in r]
    assert {"psycopg2", "libvirt-python", "multiprocess", "sdnotify"} <= \
        {re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in runtime}  # type: ignore[union-attr]
    generated = {}
    for line in requires:
        match = re.match(r"python3(?:\.\d+)?dist\(([^)]+)\)(?: >= (\S+))?$", line)
        if match:
            generated[match.group(1)] = match.group(2)
    for requirement in runtime:
        name, minimum = re.match(r"([A-Za-z0-9_.-]+)>=([\d.]+)$", requirement).groups()  # type: ignore[union-attr]
        assert name.lower() in generated, f"no generated Requires for {requirement}: {requires}"
        assert generated[name.lower()] and Version(generated[name.lower()]) == Version(minimum), \
            (requirement, generated[name.lower()])
    hand_written = [line for line in requires if re.match(r"python3-", line)]
    assert not hand_written, f"Requires not generated from the metadata: {hand_written}"
    # rpm's Python dependency generator read the metadata (it needs python3-packaging on Debian).
    provides = query(built.rpm, "--provides").split()
    assert "python3dist(taskomatic)" in provides, f"no python3dist(taskomatic) in {provides}"


def test_man_page_is_packaged_and_renders(built: Built, tmp_path: Path) -> None:
    packaged = next(f for f in built.files if MAN_RE.match(f))
    page = built.root / packaged.lstrip("/")
    if page.suffix != ".8":  # brp-compress compressed it (Fedora)
        plain = tmp_path / "taskomatic.8"
        tool = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}[page.suffix]
        plain.write_text(run([tool, "-dc", str(page)]).stdout)
        page = plain
    assert page.read_text() == (built.clone / "packaging/man/taskomatic.8").read_text()
    assert_complete(render(page))
    if shutil.which("man"):
        shown = run(["man", "-l", str(built.root / packaged.lstrip("/"))],
                    env={"MANPAGER": "cat", "MANWIDTH": "100", "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
        assert shown.stdout.startswith("TASKOMATIC(8)"), shown.stdout[:200]


def test_license_file_is_the_full_gpl_text(built: Built) -> None:
    licenses = query(built.rpm, "--licensefiles").split()
    assert licenses == ["/usr/share/licenses/taskomatic/LICENSE"]
    text = (built.root / licenses[0].lstrip("/")).read_text()
    assert text == (REPO / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE\n                       Version 2, June 1991" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 300


@pytest.mark.parametrize("tag", ["PREIN", "POSTIN", "PREUN", "POSTUN"])
def test_scriptlets_are_valid_shell_for_the_service_and_user(built: Built, tag: str) -> None:
    script = query(built.rpm, "--queryformat", f"%{{{tag}}}")
    prog = query(built.rpm, "--queryformat", f"%{{{tag}PROG}}")
    assert script != "(none)" and prog == "/bin/sh", (tag, prog, script)
    run(["sh", "-n"], input=script)  # `sh -n` parses without running
    wanted = "taskomatic" if tag == "PREIN" else "taskomatic.service"
    assert wanted in script, script


def test_sysusers_file_creates_the_service_user(built: Built, tmp_path: Path) -> None:
    require_tools("systemd-sysusers")
    root = tmp_path / "sysroot"
    (root / "etc").mkdir(parents=True)
    run(["systemd-sysusers", f"--root={root}", str(built.root / SYSUSERS.lstrip("/"))])
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    _name, _, uid, gid, _gecos, home, shell = users["taskomatic"]
    assert int(uid) < 1000 and home == STATE_DIR and shell.endswith("nologin"), users["taskomatic"]
    assert groups["taskomatic"][2] == gid  # its own group, of the same name


def test_packaged_entry_point_runs_from_the_unpacked_tree(built: Built, tmp_path: Path) -> None:
    script = built.root / "usr/bin/taskomatic"
    assert script.read_text().startswith("#!/usr/bin/python3"), script.read_text().splitlines()[0]
    # This interpreter has the dependencies; PYTHONPATH puts the unpacked tree first, and the
    # empty working directory keeps the checkout off sys.path. The script runs as it would from
    # /usr/bin; afterwards the module it imported is printed, so its origin can be checked.
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{str(script)!r}, '--version']\n"
        "try:\n"
        f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "finally:\n"
        "    print('imported', sys.modules['taskomatic.cli'].__file__)\n"
    )
    empty = tmp_path / "cwd"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(built.site_packages)
    result = subprocess.run([sys.executable, "-s", "-c", probe], capture_output=True, text=True,
                            cwd=empty, env=env, timeout=60)
    print(result.stdout, result.stderr, sep="")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"taskomatic {__version__}" in lines
    imported = Path(next(line for line in lines if line.startswith("imported ")).split(" ", 1)[1])
    assert imported == built.site_packages / "taskomatic" / "cli.py"


def test_packaged_entry_points_load_from_the_unpacked_tree(built: Built, tmp_path: Path) -> None:
    """Every entry point in the packaged metadata (the console script, the action plugins)
    loads, and every module it pulls in comes from the unpacked tree."""
    probe = (
        "import importlib.metadata as md, sys\n"
        f"site = {str(built.site_packages)!r}\n"
        "dist = next(iter(md.distributions(name='taskomatic', path=[site])))\n"
        "for ep in dist.entry_points:\n"
        "    ep.load()\n"
        "    print('loaded', ep.group, ep.name, ep.value)\n"
        "outside = sorted(n for n, m in sys.modules.items() if n.split('.')[0] == 'taskomatic'\n"
        "                 and not (getattr(m, '__file__', None) or site).startswith(site + '/'))\n"
        "print('outside', outside)\n"
    )
    empty = tmp_path / "cwd"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(built.site_packages)
    result = subprocess.run([sys.executable, "-s", "-c", probe], capture_output=True, text=True,
                            cwd=empty, env=env, timeout=60)
    print(result.stdout, result.stderr, sep="")
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = [line.split()[1:3] for line in result.stdout.splitlines() if line.startswith("loaded ")]
    assert ["console_scripts", "taskomatic"] in loaded
    assert any(group == "taskomatic.actions" for group, _ in loaded), loaded
    assert "outside []" in result.stdout.splitlines()


# Everything rpmlint may say about the package, each with its reason: what Debian's
# rpmlint and rpm cannot know (Fedora's configuration and build root do), and the
# permissions chosen on purpose. The README's install section lists the same.
EXPECTED_RPMLINT = {
    # What Debian's builder cannot know.
    r"E: no-signature": "packages are signed by the distribution's build system, not by rpmbuild",
    r"E: no-packager-tag": "Fedora's guidelines say not to set Packager:",
    r"E: no-group-tag": "Fedora's guidelines say not to set Group:",
    r"W: no-buildroot-tag": "BuildRoot: is obsolete since rpm 4.6; Fedora's guidelines say not to set it",
    r"W: invalid-license GPL-2\.0-or-later": "an SPDX identifier, as Fedora requires; this rpmlint knows "
                                            "only the old short names",
    r"W: non-standard-uid \S+ taskomatic": "the user comes from the package's own sysusers.d file, "
                                          "which this rpmlint does not read",
    r"W: non-standard-gid \S+ taskomatic": "the group comes from the package's own sysusers.d file",
    r"E: hardcoded-library-path in %\{_prefix\}/lib/sysusers\.d": "the spec's fallback for _sysusersdir, "
                                                                 "which Fedora's systemd-rpm-macros define",
    r"W: no-manual-page-for-binary taskomatic": "rpmlint 2.4 collects man page sections instead of names; "
                                                "taskomatic(8) is in the package",
    r"W: manpage-not-compressed bz2 /usr/share/man/man8/taskomatic\.8$": "Debian's brp-compress fails under "
                                                                       "dash (read -d); Fedora's gzips the page",
    # The taskomatic-bench subpackage.
    r"taskomatic-bench\.noarch: W: requires-on-release taskomatic = [\d.]+-\d+": "Fedora's guidelines: a subpackage "
                                                                             "requires its base package's exact "
                                                                             "version-release",
    r"taskomatic-bench\.noarch: W: no-documentation": "its documentation is the main package's README and "
                                                     "taskomatic(8), which it requires",
    # On purpose.
    r"W: invalid-url Source0: taskomatic-[\d.]+\.tar\.gz": "the tarball is made from the checkout by "
                                                          "build-rpm.sh (git archive); no release downloads yet",
    r"E: non-standard-dir-perm /var/lib/taskomatic 700": "the service user's state directory only "
                                                        "(the unit's StateDirectoryMode=0700)",
    r"E: non-readable /etc/taskomatic/taskomatic\.conf 640": "the dsn may hold a database password: "
                                                           "readable by root and group taskomatic only",
    r"E: non-standard-dir-perm /etc/taskomatic/taskomatic\.conf\.d 750": "drop-ins may hold the password: "
                                                                       "root and group taskomatic only, "
                                                                       "whatever mode a drop-in file has",
}


def test_rpmlint_reports_nothing_unexpected(built: Built) -> None:
    require_tools("rpmlint")
    result = run(["rpmlint", str(built.rpm), str(built.bench_rpm), str(built.srpm)], check=False)
    print(result.stdout, result.stderr, sep="")
    assert re.search(r"\b3 packages and \d+ specfiles checked", result.stdout), "rpmlint did not check all three"
    reports = [line for line in result.stdout.splitlines() if re.search(r": [EW]: ", line)]
    unexpected = [r for r in reports if not any(re.search(p, r) for p in EXPECTED_RPMLINT)]
    for report in reports:
        reason = next((r for p, r in EXPECTED_RPMLINT.items() if re.search(p, report)), None)
        print(f"{report}  -> {'expected: ' + reason if reason else 'UNEXPECTED'}")
    assert not unexpected, "rpmlint:\n" + "\n".join(unexpected)


def test_readme_lists_every_expected_rpmlint_report() -> None:
    readme = (REPO / "README.md").read_text()
    install = readme.split("## Installing on a Fedora node", 1)[1].split("\n## ", 1)[0]
    for pattern in EXPECTED_RPMLINT:
        name = re.search(r"[EW]: ([a-z-]+)", pattern).group(1)  # type: ignore[union-attr]
        assert f"`{name}`" in install, f"README's install section does not explain rpmlint's {name}"


# -- taskomatic-bench: the benchmark suite and its plotting dependency, outside the main package --

BENCH_PACKAGES = ("bench", "bench/multihost", "bench/plugin")


def test_bench_subpackage_holds_the_bench_modules_and_the_main_package_none(built: Built) -> None:
    init = next(f for f in built.files if f.endswith("/site-packages/taskomatic/__init__.py"))
    site = init.rsplit("/taskomatic/", 1)[0]
    wanted = {f"{site}/{p.relative_to(built.clone)}" for d in BENCH_PACKAGES
              for p in (built.clone / d).glob("*.py")}
    packaged = {f for f in built.bench_files if f.endswith(".py")}
    assert wanted and packaged == wanted, (sorted(wanted - packaged), sorted(packaged - wanted))
    assert all(f.startswith(f"{site}/bench") for f in built.bench_files), built.bench_files
    assert not [f for f in built.files if f.startswith(f"{site}/bench")], "bench modules in the main package"
    # The planner is the main package's: taskomatic plan needs no taskomatic-bench.
    assert f"{site}/taskomatic/capacity/model.py" in built.files


def test_bench_subpackage_requires_the_main_package_and_matplotlib(built: Built) -> None:
    requires = query(built.bench_rpm, "--requires").splitlines()
    release = query(built.rpm, "--queryformat", r"%{VERSION}-%{RELEASE}")
    assert f"taskomatic = {release}" in requires, requires
    assert "python3dist(matplotlib) >= 3.5" in requires, requires
    main = query(built.rpm, "--requires")
    assert "matplotlib" not in main, "the main package must not pull in the plotting stack"


def test_bench_and_plan_run_from_the_unpacked_packages(built: Built, tmp_path: Path) -> None:
    script = built.root / "usr/bin/taskomatic"
    bench_site = built.bench_root / built.site_packages.relative_to(built.root)
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{str(script)!r}, *sys.argv[1:]]\n"
        "try:\n"
        f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "finally:\n"
        "    print('imported', getattr(sys.modules.get('bench.run'), '__file__', None))\n"
    )
    empty = tmp_path / "cwd"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(built.site_packages), str(bench_site)])
    for command in (["bench", "--help"], ["plan", "--help"]):
        result = subprocess.run([sys.executable, "-s", "-c", probe, *command], capture_output=True, text=True,
                                cwd=empty, env=env, timeout=60)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"usage: taskomatic {command[0]}" in result.stdout
    # taskomatic bench loads the suite from the subpackage's tree (the bench's help needs no import;
    # --only with an unknown workload gets as far as the suite's own check).
    result = subprocess.run([sys.executable, "-s", "-c", probe, "bench", "--only", "nonesuch"], capture_output=True,
                            text=True, cwd=empty, env=env, timeout=60)
    assert result.returncode == 2 and "unknown workload(s) nonesuch" in result.stderr, result.stderr[-3000:]
    imported = next(line for line in result.stdout.splitlines() if line.startswith("imported "))
    assert imported == f"imported {bench_site / 'bench' / 'run.py'}"


def test_quick_bench_and_a_plan_from_the_fleets_history_with_only_the_packages(built: Built, dsn: str,
                                                                                tmp_path: Path) -> None:
    """Issue 18's "done when", from the unpacked packages with no source checkout on the path: the
    benchmark runs (the smoke size of the quick suite's first workload, on a private PostgreSQL it
    starts itself) and writes its report; then `taskomatic plan` plans from a tasks table's history."""
    import datetime as dt

    import psycopg2

    script = built.root / "usr/bin/taskomatic"
    bench_site = built.bench_root / built.site_packages.relative_to(built.root)
    empty = tmp_path / "cwd"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(built.site_packages), str(bench_site)])
    launcher = (f"import runpy, sys\nsys.argv = [{str(script)!r}, *sys.argv[1:]]\n"
                f"runpy.run_path({str(script)!r}, run_name='__main__')\n")

    def taskomatic(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-s", "-c", launcher, *args], capture_output=True, text=True,
                              cwd=empty, env=env, timeout=timeout)

    out = tmp_path / "report"
    result = taskomatic("bench", "--smoke", "--only", "noop-uniform", "--no-progress", "--no-plots",
                        "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["checks"]["taskomatic_order_ok"] and report["checks"]["all_runs_complete"]
    assert "noop-uniform" in (out / "report.md").read_text()
    # The source tree was never imported: everything came from the packages.
    assert str(REPO) not in json.dumps(report.get("settings", {}))

    # A fleet's history: 40 start_vm over 20 VMs in the last hour, each started 1 s after it was queued and
    # run for 2 s. The plan must read it (read-only) and answer from it.
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        for i in range(40):
            created = now - dt.timedelta(minutes=50) + dt.timedelta(seconds=60 * i)
            cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action, state, created_at, "
                        "time_started, time_ended) VALUES ('Vm', %s, 'start_vm', 'finished', %s, %s, %s)",
                        (i % 20 + 1, created, created + dt.timedelta(seconds=1), created + dt.timedelta(seconds=3)))
    conn.close()
    result = taskomatic("--dsn", dsn, "plan", "--since", "2h", "--json", timeout=120)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    plan = json.loads(result.stdout)
    assert plan["history"]["tasks"] == 40 and plan["history"]["keys"] == 20
    start_vm = next(a for a in plan["actions"] if a["action"] == "start_vm")
    assert start_vm["run_mean_s"] == pytest.approx(2.0, abs=0.01)
    assert start_vm["measured_wait_p95_s"] == pytest.approx(1.0, abs=0.01)
    assert isinstance(plan["answer"]["shards"], int)
