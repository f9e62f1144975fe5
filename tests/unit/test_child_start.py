"""How children start: the forkserver context preloads what they need; spawn stays available."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from taskomatic.config import ConfigError, parse_overrides
from taskomatic.runtime.children import child_context


def test_forkserver_context_preloads_the_children_imports() -> None:
    context = child_context("forkserver")
    assert context.get_start_method() == "forkserver"
    from multiprocess import forkserver

    assert forkserver._forkserver._preload_modules == ["taskomatic.runtime.preload"]


def test_spawn_context_is_plain_spawn() -> None:
    assert child_context("spawn").get_start_method() == "spawn"


def test_preload_imports_the_heavy_modules_and_freezes_the_heap() -> None:
    # In a fresh interpreter, as the fork server runs it: what a child needs is imported, the heap frozen.
    code = ("import gc, sys; import taskomatic.runtime.preload; "
            "print(gc.get_freeze_count() > 10000, gc.isenabled(), "
            "all(m in sys.modules for m in ('psycopg2', 'libvirt', 'taskomatic.runtime.shard')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["True", "True", "True"], out


def _in_fresh_interpreter(code: str, **env: str) -> list[str]:
    environment = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                         env=environment)
    return out.stdout.split()


def test_preload_fills_the_free_blocks_the_children_would_write_into() -> None:
    # Holes made on purpose in two classes (every other one of 6,000 objects freed: ints of 32 bytes,
    # bytes of 96) are filled: a child's new objects would otherwise land in them, copying shared
    # pages. What is left free of a class is at most one fresh pool (16 KB / 32 bytes = 510 blocks).
    code = ("import taskomatic.runtime.preload as p; "
            "ints = [(1 << 20) + n for n in range(6000)]; del ints[::2]; "
            "raw = [bytes(96 - p._BYTES_HEADER) for _ in range(6000)]; del raw[::2]; "
            "before = p.free_small_blocks(); fillers = p.fill_free_small_blocks(); after = p.free_small_blocks(); "
            "print(len(p._FILLERS) > 1000, before[32] >= 2900, before[96] >= 2900, "
            "after[32] <= 510, after[96] <= 170, len(fillers) >= 5800)")
    assert _in_fresh_interpreter(code) == ["True"] * 6


def test_the_allocator_table_is_read() -> None:
    code = ("import taskomatic.runtime.preload as p; free = p.free_small_blocks(); "
            "print(len(free) >= 24, set(free) <= set(range(16, 513, 16)), all(b >= 0 for b in free.values()))")
    assert _in_fresh_interpreter(code) == ["True", "True", "True"]


@pytest.mark.parametrize("env, flag", [({"PYTHONMALLOC": "malloc"}, ""), ({"PYTHONMALLOC": "debug"}, ""),
                                       ({}, "-X dev")])
def test_nothing_is_filled_without_plain_pymalloc(env: dict[str, str], flag: str) -> None:
    # No table (malloc), or debug hooks that put each object a class higher: filling would only waste.
    code = "import taskomatic.runtime.preload as p; print(len(p._FILLERS))"
    args = [sys.executable, *flag.split(), "-c", code]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=60, env={**os.environ, **env})
    assert out.stdout.split() == ["0"], out


def test_a_failed_fill_still_lets_the_fork_server_start_children() -> None:
    # No memfd (the table cannot be captured): nothing read, nothing filled, the import goes on.
    code = ("import os\ndef refused(*args): raise OSError(24, 'Too many open files')\nos.memfd_create = refused\n"
            "import taskomatic.runtime.preload as p\nprint(p.free_small_blocks(), p._FILLERS)")
    assert _in_fresh_interpreter(code) == ["{}", "[]"]
    # Any other failure of the fill is swallowed too: it is an optimisation.
    code = ("import taskomatic.runtime.preload as p\ndef broken(): raise TypeError('layout changed')\n"
            "p.fill_free_small_blocks = broken\nprint(p._fill_or_nothing())")
    assert _in_fresh_interpreter(code) == ["[]"]


def test_an_unknown_start_method_is_refused() -> None:
    with pytest.raises(ConfigError, match="child_start"):
        parse_overrides(["child_start=fork"])
