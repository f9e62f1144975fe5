"""The one-screen summary of bench/RESULTS.md quotes the stored JSON exactly and is the file's current block."""

from __future__ import annotations

import re
from pathlib import Path

from bench.report import load
from bench.report_summary import BEGIN, END, multihost_scaling_lines, replace_block, stored, summary

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "RESULTS"


def _run(suite: dict, workload: str, shards: int, routing: str = "pinned") -> dict:
    return next(r for r in suite["runs"] if r["workload"] == workload and r["runner"] == "taskomatic"
                and r["parallelism"] == shards and r.get("routing", "pinned") == routing)


def _routings(suite: dict) -> list[str]:
    used = {r.get("routing", "pinned") for r in suite["runs"] if r["runner"] == "taskomatic"}
    return ["pinned", *sorted(used - {"pinned"})]


def test_the_summary_numbers_are_the_jsons() -> None:
    suite = load(RESULTS / "results.json.gz")
    routings = _routings(suite)
    assert len(routings) == 2  # the stored full suite compares both
    text = summary(stored(RESULTS))
    for workload in ("noop-uniform", "noop-zipf", "sleep20-uniform", "sleep20-zipf", "heavy-uniform", "heavy-zipf"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {workload} ("))
        cells = [c.strip() for c in row.strip("|").split("|")]
        # one figure per routing in a cell, pinned (the default) first
        assert cells[1] == " / ".join(f"{_run(suite, workload, 4, r)['throughput_tps']:,.0f}" for r in routings)
        assert cells[2] == " / ".join(f"{_run(suite, workload, 16, r)['throughput_tps']:,.0f}" for r in routings)
        best = max((r for r in suite["runs"] if r["workload"] == workload and r["runner"] == "taskomatic"
                    and r.get("routing", "pinned") == "pinned"), key=lambda r: r["throughput_tps"])
        assert cells[3] == f"{best['throughput_tps']:,.0f} ({best['parallelism']})"
        for cell, shards in ((cells[4], 4), (cells[5], 16)):
            ratios = [_run(suite, workload, shards, r).get("makespan_ratio") for r in routings]
            assert cell == " / ".join(f"{ratio:.2f}" if ratio else "-" for ratio in ratios)
    idle = _run(suite, "steady-idle", 4)["latency_ms"]
    assert f"p50 {idle['p50']:.1f} ms, p99 {idle['p99']:.1f} ms" in text
    assert suite["started_at"][:10] in text and suite["machine"]["cpu_model"] in text
    multihost = load(RESULTS / "multihost.json")
    for setup in multihost["scaling"]["summary"]:
        assert f"{setup['setup']} {setup['throughput_tps']:,.0f}" in text
    # The many-run scaling file: each multihost setup's ratios to standalone of the same routing.
    scaling_file = load(RESULTS / "multihost_scaling.json")
    scaling = scaling_file["scaling"]
    assert f"--scale-repeats {scaling['repeats']}" in text and scaling["repeats"] >= 5
    assert f"bench.multihost --{scaling_file['suite']} --only scaling" in text  # the suite the file came from
    for setup in (s for s in scaling["summary"] if s["mode"] == "multihost"):
        assert (f"{setup['setup']} {setup['throughput_vs_standalone']:.2f}x (PostgreSQL "
                f"{setup['postgres_cpu_vs_standalone']:.2f}x") in text, setup["setup"]
    # Memory: the 4-shard forkserver instance's PSS and what each shard beyond the first adds (USS), idle
    # and after work, from bench.shard_memory's files.
    for name in ("shard_memory.json", "shard_memory_after_work.json"):
        sampled = {r["shards"]: r for r in load(RESULTS / name)["results"] if r["child_start"] == "forkserver"}
        pss = sampled[4]["total_pss_kb"] / 1024
        extra_uss = (sampled[4]["total_uss_kb"] - sampled[1]["total_uss_kb"]) / 3 / 1024
        assert f"{pss:.1f} MB" in text and f"{extra_uss:.1f} MB" in text, (name, pss, extra_uss)


def test_results_md_opens_with_the_current_summary() -> None:
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    block = text[text.index(BEGIN):text.index(END) + len(END)]
    assert block == summary(stored(RESULTS)), "re-run: python -m bench.report_summary bench/RESULTS --write ..."
    assert text.index(BEGIN) < 100, "the summary comes before the detail"
    assert len(block.splitlines()) <= 40


def test_what_is_not_stored_is_said_missing(tmp_path: Path) -> None:
    (tmp_path / "results.json.gz").write_bytes((RESULTS / "results.json.gz").read_bytes())
    text = summary(stored(tmp_path))
    assert "**Multihost**: not in the stored results." in text and "Multihost scaling" not in text
    assert "PSS" not in text
    assert not re.search(r"\| noop-uniform .*\| not measured \|", text)


def test_replacing_the_block_is_idempotent() -> None:
    original = "# title\n\nbody\n"
    once = replace_block(original, f"{BEGIN}\nA\n{END}")
    assert once.startswith("# title\n") and "body" in once
    assert replace_block(once, f"{BEGIN}\nB\n{END}") == once.replace("\nA\n", "\nB\n")


def test_the_scaling_line_names_the_suite_of_its_file() -> None:
    results = load(RESULTS / "multihost_scaling.json")
    assert "bench.multihost --quick --only scaling" in "".join(multihost_scaling_lines({**results, "suite": "quick"}))
    assert "bench.multihost --only scaling" in "".join(multihost_scaling_lines({**results, "suite": None}))


def test_multihost_workloads_are_one_row_each_with_every_setup() -> None:
    from bench.report_summary import multihost_workloads_table

    def row(workload: str, setup: str, tps: float, ratio: float | None) -> dict:
        return {"workload": workload, "setup": setup, "throughput_tps": tps, "makespan_ratio": ratio,
                "other_share_max": 0.05}

    workloads = {"workloads": [{"name": "z", "description": "Zipf no-ops"}, {"name": "s", "description": "20 ms"}],
                 "summary": [row("z", "standalone, pinned", 3000, None), row("z", "1 multihost, pinned", 2500, None),
                             row("s", "standalone, pinned", 90, 1.04), row("s", "1 multihost, pinned", 88, 1.061)]}
    lines = multihost_workloads_table(workloads)
    assert lines[0] == "| workload (multihost bench) | standalone, pinned | 1 multihost, pinned |"
    assert lines[2] == "| Zipf no-ops | 3,000 | 2,500 |"
    assert lines[3] == "| 20 ms | 90 (1.04) | 88 (1.06) |"
    assert "up to 5% of the machine" in lines[5]
    assert multihost_workloads_table(None) == []


def test_the_idle_line_says_where_enqueue_to_start_goes_when_the_run_recorded_it() -> None:
    data = stored(RESULTS)
    idle = _run(data["suite"], "steady-idle", 4)

    def idle_line() -> str:
        return next(line for line in summary(data).splitlines() if line.startswith("* Enqueue-to-start, idle"))

    idle["latency_split_ms"] = {"tasks": 300, "to_claim_p50": 1.61, "to_claim_p99": 2.5,
                                "claim_to_start_p50": 1.84, "claim_to_start_p99": 4.0}
    assert "at the median 1.6 ms from the insert to the claim, 1.8 ms from the claim to the start" in idle_line()
    del idle["latency_split_ms"]  # a run from before the split was recorded: the line without it
    assert "p50" in idle_line() and "from the insert to the claim" not in idle_line()


def test_the_chain_and_makespan_lines_quote_their_runs() -> None:
    data = stored(RESULTS)
    zipf = _run(data["suite"], "noop-zipf", 4)
    sleep = _run(data["suite"], "sleep20-uniform", 4)
    link = {"count": 100, "p50_ms": 1.26, "mean_ms": 1.57, "p90_ms": 2.68}
    zipf["chain_bound"] = {"chain_s": 2.0, "bound_tps": 8000.0, "share_of_bound": 0.68}
    zipf["chain_links"] = {"key_id": 7, "links": 200, "shared": link, "alone": {**link, "p50_ms": 0.65},
                           "commits_shared": {**link, "p50_ms": 1.03, "mean_ms": 1.26},
                           "commits_alone": {**link, "p50_ms": 0.5}, "share_at_mean_commits": 0.82}
    sleep.update(makespan_s=11.29, lower_bound_s=10.0)
    sleep["makespan_parts"] = {"over_bound_s": 1.29, "gaps_s": 1.08, "overrun_s": 0.15, "start_s": 0.05,
                               "end_idle_s": 0.01, "gap_ms": {"count": 1996, "p50": 2.08, "mean": 2.17, "p90": 3.03}}
    lines = summary(data).splitlines()
    chain = next(line for line in lines if line.startswith("* Hot key"))
    assert "**0.68 of its chain bound**" in chain and "0.82 of the chain's commits at their mean" in chain
    assert "a link took 1.26 ms at the median (1.57 mean) and a bare commit 1.03 ms (1.26); alone, 0.65 ms" in chain
    makespan = next(line for line in lines if line.startswith("* Makespan"))
    assert "11.29 s against a bound of 10.00 s" in makespan and "the 1.29 s over it are 1.08 s of gaps" in makespan
    assert "p50 2.08 ms each" in makespan and "0.15 s of actions running past 20 ms" in makespan
    # Runs from before these figures were recorded: no such lines.
    del zipf["chain_links"], sleep["makespan_parts"]
    assert not any(line.startswith(("* Hot key", "* Makespan")) for line in summary(data).splitlines())
