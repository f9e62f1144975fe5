"""``python -m bench.multihost``: see bench/multihost/cli.py."""

import sys

from bench.multihost.cli import main

sys.exit(main())
