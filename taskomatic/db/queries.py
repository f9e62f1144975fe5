"""Load the named SQL blocks of ``taskomatic/db/sql/*.sql``.

Each file holds the queries of one database module (``-- name --`` header, a
description line, the statement); names are unique across all files.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

_HEADER = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


def sql_files() -> dict[str, str]:
    """File name -> text of every query file, in name order."""
    folder = resources.files("taskomatic.db").joinpath("sql")
    return {
        entry.name: entry.read_text("utf-8")
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".sql")
    }


def blocks(text: str) -> list[tuple[str, str]]:
    """(name, SQL) of every block of one file, comment lines dropped, in file order."""
    parts = _HEADER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    found = []
    for name, body in zip(parts[1::2], parts[2::2], strict=False):
        lines = body.strip().splitlines()
        # The first line is the description comment; keep only the SQL.
        sql = "\n".join(line for line in lines if not line.lstrip().startswith("--")).strip()
        found.append((name, sql.rstrip(";")))
    return found


@lru_cache(maxsize=1)
def all_queries() -> dict[str, str]:
    queries: dict[str, str] = {}
    for file_name, text in sql_files().items():
        for name, sql in blocks(text):
            if name in queries:
                raise RuntimeError(f"query {name!r} is defined twice (again in {file_name})")
            queries[name] = sql
    return queries


def query(name: str) -> str:
    try:
        return all_queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in taskomatic/db/sql/") from None
