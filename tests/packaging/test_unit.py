"""The systemd unit and the packaged configuration file.

- `systemd-analyze verify` accepts the unit, and `systemd-analyze security
  --offline=true` rates its exposure 2.0 or lower (the score is printed).
- The unit's numbers agree with taskomatic's: stop timeout above drain plus fast
  stop, watchdog below the supervisor's heartbeat timeout, the exit codes that
  must not restart (those waiting cannot cure: usage, configuration, already
  running, schema out of date, database refused), the config path, the user of
  the sysusers.d file, the state and runtime directories, the man page.
- MemoryDenyWriteExecute=yes: without systemd as PID 1 here, the kernel's own
  PR_SET_MDWE (the same refusal of writable+executable memory, inherited across
  fork and exec) is set before the real daemon starts, and it runs a VM lifecycle
  on a libvirt node, announces READY=1 and STOPPING=1 on a real NOTIFY_SOCKET and
  exits 0 on SIGTERM.
- packaging/rpm/taskomatic.conf is what make-conf.py generates now; as packaged it
  sets only the state directory (the unit's), and with every setting uncommented
  it gives exactly the defaults.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from taskomatic import config
from tests.helpers import query, wait_for
from tests.packaging import REPO, RPM_DIR, require_tools, run

UNIT_FILE = RPM_DIR / "taskomatic.service"
CONF_FILE = RPM_DIR / "taskomatic.conf"
SYSUSERS_FILE = RPM_DIR / "taskomatic.sysusers"
MAX_EXPOSURE = 2.0


def unit_directives(text: str) -> dict[str, list[str]]:
    """{"Section.Key": [values in order]}; repeated keys (SystemCallFilter=) keep every value."""
    directives: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        directives.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return directives


def seconds(span: str) -> float:
    """A systemd time span such as 330s, 5min 30s or 2h."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and "".join(n + u for n, u in parts) == span.replace(" ", ""), span
    return sum(float(n) * units[u or "s"] for n, u in parts)


# -- systemd-analyze -----------------------------------------------------------------


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    require_tools("systemd-analyze", "man")
    text = UNIT_FILE.read_text()
    # Verify refuses an ExecStart binary that does not exist and a Documentation= man page
    # that man cannot find, and taskomatic is not installed here. As shipped, those are
    # its only complaints:
    shipped = tmp_path / "shipped" / "taskomatic.service"
    shipped.parent.mkdir()
    shipped.write_text(text)
    result = run(["systemd-analyze", "verify", str(shipped)], check=False)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    print("as shipped:", *complaints, sep="\n  ")
    expected = []
    if not os.access("/usr/bin/taskomatic", os.X_OK):
        expected.append("/usr/bin/taskomatic is not executable")
    if run(["man", "-w", "8", "taskomatic"], check=False).returncode != 0:
        expected.append("'man taskomatic(8)' failed")
    assert len(complaints) == len(expected) and all(e in c for e, c in zip(expected, complaints, strict=True)), \
        complaints
    # The same unit with ExecStart on an existing executable, and the packaged man page
    # where man looks (MANPATH): nothing at all to complain about.
    existing = os.path.realpath(sys.executable)
    assert "\nExecStart=/usr/bin/taskomatic " in text
    patched = tmp_path / "patched" / "taskomatic.service"
    patched.parent.mkdir()
    patched.write_text(text.replace("\nExecStart=/usr/bin/taskomatic ", f"\nExecStart={existing} ", 1))
    manpath = tmp_path / "man"
    (manpath / "man8").mkdir(parents=True)
    shutil.copy(REPO / "packaging" / "man" / "taskomatic.8", manpath / "man8" / "taskomatic.8")
    with_man = {**os.environ, "MANPATH": str(manpath)}
    result = run(["systemd-analyze", "verify", str(patched)], check=False, env=with_man)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result
    # ... and this systemd's verify does read the directives: a bad one is reported.
    broken = tmp_path / "broken" / "taskomatic.service"
    broken.parent.mkdir()
    broken.write_text(patched.read_text().replace("KillMode=mixed", "KillMode=bogus"))
    result = run(["systemd-analyze", "verify", str(broken)], check=False, env=with_man)
    assert "bogus" in result.stdout + result.stderr, result


