"""Short texts for messages and logs: an error's first line, a quoted value."""

from __future__ import annotations

# What a message quotes of a value (a VM's description may be megabytes long).
_QUOTED_CHARS = 60


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def quoted(text: str) -> str:
    """``text`` quoted for a message, shortened if long."""
    if len(text) <= _QUOTED_CHARS:
        return repr(text)
    return repr(text[:_QUOTED_CHARS]) + f"... ({len(text)} characters)"
