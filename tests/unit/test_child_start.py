"""How children start: the forkserver context preloads what they need; spawn stays available."""

from __future__ import annotations

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


def test_preload_fills_the_free_blocks_the_children_would_write_into() -> None:
    # Holes made on purpose (every other one of 6,000 objects of 96 bytes freed) are filled: a child's
    # new objects would otherwise land in them, copying shared pages. What is left free of the class
    # is at most the tail of one fresh pool (16 KB / 96 bytes = 170 blocks).
    code = ("import taskomatic.runtime.preload as p; "
            "held = [bytes(96 - p._BYTES_HEADER) for _ in range(6000)]; del held[::2]; "
            "before = p.free_small_blocks()[96]; fillers = p.fill_free_small_blocks(); "
            "print(len(p._FILLERS) > 1000, before >= 3000, p.free_small_blocks()[96] <= 170, len(fillers) >= 3000)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["True", "True", "True", "True"], out


def test_the_allocator_table_is_read_for_every_size_class() -> None:
    code = "import taskomatic.runtime.preload as p; print(sorted(p.free_small_blocks()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == str(list(range(16, 513, 16))), out


def test_an_unknown_start_method_is_refused() -> None:
    with pytest.raises(ConfigError, match="child_start"):
        parse_overrides(["child_start=fork"])
