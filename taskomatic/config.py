"""Configuration: defaults < config file < environment < command line.

The file is INI (``configparser``, the standard library's well-kept parser,
and the format every other file in /etc/ on a Fedora node uses). Every
setting is declared once in ``SETTINGS`` with its type, default and help;
the README's table is generated from the same list. A setting ``name`` in
section ``[sec]`` is overridden by the environment variable
``TASKOMATIC_<NAME>`` and by ``--set sec.name=value`` (or its own flag).
"""

from __future__ import annotations

import configparser
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/taskomatic/taskomatic.conf"


class ConfigError(Exception):
    """A configuration problem, with where it is (file and line) when known."""

    def __init__(self, reason: str, path: str | None = None, line: int | None = None) -> None:
        self.reason = reason
        self.path = path
        self.line = line
        where = path or ""
        if path and line:
            where = f"{path}:{line}"
        super().__init__(f"{where}: {reason}" if where else reason)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"expected a boolean (yes/no, true/false, on/off, 1/0), got {text!r}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be greater than 0, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a TCP port (1-65535) or 0 for off, got {value}")
    return value


def _dsn(text: str) -> str:
    """A libpq connection string (key=value pairs or a postgresql:// URI), checked by libpq's own parser.

    Only libpq's reason is shown, never the string: it may hold a password.
    """
    value = text.strip()
    if value:
        import psycopg2.extensions

        try:
            psycopg2.extensions.parse_dsn(value)
        except psycopg2.ProgrammingError as exc:
            reason = str(exc).strip().removeprefix("invalid dsn: ")
            if "password" in value.lower():  # libpq quotes the word it stopped at: maybe the password
                reason = re.sub(r'after "[^"]*"', 'after "…"', reason)
            raise ValueError(f"not a valid libpq connection string: {reason}") from None
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    return parse


def _log_level(text: str) -> str:
    return _choice("debug", "info", "warning", "error")(text.strip().lower())


@dataclass(frozen=True)
class Setting:
    section: str
    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str

    @property
    def env_var(self) -> str:
        return "TASKOMATIC_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("database", "dsn", _dsn, "",
            "libpq connection string; empty means a private PostgreSQL under state_dir"),
    Setting("database", "connect_timeout", _positive_float, 10.0,
            "seconds to wait for a database connection"),
    Setting("database", "startup_retry_max", _positive_float, 60.0,
            "daemon start with the database down: longest wait between connection attempts (waits "
            "double from 1 s; it waits as long as it takes, logging each attempt)"),
    Setting("daemon", "mode", _choice("standalone", "multihost"), "standalone",
            "standalone refuses to share the database; multihost shares it with other instances"),
    Setting("daemon", "shards", _positive_int, 4,
            "shard processes (tasks of different resources run in parallel, one per shard)"),
    Setting("daemon", "state_dir", str, "",
            "where the private PostgreSQL and runtime files live; empty: /var/lib/taskomatic "
            "as root, else $XDG_STATE_HOME/taskomatic"),
    Setting("daemon", "routing", _choice("hash", "pinned"), "pinned",
            "which shard runs a key's tasks: pinned (any shard with room, kept while the key has tasks "
            "in flight there) or hash (always shard partition mod shards, whatever its load)"),
    Setting("daemon", "claim_batch", _positive_int, 200,
            "most tasks the fetcher claims in one statement"),
    Setting("daemon", "max_claimed_per_shard", _positive_int, 500,
            "most claimed-but-unfinished tasks held per shard (bounds memory and what a drain hands back)"),
    Setting("daemon", "poll_interval", _positive_float, 2.0,
            "seconds between queue polls when no notification arrives (LISTEN/NOTIFY wakes it sooner)"),
    Setting("daemon", "drain_timeout", _positive_float, 300.0,
            "seconds a SIGTERM drain waits for running tasks before stopping fast"),
    Setting("daemon", "fast_stop_timeout", _positive_float, 10.0,
            "seconds a fast stop waits for processes before killing them"),
    Setting("multihost", "lease_seconds", _positive_float, 10.0,
            "multihost: how long an instance's key claims stay valid without a renewal; shorter means "
            "faster takeover after a crash, but more renewal traffic and keys lost on a shorter "
            "database hiccup"),
    Setting("multihost", "lease_renew_interval", _positive_float, 2.0,
            "multihost: seconds between lease renewals (at most a third of lease_seconds, so one "
            "missed renewal costs nothing)"),
    Setting("multihost", "keys_per_shard", _positive_int, 2,
            "multihost: most ordering keys an instance holds per shard (one running, the next one "
            "ready); more hides claim latency, fewer spreads keys more evenly across instances"),
    Setting("multihost", "tasks_per_key", _positive_int, 16,
            "multihost: most claimed tasks of one key an instance loads at a time"),
    Setting("daemon", "heartbeat_timeout", _positive_float, 60.0,
            "seconds without a heartbeat after which the supervisor restarts a wedged fetcher"),
    Setting("daemon", "retry_limit", _positive_int, 8,
            "transient failures (node unreachable, connection lost) a task may have before it fails"),
    Setting("daemon", "retry_backoff_max", _positive_float, 60.0,
            "longest wait between retries (waits double from 1 s); the key's later tasks wait too"),
    Setting("daemon", "reconcile_interval", _positive_float, 20.0,
            "seconds between host-status passes that correct VM and host rows from the nodes"),
    Setting("daemon", "embedded_user", str, "",
            "unprivileged user that runs the private PostgreSQL when taskomatic runs as root; "
            "empty: postgres if it exists, else nobody"),
    Setting("metrics", "metrics_port", _port, 0,
            "port of the Prometheus endpoint (/metrics); 0 turns metrics off"),
    Setting("metrics", "metrics_address", str, "127.0.0.1",
            "address the metrics endpoint binds to (localhost: put a proxy in front to expose it)"),
    Setting("logging", "log_level", _log_level, "info", "debug, info, warning or error"),
    Setting("libvirt", "emulator", str, "/usr/bin/qemu-system-x86_64",
            "emulator binary for QEMU and KVM domains"),
    Setting("libvirt", "machine_type", str, "pc", "QEMU machine type of new domains"),
    Setting("libvirt", "shutdown_timeout", _positive_float, 120.0,
            "seconds shutdown_vm waits for the guest to stop"),
    Setting("libvirt", "shutdown_poweroff_fallback", _parse_bool, False,
            "power the VM off when a graceful shutdown times out (else the task fails)"),
    Setting("libvirt", "vnc_listen", str, "127.0.0.1", "address VNC consoles listen on"),
    Setting("libvirt", "nic_network", str, "",
            "libvirt network for VM NICs (e.g. default); empty: user-mode networking"),
    Setting("libvirt", "keepalive_interval", _positive_int, 5,
            "seconds between libvirt keepalive probes; a node silent for interval x count is dead"),
    Setting("libvirt", "keepalive_count", _positive_int, 3,
            "unanswered keepalive probes before a connection is declared dead"),
    Setting("daemon", "task_timeout", _positive_float, 900.0,
            "hard limit on one task's run: a shard stuck longer is killed and the task reconciled "
            "(keep it above shutdown_timeout and migration_timeout)"),
    Setting("libvirt", "save_dir", str, "/var/lib/libvirt/qemu/save",
            "directory on each node where save_vm keeps memory images (must exist there)"),
    Setting("libvirt", "migration_timeout", _positive_float, 300.0,
            "seconds a live migration may take before it is aborted (the VM stays on its source)"),
    Setting("libvirt", "migration_uri", str, "",
            "migration data URI passed to libvirt (e.g. tcp://10.0.0.5); empty lets libvirt choose"),
)

