"""Writes that several processes may make at the same moment, and the one way they are retried.

MLflow's SQL store sets a tag (and logs a dataset, or a run's latest metric) by looking for its
row, then inserting it when absent. Two processes writing the same new key at once both insert, and one of them gets
a unique-key violation (SQLite, PostgreSQL, MySQL alike) though nothing is wrong: written again,
the row exists and is updated. `retrying` does that; any other error is raised at once. The
registry's concurrent promoters and Optuna's table creation retry through `retry` too.
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


def retry(call: Callable[[], T], *, attempts: int, on: Callable[[Exception], bool],
          wait: Callable[[int], float]) -> T:
    """`call()`, again after `wait(attempt)` seconds (attempt 1, 2, ...) while it raises an error
    that `on` accepts, `attempts` calls at most; any other error, or the last, is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - `on` decides; the rest is raised
            if attempt == attempts or not on(exc):
                raise
            time.sleep(wait(attempt))
    raise AssertionError("unreachable")


def retrying(write: Callable[[], T], attempts: int = ATTEMPTS) -> T:
    """`write()`, again after a short random pause while another writer won a race for a key."""
    return retry(write, attempts=attempts, on=is_unique_violation,
                 wait=lambda attempt: random.uniform(0.02, 0.2) * attempt)
