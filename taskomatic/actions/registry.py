"""The registry of actions: the built-in ones and those plugins install by entry point.

Kept apart from ``actions/base.py`` (which every action imports) so that the
module defining what an action is never imports the actions themselves.
"""

from __future__ import annotations

import logging
from importlib import metadata

from taskomatic.actions import host, migrate, storage, vm
from taskomatic.actions.base import ENTRY_POINT_GROUP, Action

log = logging.getLogger(__name__)


def load_actions() -> dict[str, Action]:
    """Every action installed: entry points in group ``taskomatic.actions``.

    An entry point names a list of Action objects. The built-in ones are
    always present, even when the package is run from a source tree that was
    never installed (no entry-point metadata).
    """
    found: dict[str, Action] = {a.name: a for a in (*vm.ACTIONS, *migrate.ACTIONS, *host.ACTIONS, *storage.ACTIONS)}
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            provided = entry.load()
        except Exception:  # a broken plugin must not stop the daemon
            log.exception("cannot load action plugin %s", entry.value)
            continue
        for action in provided:
            found[action.name] = action
    return found
