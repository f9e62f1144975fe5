#!/usr/bin/env python3
"""Generate packaging/man/taskomatic.8, the manual page the RPM installs, from the
command line's own argument parser (taskomatic.cli.build_parser) and exit codes
(taskomatic/exitcodes.py), so the page lists every subcommand and option there is.

The page is built with argparse-manpage (https://github.com/praiskup/argparse-manpage,
packaged by Fedora and Debian as well), the maintained argparse-to-roff formatter, rather
than hand-written roff: it follows subparsers to any depth and escapes roff for us. This
script adds the sections a daemon's page needs that argparse does not know: exit status,
environment, files, see also. The generated page is committed (the RPM build then needs
neither argparse-manpage nor taskomatic's dependencies); a test
(tests/packaging/test_man.py) fails when it is out of step with the parser.

    python3 packaging/man/make-man.py            # rewrite packaging/man/taskomatic.8
    python3 packaging/man/make-man.py --check    # exit 1 if the committed page is stale
    python3 packaging/man/make-man.py --stdout   # print it instead
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "taskomatic.8"
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))  # the checkout's taskomatic, not an installed one

# argparse wraps usage lines to the terminal width: fix it, so the page is the same everywhere.
os.environ["COLUMNS"] = "80"

from argparse_manpage.manpage import Manpage  # noqa: E402

from taskomatic import __version__  # noqa: E402
from taskomatic.cli import build_parser  # noqa: E402
from taskomatic.config import DEFAULT_CONFIG_PATH  # noqa: E402

SECTION = 8  # system administration commands: it is a daemon
SUMMARY = "run queued virtualization tasks from PostgreSQL on libvirt nodes"
EXITCODES = REPO / "taskomatic" / "exitcodes.py"


def roff(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line starting with a control character."""
    escaped = text.replace("\\", "\\\\").replace("-", "\\-")
    return re.sub(r"(?m)^([.'])", r"\\&\1", escaped)


def exit_status() -> str:
    """One entry per EXIT_* constant of taskomatic/exitcodes.py, described by its comment."""
    entries = []
    for line in EXITCODES.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^EXIT_(\w+) = (\d+)\s*(?:#\s*(.+))?$", line)
        if match:
            name, code, comment = match.groups()
            text = comment or ("success" if code == "0" else name.lower().replace("_", " "))
            entries.append(f".TP\n.B {code}\n{roff(text)}")
    if not entries:
        raise SystemExit(f"no EXIT_NAME = N  # comment lines in {EXITCODES}")
    intro = ("The systemd unit does not restart the service after the codes that waiting cannot cure "
             "(see RestartPreventExitStatus= in taskomatic.service).")
    return roff(intro) + "\n" + "\n".join(entries)


def environment() -> str:
    items = [
        ("TASKOMATIC_DSN", "the libpq connection string (the setting dsn); --dsn wins over it."),
        ("TASKOMATIC_<NAME>", "any setting by its name in capitals, e.g. TASKOMATIC_SHARDS=8: wins over the "
                              "configuration files, loses to the command line."),
        ("PGHOST, PGUSER, PGPASSFILE, ...", "the standard libpq variables, as in every PostgreSQL client."),
        ("STATE_DIRECTORY, RUNTIME_DIRECTORY", "set by systemd (StateDirectory=, RuntimeDirectory=): "
                                                "the state directory and the directory of the sockets "
                                                "between supervisor, fetcher and shards."),
        ("NOTIFY_SOCKET", "set by systemd for Type=notify: READY=1 is sent once the fetcher and every shard "
                          "are up."),
    ]
    return "\n".join(f".TP\n.B {roff(name)}\n{roff(text)}" for name, text in items)


def files() -> str:
    items = [
        (DEFAULT_CONFIG_PATH, "the configuration (INI): every setting, commented out with its default "
                              "and what it does."),
        (f"{DEFAULT_CONFIG_PATH}.d/*.conf", "drop-in files read after it, in name order: local settings "
                                            "kept here survive package upgrades untouched."),
        ("/var/lib/taskomatic", "the service's state directory (StateDirectory=), home of user taskomatic "
                                "(.pgpass, .ssh/ for qemu+ssh nodes)."),
        ("/run/taskomatic", "the service's runtime directory (RuntimeDirectory=): sockets and the "
                            "Prometheus multiprocess samples."),
        ("/usr/lib/systemd/system/taskomatic.service", "the unit; change it with systemctl edit taskomatic."),
        ("/usr/share/doc/taskomatic/README.md", "installation, upgrades, operations and metrics."),
    ]
    return "\n".join(f".TP\n.I {roff(path)}\n{roff(text)}" for path, text in items)


def see_also() -> str:
    pages = ["systemctl(1)", "journalctl(1)", "systemd.exec(5)", "psql(1)", "virsh(1)"]
    return ",\n".join(".BR {} ({})".format(*re.match(r"(.+)\((\d)\)", p).groups())  # type: ignore[union-attr]
                      for p in pages)


def generate() -> str:
    manpage = Manpage(build_parser(), format="pretty")
    manpage.section = SECTION
    manpage.source = f"taskomatic {__version__}"
    manpage.manual = "System Administration"
    manpage.date = ""  # the page changes only with the interface, not with the day it was built
    manpage.description = SUMMARY
    for heading, content in (("exit status", exit_status()), ("environment", environment()),
                             ("files", files()), ("see also", see_also())):
        manpage.add_section(heading.upper(), "=", content)
    return str(manpage)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help=f"exit 1 if {OUTPUT.name} is not current")
    mode.add_argument("--stdout", action="store_true", help="print the page instead of writing it")
    args = parser.parse_args()
    text = generate()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date: run python3 packaging/man/{Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
