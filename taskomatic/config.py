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
import difflib
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from taskomatic.settings import (  # re-exported: config.SETTINGS is the public name
    EMBEDDED_DSN,
    SETTINGS,
    SETTINGS_BY_KEY,
    SETTINGS_BY_NAME,
    Setting,
)

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


@dataclass(frozen=True)
class Config:
    """Resolved settings. Field names are the setting names."""

    dsn: str = ""
    auto_migrate: bool = False
    connect_timeout: float = 10.0
    startup_retry_max: float = 60.0
    mode: str = "standalone"
    shards: int = 4
    routing: str = "pinned"
    child_start: str = "forkserver"
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
    save_dir_shared: bool = False
    migration_timeout: float = 300.0
    migration_uri: str = ""
    keep_finished: str = "7d"
    archive: bool = True
    archive_keep: str = "forever"
    retention_interval: float = 60.0
    retention_batch: int = 1000
    # Where the values came from, for reloads and error messages.
    source_path: str | None = field(default=None, compare=False)
    # The command line's overrides (setting name -> typed value), kept so a reload keeps them.
    overrides: tuple[tuple[str, Any], ...] = field(default=(), compare=False)
    # The settings given at all (not left at their defaults), for the deprecation warnings.
    given: tuple[str, ...] = field(default=(), compare=False)

    @property
    def embedded(self) -> bool:
        """The private PostgreSQL under the state directory was chosen (dsn = embedded)."""
        return self.dsn == EMBEDDED_DSN

    def resolved_state_dir(self) -> Path:
        """One rule for the service and the CLI: systemd's STATE_DIRECTORY, the configured
        state_dir, else /var/lib/taskomatic as root and $XDG_STATE_HOME/taskomatic otherwise."""
        from_systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        if from_systemd:
            return Path(from_systemd)
        if self.state_dir:
            return Path(self.state_dir)
        if os.geteuid() == 0:
            return Path("/var/lib/taskomatic")
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "taskomatic"

    def resolved_runtime_dir(self) -> Path:
        """Sockets and the metrics samples: systemd's RUNTIME_DIRECTORY, else <state dir>/run."""
        from_systemd = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        return Path(from_systemd) if from_systemd else self.resolved_state_dir() / "run"


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
                raise ConfigError(_unknown_setting(name, section), path, line)
            try:
                values[setting.name] = setting.parse(raw)
            except ValueError as exc:
                raise ConfigError(f"bad value for {section}.{name}: {exc}", path, line) from None
    return values


def suggest_setting(name: str) -> Setting | None:
    """The setting a mistyped name most likely meant (difflib), or None."""
    close = difflib.get_close_matches(name.lower(), list(SETTINGS_BY_NAME), n=1, cutoff=0.6)
    return SETTINGS_BY_NAME[close[0]] if close else None


