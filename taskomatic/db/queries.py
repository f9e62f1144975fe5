"""Load the named SQL blocks of ``queries.sql``."""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

_HEADER = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


@lru_cache(maxsize=1)
def all_queries() -> dict[str, str]:
    text = resources.files("taskomatic.db").joinpath("queries.sql").read_text("utf-8")
    parts = _HEADER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=False):
        lines = body.strip().splitlines()
        # First line is the description comment; keep only the SQL.
        sql = "\n".join(line for line in lines if not line.lstrip().startswith("--")).strip()
        queries[name] = sql.rstrip(";")
    return queries


def query(name: str) -> str:
    try:
        return all_queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in queries.sql") from None
