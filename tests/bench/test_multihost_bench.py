"""The multihost benchmark (``bench/multihost/``): its pure parts, and a smoke run.

The smoke run (``python -m bench.multihost --smoke``) is the real thing at toy
size: a private PostgreSQL, real daemons in multihost mode with the bench's
plugin, one instance killed with SIGKILL and its keys taken over (with a 3 s
lease, so that it fits in a test), then 400 no-op tasks through a standalone
instance and through 1 and 2 multihost instances. It asserts that the figures
are there and that the correctness checks held; never what the figures are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.multihost import cli, output, suite
from bench.multihost import scaling as mh_scaling
from bench.multihost import takeover as mh_takeover
from bench.multihost.suite import Plan

REPO = Path(__file__).resolve().parents[2]


# -- pure parts ---------------------------------------------------------------------------


def test_summarise() -> None:
    assert suite.summarise([]) == {"n": 0, "min": None, "median": None, "max": None}
    assert suite.summarise([12.0, 10.0, 11.5]) == {"n": 3, "min": 10.0, "median": 11.5, "max": 12.0}
    assert suite.summarise([1.0, 2.0])["median"] == 1.5


def _event(at: float, op: str, key: int, instance: int | None, token: int, txid: int = 1,
           previous: int | None = None) -> dict[str, Any]:
    return {"at": at, "op": op, "key_type": "Vm", "key_id": key, "instance_id": instance, "previous": previous,
            "token": token, "txid": txid}


def test_takeover_figures_by_hand() -> None:
    t0 = 1000.0
    keys = {("Vm", 1): 10, ("Vm", 2): 11, ("Vm", 3): 12}
    events = [
        _event(990.0, "claim", 1, 7, 10),  # the victim's own claims, before the kill
        _event(991.0, "claim", 4, 8, 13),  # not one of its keys
        _event(1009.0, "takeover", 1, 8, 20, txid=5, previous=7),
        _event(1009.0, "takeover", 2, 8, 21, txid=5, previous=7),
        _event(1010.0, "release", 1, None, 20, previous=8),  # drained after the move: still moved at 1009
        _event(1011.0, "claim", 1, 9, 22),  # claimed again later: the first move counts
        _event(1011.5, "takeover", 3, 9, 23, txid=6, previous=7),
    ]
    starts = [
        {"key_type": "Vm", "key_id": 1, "claimed_by": 8, "started": 1009.5},
        {"key_type": "Vm", "key_id": 2, "claimed_by": 8, "started": 1009.2},
        {"key_type": "Vm", "key_id": 3, "claimed_by": 9, "started": 1012.0},
        {"key_type": "Vm", "key_id": 3, "claimed_by": 7, "started": 1000.1},  # the victim's: ignored
    ]
    f = mh_takeover.takeover_figures(t0, {7}, keys, events, starts)
    assert f["keys_at_kill"] == 3 and f["keys_moved"] == 3
    assert f["first_key_s"] == 9.0
    assert f["all_keys_s"] == 11.5
    assert f["first_task_s"] == pytest.approx(9.2)
    assert f["how"] == {"takeover": 3}
    assert f["moved_to"] == {"8": 2, "9": 1}
    assert f["takeover_transactions"] == 2
    assert f["tokens_increased"] is True
    assert f["started_before_key_moved"] == []
    assert [k["key"] for k in f["per_key"]] == ["Vm:1", "Vm:2", "Vm:3"]


def test_takeover_figures_flag_what_is_wrong() -> None:
    t0 = 1000.0
    keys = {("Vm", 1): 10, ("Vm", 2): 11}
    events = [_event(1009.0, "takeover", 1, 8, 5, previous=7)]  # a token that went down
    starts = [{"key_type": "Vm", "key_id": 1, "claimed_by": 8, "started": 1008.0},  # before its key moved
              {"key_type": "Vm", "key_id": 2, "claimed_by": 8, "started": 1003.0}]  # its key never moved
    f = mh_takeover.takeover_figures(t0, {7}, keys, events, starts)
    assert f["keys_moved"] == 1
    assert f["all_keys_s"] is None
    assert f["tokens_increased"] is False
    assert {e["key"] for e in f["started_before_key_moved"]} == {"Vm:1", "Vm:2"}
    assert mh_takeover.takeover_figures(t0, {7}, {}, [], [])["first_key_s"] is None


def _counts(**changes: Any) -> dict[str, Any]:
    base = {"total": 10, "finished": 10, "failed": 0, "unended": 0, "bad_times": 0, "never_marked": 0,
            "rerun_ids": []}
    return {**base, **changes}


def test_ended_once_verdict() -> None:
    assert suite.ended_once_verdict(_counts(), 10, set())["ok"]
    # A task in flight at the kill, reconciled as "not started" and run again: allowed.
    verdict = suite.ended_once_verdict(_counts(rerun_ids=[3]), 10, {3})
    assert verdict["ok"] and verdict["reruns_in_flight_at_kill"] == 1
    # Any other second run is not.
    verdict = suite.ended_once_verdict(_counts(rerun_ids=[3, 4]), 10, {3})
    assert not verdict["ok"] and verdict["reruns_unexplained"] == [4]
    assert not suite.ended_once_verdict(_counts(unended=1, finished=9), 10, set())["ok"]
    assert not suite.ended_once_verdict(_counts(total=11, finished=11), 10, set())["ok"]
    assert not suite.ended_once_verdict(_counts(failed=1, finished=9), 10, set())["ok"]


def test_plans() -> None:
    quick, full, smoke = (suite.plan_for(n) for n in ("quick", "full", "smoke"))
    assert (quick.takeover_repeats, full.takeover_repeats) == (3, 10)
    assert quick.settings == () and full.settings == ()  # the defaults are what is measured
    assert (quick.scale_tasks, quick.scale_keys, full.scale_tasks) == (5000, 500, 20000)
    assert quick.scale_instances == (1, 2, 3)
    assert smoke.settings  # the smoke run shortens the lease, and says so
    three = quick.with_instances(3)
    assert isinstance(three, Plan) and three.takeover_instances == 3
    assert three.takeover_initial == 1500 and three.scale_instances == quick.scale_instances
    with pytest.raises(ValueError):
        suite.plan_for("huge")


def test_kill_jitter_is_seeded_and_within_one_renewal() -> None:
    values = [mh_takeover.kill_jitter(1, rep, 2.0) for rep in range(20)]
    assert values == [mh_takeover.kill_jitter(1, rep, 2.0) for rep in range(20)]
    assert all(0.0 <= v <= 2.0 for v in values) and len(set(values)) == 20
    assert mh_takeover.kill_jitter(2, 0, 2.0) != values[0]
    stagger = mh_takeover.start_stagger(1, 0, 3, 2.0)
    assert stagger[0] == 0.0 and len(stagger) == 3 and all(0.0 <= v <= 2.0 for v in stagger)
    assert stagger == mh_takeover.start_stagger(1, 0, 3, 2.0) != mh_takeover.start_stagger(1, 1, 3, 2.0)


def test_results_path(tmp_path: Path) -> None:
    assert output.results_path(None, "S") == output.RESULTS_DIR / "multihost-S.json"
    assert output.results_path(tmp_path / "x.json", "S") == tmp_path / "x.json"
    assert output.results_path(tmp_path, "S") == tmp_path / "multihost-S.json"


def test_scaling_summary_medians_and_ratios() -> None:
    def run(setup: str, mode: str, n: int, tps: float, share: list[float]) -> dict[str, Any]:
        return {"setup": setup, "mode": mode, "instances": n, "ok": True, "throughput_tps": tps,
                "cpu": {"taskomatic_s_per_1k": 1.0, "postgres_s_per_1k": 2.0, "other_share": 0.01},
                "share_per_instance": share, "key_claims_per_1k": None if mode == "standalone" else 100.0}

    rows = mh_scaling.scaling_summary([run("standalone", "standalone", 1, 1000, [1.0]),
                                      run("2 multihost", "multihost", 2, 400, [0.5, 0.5]),
                                      run("2 multihost", "multihost", 2, 600, [0.4, 0.6]),
                                      run("2 multihost", "multihost", 2, 500, [0.45, 0.55])])
    by = {r["setup"]: r for r in rows}
    assert by["standalone"]["throughput_vs_standalone"] == 1.0
    assert by["2 multihost"]["throughput_tps"] == 500
    assert by["2 multihost"]["throughput_vs_standalone"] == 0.5
    assert by["2 multihost"]["runs"] == 3 and by["2 multihost"]["key_claims_per_1k"] == 100.0


def test_bad_arguments_are_refused_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--set", "no.such=1"], ["--set", "multihost.lease_seconds=3"], ["--repeats", "0"],
                 ["--instances", "5"], ["--quick", "--full"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2, argv
    assert "lease_renew_interval" in capsys.readouterr().err  # 2 s renewals do not fit three times in 3 s


# -- the smoke run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-multihost") / "smoke.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench.multihost", "--smoke", "--no-progress", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=150, check=False)
    assert proc.returncode == 0, f"bench.multihost exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    results: dict[str, Any] = json.loads(out.read_text())
    results["_stdout"] = proc.stdout
    results["_seconds"] = time.monotonic() - started
    return results


@pytest.mark.slow
def test_smoke_takeover_moves_every_key_and_keeps_the_contract(smoke: dict[str, Any]) -> None:
    assert smoke["kind"] == "multihost" and smoke["suite"] == "smoke" and smoke["ok"]
    assert smoke["settings"]["defaults"] is False  # the smoke run's short lease is not the default
    assert smoke["settings"]["multihost"]["lease_seconds"] == 3.0
    takeover = smoke["takeover"]
    assert takeover["ok"] and len(takeover["runs"]) == 1
    run = takeover["runs"][0]
    assert run["error"] is None and run["victim_processes_gone"]
    assert run["keys_at_kill"] >= 1 and run["keys_moved"] == run["keys_at_kill"]
    assert all(run["checks"].values()), run["checks"]
    assert run["ended_once"]["ok"] and run["order"]["ok"]
    # No task of a moved key may start elsewhere before its key moved.
    assert 0 < run["first_key_s"] <= run["first_task_s"]
    assert 0 <= run["kill_jitter_s"] <= 1.0  # one renewal interval of the smoke run's settings
    assert run["first_key_s"] <= run["all_keys_s"]
    assert run["survivor_exit_codes"] == [0]
    for name in ("first_key_s", "first_task_s", "all_keys_s"):
        assert takeover["summary"][name]["n"] == 1


@pytest.mark.slow
def test_smoke_scaling_runs_every_setup(smoke: dict[str, Any]) -> None:
    scaling = smoke["scaling"]
    assert scaling["ok"]
    assert [r["setup"] for r in scaling["summary"]] == ["standalone", "1 multihost", "2 multihost"]
    assert "compete for the same" in scaling["note"]
    for run in scaling["runs"]:
        assert run["ok"], run.get("error")
        assert run["throughput_tps"] > 0
        assert sum(run["tasks_per_instance"]) == 400 and len(run["tasks_per_instance"]) == run["instances"]
        assert run["cpu"]["taskomatic_s_per_1k"] >= 0 and run["cpu"]["postgres_s_per_1k"] >= 0
        assert run["exit_codes"] == [0] * run["instances"]
        assert ("key_claims" in run) == (run["mode"] == "multihost")
        assert run["db_transactions_per_task"] > 0
        assert run["pauses"]["longest_s"] >= 0


@pytest.mark.slow
def test_smoke_output(smoke: dict[str, Any]) -> None:
    machine = smoke["machine"]
    for key in ("cpu_model", "cores", "memory_kb", "kernel", "python", "postgresql", "commit"):
        assert machine[key], key
    out = smoke["_stdout"]
    assert "1. Takeover after kill -9" in out and "2. Scaling over instances" in out
    assert "(a) another instance holds its first key" in out
    assert "| standalone" in out and "| 2 multihost" in out
    assert smoke["_seconds"] < 90  # the brief: under a minute on 2 cores; some slack for a loaded machine
