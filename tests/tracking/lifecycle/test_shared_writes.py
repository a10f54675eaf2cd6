"""Several processes writing one run at once (tracking/lifecycle/shared_writes.py): the shared search's
parent run, whose workers record themselves as its owners and beat at the same moments."""

from __future__ import annotations

import threading

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from tracking.lifecycle import liveness
from tracking.lifecycle.shared_writes import is_unique_violation, retry, retrying


def test_owners_recording_themselves_at_once_on_one_run_all_succeed(tracking_uri):
    """Without the retry, 19 of 20 rounds of this failed on SQLite ('UNIQUE constraint failed:
    tags.key, tags.run_uuid'), as three workers on PostgreSQL did in CI ('duplicate key')."""
    client = mlflow.MlflowClient()
    errors = []
    for _ in range(5):
        run_id = client.create_run("0").info.run_id
        start = threading.Barrier(6)

        def owner():
            start.wait()
            try:
                liveness.Heartbeat(run_id, shared=True, interval_s=60).start().stop()
                liveness.beat(run_id)
            except Exception as exc:  # noqa: BLE001 - collected for the assert
                errors.append(exc)

        threads = [threading.Thread(target=owner) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert client.get_run(run_id).data.tags[liveness.SHARED] == "true"
    assert errors == []


def test_other_store_errors_are_raised_at_once(tracking_uri):
    calls = []

    def bad_write():
        calls.append(1)
        mlflow.MlflowClient().set_tag("no-such-run", "k", "v")

    with pytest.raises(MlflowException) as raised:
        retrying(bad_write)
    assert len(calls) == 1 and not is_unique_violation(raised.value)


def test_retry_repeats_only_the_errors_it_is_told_and_raises_the_last():
    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise KeyError(len(calls))
        return "done"

    def wait(attempt):
        waits.append(attempt)
        return 0

    assert retry(flaky, attempts=3, on=lambda e: isinstance(e, KeyError), wait=wait) == "done"
    assert waits == [1, 2]
    calls.clear()
    with pytest.raises(KeyError):
        retry(flaky, attempts=2, on=lambda e: isinstance(e, KeyError), wait=lambda _: 0)
    assert len(calls) == 2
    calls.clear()
    with pytest.raises(KeyError):
        retry(flaky, attempts=5, on=lambda e: isinstance(e, ValueError), wait=lambda _: 0)
    assert len(calls) == 1
