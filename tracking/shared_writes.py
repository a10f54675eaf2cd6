"""Writes that several processes may make to one run at the same moment.

MLflow's SQL store sets a tag (and logs a dataset, or a run's latest metric) by looking for its
row, then inserting it when absent. Two processes writing the same new key at once both insert, and one of them gets
a unique-key violation (SQLite, PostgreSQL, MySQL alike) though nothing is wrong: written again,
the row exists and is updated. `retrying` does that; any other error is raised at once.
"""

from __future__ import annotations

import random
import time
from typing import Callable, TypeVar

from mlflow.exceptions import MlflowException

T = TypeVar("T")
ATTEMPTS = 5
UNIQUE_VIOLATION = ("unique constraint", "duplicate key", "duplicate entry")


def is_unique_violation(exc: BaseException) -> bool:
    return isinstance(exc, MlflowException) and any(s in str(exc).lower() for s in UNIQUE_VIOLATION)


def retrying(write: Callable[[], T], attempts: int = ATTEMPTS) -> T:
    """`write()`, again after a short random pause while another writer won a race for a key."""
    for attempt in range(1, attempts + 1):
        try:
            return write()
        except MlflowException as exc:
            if attempt == attempts or not is_unique_violation(exc):
                raise
            time.sleep(random.uniform(0.02, 0.2) * attempt)
    raise AssertionError("unreachable")