def test_systemd_analyze_security_rates_it_ok(tmp_path: Path) -> None:
    require_tools("systemd-analyze")
    result = run(["systemd-analyze", "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}",
                  str(UNIT_FILE)], check=False)
    lines = result.stdout.splitlines()
    exposed = [line for line in lines if line.startswith("✗")]
    print("\nexposures left:", *exposed, sep="\n  ")
    overall = next(line for line in lines if "Overall exposure level" in line)
    print(overall)
    match = re.search(r"Overall exposure level for taskomatic\.service: (\d+\.\d+)", overall)
    assert match, overall
    assert float(match.group(1)) <= MAX_EXPOSURE, overall
    assert result.returncode == 0, result.stderr  # --threshold agrees


# -- the unit's numbers agree with taskomatic's ---------------------------------------


def test_unit_agrees_with_taskomatic() -> None:
    from taskomatic import exitcodes
    from taskomatic.runtime.fetcher import STATUS_INTERVAL

    unit = unit_directives(UNIT_FILE.read_text())

    def one(key: str) -> str:
        values = unit[key]
        assert len(values) == 1, (key, values)
        return values[0]

    defaults = {s.name: s.default for s in config.SETTINGS}
    assert one("Service.Type") == "notify"
    assert one("Service.NotifyAccess") == "main"
    assert one("Service.ExecStart").split() == ["/usr/bin/taskomatic", "--config", config.DEFAULT_CONFIG_PATH]
    assert one("Service.ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Service.KillMode") == "mixed"
    # systemd's SIGKILL must not cut a drain short, nor the fast stop that ends one.
    assert seconds(one("Service.TimeoutStopSec")) > defaults["drain_timeout"] + defaults["fast_stop_timeout"]
    # Pinged every STATUS_INTERVAL while healthy; a wedged fetcher makes systemd restart the
    # service before the supervisor's own heartbeat timeout would replace the fetcher.
    watchdog = seconds(one("Service.WatchdogSec"))
    assert 10 * STATUS_INTERVAL <= watchdog < defaults["heartbeat_timeout"]
    assert one("Service.Restart") == "on-failure"
    # Exits that waiting cannot cure stop the unit (no restart every RestartSec forever);
    # an unreachable database and a child failing at boot are retried.
    no_restart = [int(code) for code in one("Service.RestartPreventExitStatus").split()]
    assert sorted(no_restart) == sorted({exitcodes.EXIT_USAGE, exitcodes.EXIT_CONFIG, exitcodes.EXIT_ALREADY_RUNNING,
                                         exitcodes.EXIT_SCHEMA, exitcodes.EXIT_DATABASE_REFUSED}) == [2, 3, 5, 8, 9]
    assert not {exitcodes.EXIT_DATABASE, exitcodes.EXIT_CHILD_FAILING, exitcodes.EXIT_LEASE_LOST} & set(no_restart)
    assert one("Unit.Documentation").split()[0] == "man:taskomatic(8)"
    # The user comes from the sysusers.d file; its home is the state directory.
    sysusers = [line.split() for line in SYSUSERS_FILE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert len(sysusers) == 1 and sysusers[0][:2] == ["u", "taskomatic"]
    assert one("Service.User") == one("Service.Group") == "taskomatic"
    assert one("Service.StateDirectory") == "taskomatic"
    assert one("Service.StateDirectoryMode") == "0700"
    assert "/var/lib/taskomatic" in sysusers[0]
    # Sockets and the Prometheus multiprocess samples: /run/taskomatic ($RUNTIME_DIRECTORY).
    assert one("Service.RuntimeDirectory") == "taskomatic"
    assert one("Service.RuntimeDirectoryMode") == "0700"
    # The state directory comes from systemd ($STATE_DIRECTORY) and the packaged
    # configuration, not from an XDG variable only the service would see.
    assert not any(v.startswith("XDG_") for v in unit.get("Service.Environment", []))
    assert config.read_file(str(CONF_FILE))["state_dir"] == "/var/lib/" + one("Service.StateDirectory")
    # The hardening the issue asks for.
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
                       "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
                       "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "CapabilityBoundingSet": "",
                       "AmbientCapabilities": "", "UMask": "0077", "MemoryDenyWriteExecute": "yes",
                       "SystemCallArchitectures": "native"}.items():
        assert one(f"Service.{key}") == value, key
    assert "@system-service" in unit["Service.SystemCallFilter"]
    assert "Service.ReadWritePaths" not in unit  # the StateDirectory is the only writable place
    assert one("Install.WantedBy") == "multi-user.target"


# -- MemoryDenyWriteExecute: the real daemon under PR_SET_MDWE --------------------------

