"""Logging and process titles shared by every taskomatic process."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str, role: str) -> None:
    """One line per event on stderr; no timestamps of our own under systemd
    (journald stamps every line, and JOURNAL_STREAM tells us it is there)."""
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    stamp = "" if under_journald else "%(asctime)s "
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{stamp}%(levelname)s [{role}] %(name)s: %(message)s"))
    # Nothing in that format needs the caller's file and line, the thread or the
    # process (the role names the process): skip collecting them for every record
    # (the logging HOWTO's "Optimization"; a shard may log thousands of lines a second).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def set_process_title(title: str) -> None:
    """Show the role in ps/top (``taskomatic: shard 3/8``); harmless if unavailable."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)
