"""Ctrl-C and SIGTERM as one interrupt, which ends a run KILLED and never mid-write."""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into the same path as Ctrl-C; `signum` says which signal it was."""

    def __init__(self, signum: int, again: bool = False):
        super().__init__(f"signal {signum}" + (", again" if again else ""))
        self.signum = signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM raises `Interrupted` so a run ends KILLED rather than vanishing."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class DeferredInterrupt:
    """Ctrl-C and SIGTERM during training set a flag that training checks between batches.

    So the interrupt never lands inside MLflow's logging or a checkpoint's upload (where it
    could leave the store half-written); the same signal again interrupts at once. Another
    signal does not: `mlflow run` answers Ctrl-C by sending its command SIGTERM, which is the
    same request, and must not cut the checkpoint short.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, _frame) -> None:
        if self.signum == signum:
            raise Interrupted(signum, again=True)
        if self.signum is None:
            self.signum = signum

    def raise_if_set(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator["DeferredInterrupt"]:
        sigs = (signal.SIGINT, signal.SIGTERM)
        try:
            previous = [signal.signal(s, self._handle) for s in sigs]
        except ValueError:  # not the main thread: leave signals alone
            yield self
            return
        try:
            yield self
        finally:
            for s, handler in zip(sigs, previous):
                signal.signal(s, handler)
