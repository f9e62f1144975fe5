"""Every setting taskomatic has: name, section, type (a parser), default and help.

config.py resolves them from the files, the environment and the command line;
packaging/rpm/make-conf.py writes the packaged config and the README's table
comes from the same list.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# dsn = embedded: a private PostgreSQL under state_dir, an explicit choice for the
# demo, tests and a single-machine trial (never what an empty dsn means).
EMBEDDED_DSN = "embedded"


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
    if value and value != EMBEDDED_DSN:
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


FOREVER = "forever"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration_seconds(text: str) -> float | None:
    """Seconds of a duration setting ("90s", "30m", "12h", "7d", "2w"; a bare number is seconds);
    None for "forever"."""
    value = text.strip().lower()
    if value == FOREVER:
        return None
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"expected a duration such as 90s, 30m, 12h, 7d or 2w, or {FOREVER!r}, got {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _duration(text: str) -> str:
    """A duration or "forever", kept as written (normalised) so the documentation shows it so."""
    duration_seconds(text)
    return text.strip().lower()


def _log_level(text: str) -> str:
    return _choice("debug", "info", "warning", "error")(text.strip().lower())


@dataclass(frozen=True)
class Setting:
    section: str
    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    # Accepted so existing files keep working, but does nothing any more: what to say when it is set.
    deprecated: str | None = None

    @property
    def env_var(self) -> str:
        return "TASKOMATIC_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("database", "dsn", _dsn, "",
            "libpq connection string (required); 'embedded' runs a private PostgreSQL under state_dir "
            "(a trial on one machine, never for a fleet)"),
    Setting("database", "auto_migrate", _parse_bool, False,
            "apply pending schema migrations when the daemon starts (single-instance installs only; "
            "else run 'taskomatic db upgrade' after installing a new version)"),
    Setting("database", "connect_timeout", _positive_float, 10.0,
            "seconds to wait for a database connection"),
    Setting("database", "startup_retry_max", _positive_float, 60.0,
            "daemon start with the database down: longest wait between connection attempts (waits "
            "double from 1 s; it waits as long as it takes, logging each attempt)"),
    Setting("daemon", "mode", _choice("standalone", "multihost"), "standalone",
            "standalone refuses to share the database; multihost shares it with other instances"),
    Setting("daemon", "shards", _positive_int, 4,
            "shard processes (tasks of different resources run in parallel, one per shard)"),
    Setting("daemon", "routing", _choice("hash", "pinned"), "pinned",
            "which shard runs a key's tasks: pinned (any shard with room, kept while the key has tasks "
            "in flight there) or hash (always shard partition mod shards, whatever its load)"),
    Setting("daemon", "child_start", _choice("forkserver", "spawn"), "forkserver",
            "how children start: forkserver forks them from a process that imported what they need "
            "(shared memory, 6-8.5 MB unique per shard); spawn starts a fresh interpreter each (~21 MB)"),
    Setting("daemon", "state_dir", str, "",
            "where the private PostgreSQL (dsn = embedded) lives; systemd's $STATE_DIRECTORY wins; "
            "empty: /var/lib/taskomatic as root, else $XDG_STATE_HOME/taskomatic"),
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
            "multihost: how long an instance's lease, and with it its partitions, stays valid without a "
            "renewal; shorter means faster takeover after a crash, but more renewal traffic and partitions "
            "lost on a shorter database hiccup"),
    Setting("multihost", "lease_renew_interval", _positive_float, 2.0,
            "multihost: seconds between lease renewals (at most a third of lease_seconds, so one "
            "missed renewal costs nothing)"),
    Setting("multihost", "keys_per_shard", _positive_int, 2,
            "deprecated, does nothing: belonged to the per-key claims that partition leases replaced",
            deprecated="instances hold partitions now (claim_batch and max_claimed_per_shard size their claims)"),
    Setting("multihost", "tasks_per_key", _positive_int, 16,
            "deprecated, does nothing: belonged to the per-key claims that partition leases replaced",
            deprecated="instances hold partitions now (claim_batch and max_claimed_per_shard size their claims)"),
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
    Setting("libvirt", "save_dir_shared", _parse_bool, False,
            "save_dir is the same directory on every node (NFS...): clear_vms moves saved VMs too "
            "(else they stay on the host being emptied, named in its message)"),
    Setting("libvirt", "migration_timeout", _positive_float, 300.0,
            "seconds a live migration may take before it is aborted (the VM stays on its source)"),
    Setting("libvirt", "migration_uri", str, "",
            "migration data URI passed to libvirt (e.g. tcp://10.0.0.5); empty lets libvirt choose"),
    Setting("retention", "keep_finished", _duration, "7d",
            "how long an ended task (finished, failed, canceled) stays in the tasks table, where UIs read "
            "outcomes, before it is archived or deleted (90s, 30m, 12h, 7d, 2w; forever: never); a task "
            "that queued others goes only after they have"),
    Setting("retention", "archive", _parse_bool, True,
            "move expired tasks to tasks_archive (taskomatic tasks --archive, show) instead of deleting them"),
    Setting("retention", "archive_keep", _duration, "forever",
            "how long an archived task is kept (counted from its end) before it is deleted; forever: never"),
    Setting("retention", "retention_interval", _positive_float, 60.0,
            "seconds between retention passes (the reconciler process runs them; one instance at a time)"),
    Setting("retention", "retention_batch", _positive_int, 1000,
            "most tasks moved or deleted per transaction (small batches keep locks and WAL bursts short)"),
)

SETTINGS_BY_KEY: dict[str, Setting] = {f"{s.section}.{s.name}": s for s in SETTINGS}
SETTINGS_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
