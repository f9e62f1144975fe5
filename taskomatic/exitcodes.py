"""Process exit codes of every taskomatic command and process, in one place.

The systemd unit lists the codes that waiting cannot cure in
``RestartPreventExitStatus``; the README's operations section documents them.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # a command failed (or a child hit an unexpected error)
EXIT_USAGE = 2  # bad command line
EXIT_CONFIG = 3  # bad configuration: a restart cannot fix it
EXIT_DATABASE = 4  # the database cannot be reached or refused us
EXIT_ALREADY_RUNNING = 5  # a standalone instance already holds the database
EXIT_CHILD_FAILING = 6  # a child keeps dying at boot: let systemd decide
EXIT_LEASE_LOST = 7  # multihost fetcher: the database refused to renew our lease
EXIT_SCHEMA = 8  # the schema is older (or newer) than this taskomatic: run `taskomatic db upgrade`
EXIT_DATABASE_REFUSED = 9  # the database refused us (password, pg_hba, no such role or database)
