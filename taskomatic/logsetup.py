"""Logging and process titles shared by every taskomatic process.

Outside systemd every record is one line on stderr, stamped. When stderr is the
journal (systemd sets ``JOURNAL_STREAM`` to the device:inode of the stream it
gave us; we compare it with stderr's, since a child whose stderr was redirected
inherits the variable too), each record becomes one journal entry with its
priority, so ``journalctl -p warning`` works:

- native protocol (preferred): the record is sent as a datagram to journald's
  socket with ``PRIORITY``, ``SYSLOG_IDENTIFIER`` and, when the log call passes
  them (``extra=task_fields(task)``) or the role names an instance, the
  structured fields ``INSTANCE``, ``TASK_ID``, ``ACTION`` and ``TARGET``
  (``journalctl TASK_ID=12``). A traceback keeps its newlines: one entry.
  The protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL) is a few lines of socket
  code, so it needs no binding library.
- ``<N>`` syslog prefix on stderr: when the socket cannot be used. journald
  splits a stream at every newline, so a multi-line record (a traceback) has
  its newlines written as the two characters ``\\n``: one entry, readable with
  ``journalctl -o cat | sed 's/\\\\n/\\n/g'``, and no continuation line ever
  lands as a separate entry at the default priority.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import sys
from typing import Any, TextIO

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "taskomatic"

# logging level -> syslog priority (journalctl -p takes these).
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
# Record attribute (set with extra=) -> journal field.
_RECORD_FIELDS = {"instance": "INSTANCE", "task_id": "TASK_ID", "action": "ACTION", "target": "TARGET"}
_INSTANCE_IN_ROLE = re.compile(r"\binstance (\d+)\b")


def syslog_priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7  # debug


def task_fields(task: Any) -> dict[str, Any]:
    """``extra=`` for a log call about one task: the journal gets TASK_ID, ACTION and TARGET."""
    return {"task_id": task.id, "action": task.action, "target": f"{task.target_type}:{task.target_id}"}


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """Is this stream (stderr by default) the journal stream systemd connected us to?"""
    device, sep, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        status = os.fstat((stream or sys.stderr).fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):  # closed, not a file, or a malformed variable
        return False


class PrefixFormatter(logging.Formatter):
    """``<N>`` before every record and its newlines escaped: one journal entry per record."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\0", "\\0").replace("\r", "\\r").replace("\n", "\\n")
        return f"<{syslog_priority(record.levelno)}>{text}"


def encode_field(name: str, value: object) -> bytes:
    """One field of the native protocol; a value with a newline is sent with its length."""
    data = str(value).encode("utf-8", "replace")
    key = name.encode("ascii")
    if b"\n" in data:
        return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key + b"=" + data + b"\n"


class JournalHandler(logging.Handler):
    """Send each record to journald as one entry (native protocol), with fields.

    If a datagram cannot be sent (journald restarting, a record larger than a
    datagram), the record goes to ``fallback`` (the prefixed stderr handler)
    rather than being lost.
    """

    def __init__(self, fallback: logging.Handler, path: str = JOURNAL_SOCKET,
                 fields: dict[str, object] | None = None) -> None:
        super().__init__()
        self.fallback = fallback
        self.path = path
        self.fields = dict(fields or {})
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def entry(self, record: logging.LogRecord) -> bytes:
        fields: dict[str, object] = {
            "MESSAGE": self.format(record),
            "PRIORITY": syslog_priority(record.levelno),
            "SYSLOG_IDENTIFIER": IDENTIFIER,
            "LOGGER": record.name,
            **self.fields,
        }
        for attribute, name in _RECORD_FIELDS.items():
            value = getattr(record, attribute, None)
            if value is not None:
                fields[name] = value
        return b"".join(encode_field(name, value) for name, value in fields.items())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self.entry(record)
        except Exception:
            self.handleError(record)
            return
        try:
            self.sock.sendto(data, self.path)
        except OSError:
            self.fallback.handle(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def journal_handler(role: str, stream: TextIO, socket_path: str | None = None) -> logging.Handler:
    """The handler for a process whose stderr is the journal: native if the socket is there."""
    fallback = logging.StreamHandler(stream)
    fallback.setFormatter(PrefixFormatter(f"%(levelname)s [{role}] %(name)s: %(message)s"))
    path = socket_path or JOURNAL_SOCKET
    if not os.path.exists(path):
        return fallback
    instance = _INSTANCE_IN_ROLE.search(role)
    handler = JournalHandler(fallback, path, {"INSTANCE": instance.group(1)} if instance else {})
    handler.setFormatter(logging.Formatter(f"%(levelname)s [{role}] %(name)s: %(message)s"))
    return handler


def setup_logging(level: str, role: str) -> None:
    """One record per line (per journal entry under systemd, which stamps it: no stamp of ours)."""
    handler: logging.Handler
    if stderr_is_journal():
        handler = journal_handler(role, sys.stderr)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s"))
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
        if isinstance(old, JournalHandler):
            old.close()  # its socket; other handlers' streams are not ours to close
    root.addHandler(handler)
    root.setLevel(level.upper())


def set_process_title(title: str) -> None:
    """Show the role in ps/top (``taskomatic: shard 3/8``); harmless if unavailable."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)
