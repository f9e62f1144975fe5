"""Logging to the journal: a priority on every entry, a traceback as one entry, task fields."""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from taskomatic import logsetup


def _journal_stream_of(path: Path) -> str:
    status = os.stat(path)
    return f"{status.st_dev}:{status.st_ino}"


def _parse_entry(data: bytes) -> dict[str, str]:
    """Decode one native-protocol datagram (KEY=value lines, or KEY, length, value)."""
    fields: dict[str, str] = {}
    while data:
        line, _, rest = data.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            data = rest
        else:
            (length,) = struct.unpack("<Q", rest[:8])
            fields[line.decode()] = rest[8:8 + length].decode()
            assert rest[8 + length:9 + length] == b"\n"
            data = rest[9 + length:]
    return fields


def _raise_and_log(logger: logging.Logger, **extra: object) -> None:
    try:
        raise ValueError("disk on fire")
    except ValueError:
        logger.exception("task failed unexpectedly", extra=extra or None)


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("taskomatic.test_logsetup")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def test_stderr_is_journal_only_when_the_stream_matches(tmp_path, monkeypatch):
    ours, other = tmp_path / "stream", tmp_path / "other"
    ours.touch()
    other.touch()
    with ours.open("w") as stream:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        assert not logsetup.stderr_is_journal(stream)
        monkeypatch.setenv("JOURNAL_STREAM", _journal_stream_of(ours))
        assert logsetup.stderr_is_journal(stream)
        # Inherited by a process whose stderr was redirected elsewhere: not the journal.
        monkeypatch.setenv("JOURNAL_STREAM", _journal_stream_of(other))
        assert not logsetup.stderr_is_journal(stream)
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not logsetup.stderr_is_journal(stream)
        monkeypatch.setenv("JOURNAL_STREAM", "1:x")
        assert not logsetup.stderr_is_journal(stream)


@pytest.mark.parametrize(("level", "priority"), [
    (logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6), (logging.DEBUG, 7),
])
def test_levels_map_to_syslog_priorities(level, priority):
    assert logsetup.syslog_priority(level) == priority


def test_prefixed_lines_carry_a_priority_and_a_traceback_stays_one_line(tmp_path, logger):
    out = tmp_path / "stderr"
    with out.open("w") as stream:
        logger.addHandler(logsetup.journal_handler("instance 3 shard 0", stream, socket_path=str(tmp_path / "none")))
        logger.debug("looking")
        logger.info("started")
        logger.warning("slow node")
        logger.error("gave up")
        _raise_and_log(logger)
    lines = out.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<3>"]
    assert lines[1] == "<6>INFO [instance 3 shard 0] taskomatic.test_logsetup: started"
    # Five records, five lines: the traceback's lines are escaped into its own record.
    assert "Traceback (most recent call last):\\n" in lines[4]
    assert lines[4].endswith("ValueError: disk on fire")


def _bound_socket(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    return server


def test_native_protocol_sends_one_entry_with_priority_and_task_fields(tmp_path, logger):
    path = tmp_path / "journal.sock"
    server = _bound_socket(path)
    try:
        with (tmp_path / "stderr").open("w") as stream:
            logger.addHandler(logsetup.journal_handler("instance 7 shard 2", stream, socket_path=str(path)))
            task = SimpleNamespace(id=12, action="start_vm", target_type="Vm", target_id=3)
            _raise_and_log(logger, **logsetup.task_fields(task))
            logger.info("plain line")
        first = _parse_entry(server.recv(65536))
        second = _parse_entry(server.recv(65536))
    finally:
        server.close()
    assert first["PRIORITY"] == "3"
    assert first["SYSLOG_IDENTIFIER"] == "taskomatic"
    assert first["MESSAGE"].startswith("ERROR [instance 7 shard 2] taskomatic.test_logsetup: task failed")
    # The whole traceback is in this one entry, newlines kept.
    assert "\nTraceback (most recent call last):\n" in first["MESSAGE"]
    assert first["MESSAGE"].endswith("ValueError: disk on fire")
    assert (first["INSTANCE"], first["TASK_ID"], first["ACTION"], first["TARGET"]) == ("7", "12", "start_vm", "Vm:3")
    assert second["PRIORITY"] == "6" and second["MESSAGE"].endswith("plain line")
    assert second["INSTANCE"] == "7" and "TASK_ID" not in second
    assert (tmp_path / "stderr").read_text() == ""


def test_native_protocol_falls_back_to_prefixed_stderr_when_journald_is_gone(tmp_path, logger):
    path = tmp_path / "journal.sock"
    server = _bound_socket(path)
    with (tmp_path / "stderr").open("w") as stream:
        logger.addHandler(logsetup.journal_handler("supervisor", stream, socket_path=str(path)))
        server.close()
        path.unlink()  # journald restarting: nobody at the socket
        _raise_and_log(logger)
    lines = (tmp_path / "stderr").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("<3>ERROR [supervisor]")
    assert lines[0].endswith("ValueError: disk on fire")


def _child_logs(tmp_path: Path, env: dict[str, str], journal_stream: bool) -> str:
    """setup_logging in a real process whose stderr is a file (the journal, if JOURNAL_STREAM names it)."""
    out = tmp_path / "child-stderr"
    out.touch()
    if journal_stream:
        env = {**env, "JOURNAL_STREAM": _journal_stream_of(out)}
    code = (
        "import logging; from taskomatic import logsetup\n"
        "logsetup.JOURNAL_SOCKET = '/nonexistent/journal.sock'\n"
        "logsetup.setup_logging('info', role='cli')\n"
        "log = logging.getLogger('taskomatic.child')\n"
        "log.warning('careful')\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n    log.exception('boom')\n"
    )
    with out.open("a") as stream:
        subprocess.run([sys.executable, "-c", code], stderr=stream, env=env, check=True, timeout=60)
    return out.read_text()


def test_setup_logging_prefixes_when_stderr_is_the_journal(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    lines = _child_logs(tmp_path, env, journal_stream=True).splitlines()
    assert lines[0] == "<4>WARNING [cli] taskomatic.child: careful"
    assert len(lines) == 2 and lines[1].startswith("<3>ERROR [cli] taskomatic.child: boom\\nTraceback")


def test_setup_logging_keeps_the_stamped_format_outside_the_journal(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    text = _child_logs(tmp_path, env, journal_stream=False)
    first = text.splitlines()[0]
    assert first.endswith(" WARNING [cli] taskomatic.child: careful") and first[:4].isdigit()
    assert "\nTraceback (most recent call last):\n" in text