# Stage 2 runs in the exec'd interpreter: MDWE must still be in force there, then the
# libvirt client opens a connection and the daemon itself starts.
_STAGE2 = r"""
import mmap, sys
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    sys.exit("writable+executable memory was allowed: MDWE is not in force after exec")
import libvirt
libvirt.open("test:///default").close()
from taskomatic.cli import main
sys.exit(main(sys.argv[1:]))
"""
_BOOT = rf"""
import ctypes, os, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    print("prctl(PR_SET_MDWE):", os.strerror(ctypes.get_errno()), file=sys.stderr)
    sys.exit(77)
os.execv(sys.executable, [sys.executable, "-c", {_STAGE2!r}, *sys.argv[1:]])
"""


def _receive(sock: socket.socket, wanted: str, process: subprocess.Popen[bytes], log: Path,
             timeout: float) -> list[str]:
    """sd_notify messages until one has the line ``wanted``."""
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            if process.poll() is not None:
                break
            continue
        messages.append(message)
        if wanted in message.splitlines():
            return messages
    raise AssertionError(f"no {wanted} (exit code {process.poll()}); got {messages}\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_daemon_runs_tasks_under_memory_deny_write_execute(dsn: str, hosts: list[int], state_dir: Path) -> None:
    vm = query(dsn, "INSERT INTO vms (description, memory_allocated) VALUES (%s, 65536) RETURNING id",
               ("mdwe-" + dsn.split("dbname=")[1],))[0]["id"]
    for action in ("create_vm", "start_vm", "suspend_vm", "resume_vm", "poweroff_vm"):
        query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) VALUES ('Vm', %s, %s) "
                   "RETURNING id", (vm, action))

    sock_dir = Path(tempfile.mkdtemp(prefix="tkm-notify-", dir="/tmp"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_dir / "notify"))
    sock.settimeout(0.5)
    log = state_dir / "daemon.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(sock_dir / "notify")}
    cmd = [sys.executable, "-c", _BOOT, "--dsn", dsn, "--shards", "2", "--set", f"state_dir={state_dir}",
           "--set", "poll_interval=0.5"]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                   start_new_session=True)
    try:
        try:
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        if process.returncode == 77:
            pytest.skip(f"this kernel has no PR_SET_MDWE (Linux 6.3+): {log.read_text().strip()}")
        _receive(sock, "READY=1", process, log, timeout=60)
        active = "SELECT count(*) AS n FROM tasks WHERE state IN ('queued', 'running')"
        wait_for(lambda: query(dsn, active)[0]["n"] == 0, timeout=60, what="all tasks to end")
        rows = query(dsn, "SELECT action, state, message FROM tasks ORDER BY id")
        assert [r["state"] for r in rows] == ["finished"] * 5, rows
        process.send_signal(signal.SIGTERM)
        _receive(sock, "STOPPING=1", process, log, timeout=30)
        assert process.wait(timeout=60) == 0, log.read_text()[-4000:]
        text = log.read_text()
        assert "Traceback" not in text, text[-4000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        sock.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


# -- the packaged configuration file ---------------------------------------------------


def test_packaged_conf_is_what_make_conf_generates() -> None:
    generated = run([sys.executable, str(RPM_DIR / "make-conf.py"), "--stdout"]).stdout
    assert generated == CONF_FILE.read_text(), \
        "packaging/rpm/taskomatic.conf is stale: run python3 packaging/rpm/make-conf.py and commit it"
    run([sys.executable, str(RPM_DIR / "make-conf.py"), "--check"])


def test_packaged_conf_sets_only_the_state_directory() -> None:
    assert config.read_file(str(CONF_FILE)) == {"state_dir": "/var/lib/taskomatic"}


def test_packaged_conf_uncommented_gives_every_default(tmp_path: Path) -> None:
    text = CONF_FILE.read_text()
    packaged = config.read_file(str(CONF_FILE))
    offered = [s for s in config.SETTINGS if not s.deprecated]  # deprecated ones are left out
    uncommented, count = re.subn(r"(?m)^#(\w+ =)", r"\1", text)
    assert count == len(offered) - len(packaged)
    path = tmp_path / "taskomatic.conf"
    path.write_text(uncommented)
    values = config.read_file(str(path))
    defaults = {s.name: s.default for s in offered}
    assert values == {**defaults, **packaged}
    assert {name: type(value) for name, value in values.items()} == \
        {name: type(value) for name, value in defaults.items()}
    # Each setting is explained on the line above it.
    lines = text.splitlines()
    for setting in offered:
        if setting.name in packaged:
            index = lines.index(f"{setting.name} = {packaged[setting.name]}")
        else:
            index = lines.index(f"#{setting.name} = {_shown(setting.default)}".rstrip())
        assert lines[index - 1] == f"# {setting.help}", setting.name


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)