SETTINGS_BY_KEY: dict[str, Setting] = {f"{s.section}.{s.name}": s for s in SETTINGS}
SETTINGS_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    """Resolved settings. Field names are the setting names."""

    dsn: str = ""
    connect_timeout: float = 10.0
    startup_retry_max: float = 60.0
    mode: str = "standalone"
    shards: int = 4
    routing: str = "pinned"
    state_dir: str = ""
    claim_batch: int = 200
    max_claimed_per_shard: int = 500
    poll_interval: float = 2.0
    drain_timeout: float = 300.0
    fast_stop_timeout: float = 10.0
    heartbeat_timeout: float = 60.0
    lease_seconds: float = 10.0
    lease_renew_interval: float = 2.0
    keys_per_shard: int = 2
    tasks_per_key: int = 16
    retry_limit: int = 8
    reconcile_interval: float = 20.0
    retry_backoff_max: float = 60.0
    embedded_user: str = ""
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    log_level: str = "info"
    emulator: str = "/usr/bin/qemu-system-x86_64"
    machine_type: str = "pc"
    shutdown_timeout: float = 120.0
    shutdown_poweroff_fallback: bool = False
    vnc_listen: str = "127.0.0.1"
    nic_network: str = ""
    keepalive_interval: int = 5
    keepalive_count: int = 3
    task_timeout: float = 900.0
    save_dir: str = "/var/lib/libvirt/qemu/save"
    migration_timeout: float = 300.0
    migration_uri: str = ""
    # Where the values came from, for reloads and error messages.
    source_path: str | None = field(default=None, compare=False)

    def resolved_state_dir(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir)
        if os.geteuid() == 0:
            return Path("/var/lib/taskomatic")
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "taskomatic"


def _line_of(text: str, section: str, name: str) -> int | None:
    """Line number of ``name`` inside ``[section]`` (configparser does not keep it)."""
    current = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[([^\]]+)\]", stripped)
        if header:
            current = header.group(1).strip()
            continue
        if current == section and re.match(rf"^{re.escape(name)}\s*[=:]", stripped, re.IGNORECASE):
            return number
    return None


