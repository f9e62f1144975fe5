"""Where a bounded instance's memory goes (``bench.bounded``): /proc per process, and the import breakdown.

While the daemon runs, every process's RSS, PSS and USS from ``/proc/<pid>/smaps_rollup`` and its role
from its process title; the largest mappings of a few of them; afterwards, in fresh ``python -c``
subprocesses, the RSS of the interpreter alone and after importing what a shard imports (cumulatively,
and each alone).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import measure
from bench.runners import REPO

# Cumulative import steps of the shard breakdown: (label, modules imported by then).
BREAKDOWN_STEPS: list[tuple[str, list[str]]] = [
    ("interpreter alone", []),
    ("+ psycopg2", ["psycopg2"]),
    ("+ libvirt", ["psycopg2", "libvirt"]),
    ("+ multiprocess", ["psycopg2", "libvirt", "multiprocess"]),
    ("+ prometheus_client", ["psycopg2", "libvirt", "multiprocess", "prometheus_client"]),
    ("+ taskomatic.runtime.shard", ["psycopg2", "libvirt", "multiprocess", "prometheus_client",
                                    "taskomatic.runtime.shard"]),
    ("+ the bench plugin's actions", ["psycopg2", "libvirt", "multiprocess", "prometheus_client",
                                      "taskomatic.runtime.shard", "bench.plugin.actions"]),
]
ALONE_MODULES = ["psycopg2", "libvirt", "multiprocess", "prometheus_client", "taskomatic.runtime.shard"]

_MEASURE_CODE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
out = {"modules_loaded": len(sys.modules),
       "pulled_in": [m for m in ("psycopg2", "libvirt", "multiprocess", "prometheus_client") if m in sys.modules]}
with open("/proc/self/smaps_rollup") as f:
    for line in f:
        parts = line.split()
        if len(parts) >= 3 and parts[0].rstrip(":") in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
            out[parts[0].rstrip(":")] = int(parts[1])
print(json.dumps(out))
"""


def smaps_rollup(pid: int) -> dict[str, int] | None:
    """{rss_kb, pss_kb, uss_kb} of a process (USS = Private_Clean + Private_Dirty); None if gone."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        return None
    if "Rss" not in fields:
        return None
    return {"rss_kb": fields["Rss"], "pss_kb": fields.get("Pss", 0),
            "uss_kb": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)}


def mapping_breakdown(pid: int, top: int = 12) -> dict[str, Any] | None:
    """Where a process's resident memory is, from /proc/<pid>/smaps: RSS and USS (kB) per mapped
    file (or [heap], [anon], [stack]...), the ``top`` largest by RSS, and the rest summed."""
    per: dict[str, list[int]] = {}
    name = "?"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                if not parts[0].endswith(":"):  # a mapping's header: address perms offset dev inode [path]
                    name = parts[5] if len(parts) >= 6 else "[anon]"
                    if name.startswith("/"):
                        name = os.path.basename(name)
                    continue
                if parts[0] in ("Rss:", "Private_Clean:", "Private_Dirty:"):
                    entry = per.setdefault(name, [0, 0])
                    if parts[0] == "Rss:":
                        entry[0] += int(parts[1])
                    else:
                        entry[1] += int(parts[1])
    except OSError:
        return None
    ranked = sorted(per.items(), key=lambda kv: -kv[1][0])
    rest = ranked[top:]
    return {"total_rss_kb": sum(v[0] for v in per.values()), "total_uss_kb": sum(v[1] for v in per.values()),
            "top": [{"mapping": k, "rss_kb": v[0], "uss_kb": v[1]} for k, v in ranked[:top]],
            "rest": {"mappings": len(rest), "rss_kb": sum(v[0] for _, v in rest), "uss_kb": sum(v[1] for _, v in rest)}}


def role_of(pid: int, leader: int, title: str) -> str:
    """supervisor, fetcher, shard N, reconciler (from ``taskomatic: ...`` process titles)."""
    return measure.daemon_role(title, pid == leader)


def role_kind(role: str) -> str:
    """The role without the shard number: supervisor, fetcher, shard, reconciler."""
    return "shard" if role.startswith("shard ") else role


def sample_processes(pgid: int, stats: list[measure.ProcStat]) -> dict[int, dict[str, Any]]:
    """{pid: {title, rss_kb, pss_kb, uss_kb}} for every live process of the daemon's group."""
    found: dict[int, dict[str, Any]] = {}
    for s in measure.group_members(pgid, stats):
        mem = smaps_rollup(s.pid)
        if mem is not None:
            found[s.pid] = {"title": measure.process_title(s.pid), **mem}
    return found


def is_titled(pid: int, leader: int, title: str) -> bool:
    """Has the process its final title? (A spawned child shows ``python -c from multiprocess...``
    until it sets ``taskomatic: <role>``.)"""
    return pid == leader or title.startswith("taskomatic: ") or "resource_tracker" in title


def by_role(raw: dict[int, list[int]], roles: dict[int, str]) -> dict[str, list[int]]:
    """A sample's {pid: values} keyed by each pid's role (the title it ended up with)."""
    out: dict[str, list[int]] = {}
    for pid, values in raw.items():
        role = roles.get(pid, f"untitled pid {pid}")
        if role in out:  # two processes with one role (a respawn): keep both
            role = f"{role} (pid {pid})"
        out[role] = values
    return out



def _measure_imports(modules: list[str], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _MEASURE_CODE, *modules], capture_output=True, text=True,
                         env=env, cwd=str(REPO), timeout=60, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    raw = json.loads(out.stdout)
    return {"rss_kb": raw["Rss"], "pss_kb": raw["Pss"], "uss_kb": raw["Private_Clean"] + raw["Private_Dirty"],
            "modules_loaded": raw["modules_loaded"], "pulled_in": raw["pulled_in"]}


def import_breakdown(plugin_path: Path) -> dict[str, Any]:
    """RSS of fresh interpreters: cumulative import steps, and each module alone (over the bare one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKOMATIC_", "PG"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(plugin_path)])
    steps = []
    previous = None
    for label, modules in BREAKDOWN_STEPS:
        m = _measure_imports(modules, env)
        m["step"] = label
        m["modules"] = modules
        if previous is not None and "rss_kb" in m and "rss_kb" in previous:
            m["added_rss_kb"] = m["rss_kb"] - previous["rss_kb"]
            m["added_uss_kb"] = m["uss_kb"] - previous["uss_kb"]
        steps.append(m)
        previous = m
    bare = steps[0]
    alone = {}
    for name in ALONE_MODULES:
        m = _measure_imports([name], env)
        if "rss_kb" in m and "rss_kb" in bare:
            m["over_bare_rss_kb"] = m["rss_kb"] - bare["rss_kb"]
            m["over_bare_uss_kb"] = m["uss_kb"] - bare["uss_kb"]
        alone[name] = m
    return {"python": sys.executable, "steps": steps, "alone": alone}


