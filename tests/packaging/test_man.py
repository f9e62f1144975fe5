"""The manual page taskomatic(8), packaging/man/taskomatic.8: what make-man.py generates
from the argument parser now, valid roff that groff renders without a warning, with a
section for every subcommand (at any depth) and option, every exit code of
taskomatic/exitcodes.py, and the files the package installs. (The RPM's copy is
checked in test_rpm.py with the same helpers.)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from taskomatic import exitcodes
from taskomatic.cli import build_parser
from tests.packaging import REPO, require_tools, run

MAN_DIR = REPO / "packaging" / "man"
PAGE = MAN_DIR / "taskomatic.8"


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Every subcommand path ("db", "db upgrade", ...) of the parser, depth first."""
    found: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                path = f"{prefix}{name}"
                found += [path, *subcommands(child, path + " ")]
    return found


def options(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option of the parser and its subcommands (but argparse's own --help)."""
    found = {s for a in parser._actions if not isinstance(a, argparse._HelpAction)
             for s in a.option_strings if s.startswith("--")}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found |= options(child)
    return found


def render(page: Path) -> str:
    """The page as plain text, one very long line per paragraph; fails on any groff warning."""
    require_tools("groff")
    result = run(["groff", "-man", "-Tutf8", "-ww", "-rLL=500n", "-rHY=0", "-P-cbou", str(page)])
    assert not result.stderr.strip(), f"groff warns about {page}:\n{result.stderr}"
    return result.stdout


def assert_complete(text: str) -> None:
    """The rendered page documents every subcommand, option and exit code, and the packaged files."""
    headings = set(re.findall(r"(?m)^COMMAND '(.+)'$", text))
    expected = {f"taskomatic {path}" for path in subcommands(build_parser())}
    assert expected and expected <= headings, f"no section for: {sorted(expected - headings)}"
    assert not options(build_parser()) - set(re.findall(r"--[a-z][a-z0-9-]*", text))
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO"):
        assert re.search(rf"(?m)^{heading}$", text), heading
    assert re.search(r"(?m)^NAME\n\s+taskomatic - \S", text), "NAME needs 'taskomatic - summary'"
    status = text.split("\nEXIT STATUS\n", 1)[1].split("\nENVIRONMENT\n", 1)[0]
    codes = {value for name, value in vars(exitcodes).items() if name.startswith("EXIT_")}
    listed = {int(code) for code in re.findall(r"(?m)^\s+(\d+)\s{2,}\S", status)}
    assert listed == codes, (sorted(listed), sorted(codes))
    for path in ("/etc/taskomatic/taskomatic.conf", "/etc/taskomatic/taskomatic.conf.d/*.conf",
                 "/var/lib/taskomatic", "/run/taskomatic"):
        assert re.search(rf"(?m)^\s+{re.escape(path)}$", text), path


def test_committed_page_is_what_make_man_generates() -> None:
    generated = run([sys.executable, str(MAN_DIR / "make-man.py"), "--stdout"]).stdout
    assert generated == PAGE.read_text(), \
        "packaging/man/taskomatic.8 is stale: run python3 packaging/man/make-man.py and commit it"
    run([sys.executable, str(MAN_DIR / "make-man.py"), "--check"])


def test_page_renders_and_documents_every_subcommand_and_exit_code() -> None:
    text = PAGE.read_text()
    assert text.startswith('.TH TASKOMATIC "8" ')
    assert_complete(render(PAGE))


def test_completeness_check_notices_a_missing_subcommand(tmp_path: Path) -> None:
    """assert_complete is no formality: the page without one subcommand's section fails it."""
    text = PAGE.read_text()
    section = re.search(r"(?ms)^\.SH COMMAND \\fI\\,'taskomatic status'\\/\\fR\n.*?(?=^\.SH )", text)
    assert section, "no section for taskomatic status"
    broken = tmp_path / "taskomatic.8"
    broken.write_text(text.replace(section.group(0), ""))
    try:
        assert_complete(render(broken))
    except AssertionError as error:
        assert "taskomatic status" in str(error)
    else:
        raise AssertionError("a page without 'taskomatic status' passed")


def test_man_finds_and_formats_the_page(tmp_path: Path) -> None:
    require_tools("man")
    result = run(["man", "-l", str(PAGE)], env={"MANWIDTH": "100", "MANPAGER": "cat", "PAGER": "cat",
                                                 "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
    assert result.stdout.startswith("TASKOMATIC(8)") and "System Administration" in result.stdout.splitlines()[0]
