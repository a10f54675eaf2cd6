"""The optuna-dashboard command for a search's storage, which the search prints when it ends.

The study's own view (history, importances, intermediate values per trial), next to the MLflow
UI's nested runs.

    pip install -e '.[dashboard]'
"""

from __future__ import annotations

import shlex
from pathlib import Path

from tracking.search.study import redact

DEFAULT_PORT = 8080  # optuna-dashboard's own default


def command(storage: str, port: int = DEFAULT_PORT) -> list[str]:
    """The command line that opens optuna-dashboard on `storage` (a search's --storage value).

    File paths are made absolute, so the command works from any folder; a password is replaced
    by *** (it may end up in logs), as in the runs' tags.
    """
    if storage.startswith("journal:"):
        # optuna-dashboard takes a journal file as a plain path; the hint keeps a not yet
        # written file from being mistaken for a database URL
        target = ["--storage-class", "JournalFileStorage",
                  str(Path(storage[len("journal:"):]).resolve())]
    elif storage.startswith("sqlite:///"):
        path, sep, query = storage[len("sqlite:///"):].partition("?")
        target = ["sqlite:///" + str(Path(path).resolve()) + sep + query]
    else:
        target = [redact(storage)]
    port_args = [] if port == DEFAULT_PORT else ["--port", str(port)]
    return ["optuna-dashboard", *port_args, *target]


def hint(storage: str) -> str:
    """What `python -m tracking.search` prints after a search."""
    return (f"optuna dashboard: {shlex.join(command(storage))}  "
            f"# pip install -e '.[dashboard]'; then open http://127.0.0.1:{DEFAULT_PORT}")