def _section_line(text: str, section: str) -> int | None:
    for number, line in enumerate(text.splitlines(), start=1):
        if re.match(rf"^\s*\[{re.escape(section)}\]", line):
            return number
    return None


def read_file(path: str) -> dict[str, Any]:
    """Settings from one file, validated; ConfigError names the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", path) from None
    except PermissionError:
        raise ConfigError("config file is not readable (permission denied)", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file: {exc}", path) from None

    parser = configparser.ConfigParser(interpolation=None, strict=True)
    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateOptionError as exc:
        raise ConfigError(f"setting {exc.option!r} appears twice in [{exc.section}]", path, exc.lineno) from None
    except configparser.DuplicateSectionError as exc:
        raise ConfigError(f"section [{exc.section}] appears twice", path, exc.lineno) from None
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError("settings must come after a [section] header", path, exc.lineno) from None
    except configparser.ParsingError as exc:
        line = exc.errors[0][0] if exc.errors else None
        raise ConfigError("cannot parse this line (expected 'name = value')", path, line) from None

    values: dict[str, Any] = {}
    known_sections = {s.section for s in SETTINGS}
    if parser.defaults():
        name = next(iter(parser.defaults()))
        raise ConfigError(f"setting {name!r} is in [{parser.default_section}], which taskomatic does not use; "
                          f"put it in its own section", path, _line_of(text, parser.default_section, name))
    for section in parser.sections():
        if section not in known_sections:
            raise ConfigError(
                f"unknown section [{section}] (known: {', '.join(sorted(known_sections))})",
                path, _section_line(text, section),
            )
        for name, raw in parser.items(section):
            setting = SETTINGS_BY_KEY.get(f"{section}.{name}")
            line = _line_of(text, section, name)
            if setting is None:
                known = sorted(s.name for s in SETTINGS if s.section == section)
                raise ConfigError(f"unknown setting {name!r} in [{section}] (known: {', '.join(known)})",
                                  path, line)
            try:
                values[setting.name] = setting.parse(raw)
            except ValueError as exc:
                raise ConfigError(f"bad value for {section}.{name}: {exc}", path, line) from None
    return values


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = environ.get(setting.env_var)
        if raw is None:
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"bad value in environment variable {setting.env_var}: {exc}") from None
    return values


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set section.name=value`` pairs (``name=value`` works too)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        setting = SETTINGS_BY_KEY.get(key) or SETTINGS_BY_NAME.get(key)
        if not sep or setting is None:
            raise ConfigError(f"bad --set {pair!r}: expected section.name=value with a known setting")
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"bad value in --set {key}: {exc}") from None
    return values


def load(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve the configuration.

    ``path`` None means the default file, which may be absent; an explicit path
    must exist. ``overrides`` are already-typed command-line values (None = unset).
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    source = path or environ.get("TASKOMATIC_CONFIG")
    if source:
        values.update(read_file(source))
    elif os.path.exists(DEFAULT_CONFIG_PATH):
        source = DEFAULT_CONFIG_PATH
        values.update(read_file(source))
    values.update(read_environment(environ))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    names = {f.name for f in fields(Config)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    config = Config(source_path=source, **values)
    if config.lease_renew_interval * 3 > config.lease_seconds:
        raise ConfigError(f"lease_renew_interval ({config.lease_renew_interval:g}s) must be at most a third of "
                          f"lease_seconds ({config.lease_seconds:g}s), so one missed renewal does not lose the lease")
    return config


def exposed_password_warning(config: Config) -> str | None:
    """A warning when the config file holds a database password that any local user can read.

    Group-readable is fine (the package installs it root:taskomatic 0640).
    """
    path = config.source_path
    if not path or "password" not in config.dsn.lower():
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if not mode & stat.S_IROTH:
        return None
    return (f"{path} holds the database password and any local user can read it (mode "
            f"{stat.S_IMODE(mode):04o}); chmod o-r {path} (the package installs it 0640 root:taskomatic)")


def settings_table() -> str:
    """Markdown table of every setting, for the README."""
    rows = ["| setting | environment | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = s.default if s.default != "" else "(empty)"
        if isinstance(default, bool):
            default = "yes" if default else "no"
        rows.append(f"| `[{s.section}] {s.name}` | `{s.env_var}` | `{default}` | {s.help} |")
    return "\n".join(rows)


# What a running instance cannot change without a restart.
FIXED_AT_START = ("dsn", "shards", "mode", "state_dir")


def reload(current: Config) -> Config:
    """Re-read the configuration for SIGHUP, keeping what needs a restart.

    Raises ConfigError (the running configuration stays) on a bad file. The
    log level takes effect at once in the calling process.
    """
    import logging

    fresh = load(current.source_path, overrides={name: getattr(current, name) for name in FIXED_AT_START})
    logging.getLogger().setLevel(fresh.log_level.upper())
    return fresh
