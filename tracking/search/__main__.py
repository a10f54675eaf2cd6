"""``python -m tracking.search``: runs the search (tracking/search/cli.py)."""

import sys

from tracking.search.cli import main

if __name__ == "__main__":  # spawned workers import this module too
    sys.exit(main())
