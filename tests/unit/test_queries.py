"""The named SQL blocks of taskomatic/db/sql/*.sql, and every call site that names one."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

from taskomatic.db.queries import all_queries, blocks, query, sql_files

PACKAGE = Path(__file__).resolve().parents[2] / "taskomatic"
PLACEHOLDER = re.compile(r"%\((\w+)\)s")
STATEMENT_START = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "ANALYZE")
STORE_METHODS = {"one", "all", "all_last", "run", "scalar"}

# Every query the daemon and CLI need (DESIGN.md's pipeline): a block renamed or
# dropped from queries.sql breaks one of these at run time, not at import.
EXPECTED = {
    "register_instance", "instance_heartbeat", "instance_stopped", "try_standalone_guard",
    "try_multihost_guard", "adopt_orphaned_claims", "held_tasks", "claim_tasks", "task_states",
    "mark_running", "mark_rerun", "record_outcomes", "fail_unstartable", "release_unstarted",
    "cancel_task", "submit_task", "get_vm", "get_host", "place_vm", "list_tasks",
}


def placeholders(sql: str) -> set[str]:
    return set(PLACEHOLDER.findall(sql))


def _strip_literals(sql: str) -> str:
    return re.sub(r"'(?:[^']|'')*'", "''", sql)


def test_file_has_blocks_and_each_name_once() -> None:
    headers = [h for text in sql_files().values() for h in re.findall(r"^-- ([a-z_]+) --$", text, re.MULTILINE)]
    assert len(headers) >= len(EXPECTED)
    duplicates = sorted({h for h in headers if headers.count(h) > 1})
    assert duplicates == [], f"blocks defined twice (the later one silently wins): {duplicates}"
    assert set(headers) == set(all_queries())


def test_expected_queries_exist() -> None:
    missing = EXPECTED - set(all_queries())
    assert not missing


@pytest.mark.parametrize("name", sorted(all_queries()))
def test_block_is_one_clean_statement(name: str) -> None:
    sql = query(name)
    assert sql, f"{name} is empty"
    lines = sql.splitlines()
    assert not any(line.lstrip().startswith("--") for line in lines), "a comment line was left in the SQL"
    assert lines[0].split()[0].upper() in STATEMENT_START, lines[0]
    bare = _strip_literals(sql)
    assert ";" not in bare, "one statement per block, without the trailing semicolon"
    assert bare.count("(") == bare.count(")"), "unbalanced parentheses"
    assert sql.count("'") % 2 == 0, "unbalanced quotes"
    assert "/*" not in sql and "*/" not in sql


@pytest.mark.parametrize("name", sorted(all_queries()))
def test_parameters_are_named_pyformat(name: str) -> None:
    sql = query(name)
    without_named = PLACEHOLDER.sub("", sql)
    assert "%" not in without_named, "only %(name)s placeholders; a bare % or %s breaks psycopg2"
    assert "{" not in sql and "}" not in sql, "no str.format markers"
    # psycopg2 uses Python's %-formatting against the parameter dict: it must work.
    params = {p: f"<{p}>" for p in placeholders(sql)}
    rendered = sql % params
    for p in params:
        assert f"<{p}>" in rendered


def test_unknown_name_raises_key_error_naming_it() -> None:
    with pytest.raises(KeyError) as info:
        query("no_such_query")
    assert "no_such_query" in str(info.value)


def test_query_returns_the_block() -> None:
    assert query("claim_tasks") == all_queries()["claim_tasks"]
    assert query("claim_tasks").startswith("WITH picked AS")
    assert "FOR UPDATE SKIP LOCKED" in query("claim_tasks")
    assert "ORDER BY id" in query("claim_tasks")


def test_description_lines_are_not_sql() -> None:
    # try_standalone_guard's description spans two comment lines.
    assert query("try_standalone_guard") == "SELECT pg_try_advisory_lock(%(lock_id)s)"
    assert query("instance_heartbeat") == (
        "UPDATE instances SET heartbeat_at = clock_timestamp() WHERE id = %(instance_id)s")


def test_writes_that_fence_check_the_holder() -> None:
    # Guarantee 5 (fencing): a task is only marked or ended by the instance that holds it.
    for name in ("mark_running", "mark_rerun", "record_outcome", "record_outcomes", "fail_unstartable",
                 "release_unstarted"):
        sql = query(name)
        assert "claimed_by = %(instance_id)s" in sql, name
    assert "state = 'queued'" in query("mark_running")
    assert "state = 'running'" in query("record_outcome")
    assert "state = 'running'" in query("record_outcomes")


def test_held_tasks_come_in_id_order() -> None:
    assert query("held_tasks").rstrip().endswith("ORDER BY t.id")


def test_dynamically_named_queries_take_the_same_parameters() -> None:
    # Called through a variable (supervisor guard), so with one set of keywords.
    assert placeholders(query("try_standalone_guard")) == placeholders(query("try_multihost_guard")) == {
        "lock_id"}


def _store_calls() -> dict[str, list[tuple[str, int, set[str] | None]]]:
    """Query name -> (file, line, keyword names or None when **kwargs) for every literal call site."""
    calls: dict[str, list[tuple[str, int, set[str] | None]]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text("utf-8"), str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in STORE_METHODS and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                continue
            receiver = ast.unparse(node.func.value)
            if "store" not in receiver:
                continue
            keywords: set[str] | None = {k.arg for k in node.keywords if k.arg is not None}
            if any(k.arg is None for k in node.keywords):
                keywords = None
            calls[node.args[0].value].append((str(path.relative_to(PACKAGE.parent)), node.lineno, keywords))
    return calls


def test_store_call_sites_were_found() -> None:
    calls = _store_calls()
    assert {"claim_tasks", "task_states", "held_tasks", "record_outcomes", "get_vm"} <= set(calls)


def test_every_called_query_exists() -> None:
    missing = {name: sites for name, sites in _store_calls().items() if name not in all_queries()}
    assert not missing


def test_call_sites_pass_exactly_the_query_parameters() -> None:
    problems = []
    for name, sites in _store_calls().items():
        if name not in all_queries():
            continue
        wanted = placeholders(query(name))
        for path, line, keywords in sites:
            if keywords is None:
                continue
            if keywords != wanted:
                problems.append(f"{path}:{line} {name}: passes {sorted(keywords)}, query uses {sorted(wanted)}")
    assert not problems, "\n".join(problems)


def test_product_code_calls_database_functions_not_query_names() -> None:
    outside = {name: [s for s in sites if not s[0].startswith("taskomatic/db/")]
               for name, sites in _store_calls().items()}
    outside = {name: sites for name, sites in outside.items() if sites}
    assert not outside, f"named queries called outside taskomatic/db/: {outside}"


def test_no_sql_is_executed_outside_the_database_layer() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE.parent))
        if rel.startswith("taskomatic/db/"):
            continue
        for node in ast.walk(ast.parse(path.read_text("utf-8"), rel)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "execute":
                found.append(f"{rel}:{node.lineno}")
    assert not found, f"SQL run outside taskomatic/db/: {found}"


def _module_calls(module: Path) -> set[str]:
    tree = ast.parse(module.read_text("utf-8"))
    return {node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)}


@pytest.mark.parametrize("file_name", sorted(sql_files()))
def test_each_query_file_belongs_to_its_database_module_which_runs_every_query(file_name: str) -> None:
    module = PACKAGE / "db" / file_name.replace(".sql", ".py")
    assert module.exists(), f"{file_name} has no database module {module.name}"
    names = {name for name, _ in blocks(sql_files()[file_name])}
    unused = names - _module_calls(module)
    assert not unused, f"queries of {file_name} that {module.name} never runs: {sorted(unused)}"