def _unknown_setting(name: str, section: str) -> str:
    """Why a file's ``name`` in ``[section]`` is refused, with the likely intended setting."""
    if name in SETTINGS_BY_NAME:
        right = SETTINGS_BY_NAME[name].section
        return f"setting {name!r} belongs in [{right}], not [{section}]"
    guess = suggest_setting(name)
    if guess is not None:
        return f"unknown setting {name!r} in [{section}]; did you mean {guess.name!r} (in [{guess.section}])?"
    known = sorted(s.name for s in SETTINGS if s.section == section)
    return f"unknown setting {name!r} in [{section}] (known: {', '.join(known)})"


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
        if not sep:
            raise ConfigError(f"bad --set {pair!r}: expected section.name=value")
        if setting is None:
            guess = suggest_setting(key.rpartition(".")[2])
            hint = f"; did you mean {guess.section}.{guess.name}?" if guess else ""
            raise ConfigError(f"bad --set {pair!r}: no setting named {key!r}{hint}")
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
    for dropin in dropin_files(source or DEFAULT_CONFIG_PATH):
        values.update(read_file(str(dropin)))
    values.update(read_environment(environ))
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(given)
    names = {f.name for f in fields(Config)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    config = Config(source_path=source, overrides=tuple(sorted(given.items())), given=tuple(sorted(values)),
                    **values)
    if config.lease_renew_interval * 3 > config.lease_seconds:
        raise ConfigError(f"lease_renew_interval ({config.lease_renew_interval:g}s) must be at most a third of "
                          f"lease_seconds ({config.lease_seconds:g}s), so one missed renewal does not lose the lease")
    return config


def dropin_files(main_path: str) -> list[Path]:
    """``<main>.d/*.conf``, read after the main file in name order (edited drop-ins survive upgrades)."""
    folder = Path(main_path + ".d")
    try:
        return sorted(p for p in folder.iterdir() if p.name.endswith(".conf") and p.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read the drop-in directory: {exc}", str(folder)) from None


def missing_dsn_message(config: Config) -> str:
    """What to write where when no database is configured (the daemon never guesses one)."""
    path = config.source_path or DEFAULT_CONFIG_PATH
    where = f"in {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
        # The packaged file has the line commented out: point at it, else at the section.
        line = _line_of(text, "database", "#dsn") or _section_line(text, "database")
    except OSError:
        line = None
    if line:
        where = f"at {path}:{line}"
    return (f"no database configured: write 'dsn = host=DBHOST dbname=taskomatic user=taskomatic' in the "
            f"[database] section {where} (or a drop-in {path}.d/*.conf), or set TASKOMATIC_DSN or pass "
            f"--dsn; for a trial on one machine, --embedded-db (dsn = embedded) runs a private PostgreSQL "
            f"under {config.resolved_state_dir()}")


def deprecated_settings_warnings(config: Config) -> list[str]:
    """One warning per deprecated setting the configuration sets (file, drop-in, environment or option)."""
    return [f"setting {s.section}.{s.name} is deprecated and does nothing: {s.deprecated}; remove it from "
            f"{config.source_path or 'the environment'} (or {s.env_var})"
            for s in SETTINGS if s.deprecated and s.name in config.given]


def exposed_password_warning(config: Config) -> str | None:
    """A warning when a config file (or drop-in) holds a database password that any local user can read.

    Group-readable is fine (the package installs it root:taskomatic 0640).
    """
    if "password" not in config.dsn.lower():
        return None
    main = config.source_path
    paths = ([main] if main else []) + [str(p) for p in dropin_files(main or DEFAULT_CONFIG_PATH)]
    for path in paths:
        try:
            mode = os.stat(path).st_mode
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not mode & stat.S_IROTH or not re.search(r"(?im)^\s*dsn\s*[=:].*password", text):
            continue
        return (f"{path} holds the database password and any local user can read it (mode "
                f"{stat.S_IMODE(mode):04o}); chmod o-r {path} (the package installs it 0640 root:taskomatic)")
    return None


def settings_table() -> str:
    """Markdown table of every setting, for the README."""
    rows = ["| setting | environment | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = s.default if s.default != "" else "(empty)"
        if isinstance(default, bool):
            default = "yes" if default else "no"
        rows.append(f"| `[{s.section}] {s.name}` | `{s.env_var}` | `{default}` | {s.help} |")
    return "\n".join(rows)


# What a running instance cannot change without a restart: a reload keeps the running
# value and warns that the new one waits for `systemctl restart taskomatic`.
RESTART_ONLY = ("dsn", "auto_migrate", "mode", "shards", "child_start", "state_dir", "embedded_user",
                "metrics_port", "metrics_address")
_SECRET = ("dsn",)  # values never logged (a dsn may hold a password)


@dataclass(frozen=True)
class Reloaded:
    config: Config
    changed: dict[str, tuple[Any, Any]]  # applied now: name -> (old, new)
    restart_only: dict[str, tuple[Any, Any]]  # changed in the files, applied at the next restart


def reload_config(current: Config, environ: Mapping[str, str] | None = None) -> Reloaded:
    """Read the files again with the command line's overrides kept (they still win).

    Raises ConfigError (the running configuration stays) on a bad file.
    """
    from dataclasses import replace

    fresh = load(current.source_path, environ, overrides=dict(current.overrides))
    restart_only = {name: (getattr(current, name), getattr(fresh, name)) for name in RESTART_ONLY
                    if getattr(current, name) != getattr(fresh, name)}
    fresh = replace(fresh, **{name: getattr(current, name) for name in RESTART_ONLY})
    changed = {f.name: (getattr(current, f.name), getattr(fresh, f.name)) for f in fields(Config)
               if f.compare and getattr(current, f.name) != getattr(fresh, f.name)}
    return Reloaded(fresh, changed, restart_only)


def _shown(name: str, value: Any) -> str:
    return "(not shown)" if name in _SECRET else repr(value)


def reload(current: Config, announce: bool = False) -> Config:
    """SIGHUP: the new configuration, with the log level applied at once in this process.

    ``announce`` (the supervisor, so each change is logged once, not by every
    process): log what changed and warn about what only a restart applies.
    """
    import logging

    result = reload_config(current)
    logging.getLogger().setLevel(result.config.log_level.upper())
    if announce:
        log = logging.getLogger("taskomatic.config")
        for name, (old, new) in result.changed.items():
            log.info("reload: %s changed from %s to %s", name, _shown(name, old), _shown(name, new))
        if not result.changed:
            log.info("reload: no setting changed")
        for name, (old, new) in result.restart_only.items():
            log.warning("reload: %s changed from %s to %s, but only a restart applies it "
                        "(systemctl restart taskomatic); still using %s", name, _shown(name, old),
                        _shown(name, new), _shown(name, old))
    return result.config
