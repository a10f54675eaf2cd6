"""Ctrl-C and SIGTERM as one interrupt, which ends a run KILLED and never mid-write.

An entry point installs one `Interrupts` for its whole life (mlflow_run.run_entry_point); the
runs it trains share it (`Interrupts.current`).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into the same path as Ctrl-C; `signum` says which signal it was."""

    def __init__(self, signum: int, again: bool = False):
        super().__init__(f"signal {signum}" + (", again" if again else ""))
        self.signum = signum


def exit_code(exc: KeyboardInterrupt) -> int:
    """The shell's convention for a process ended by a signal: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


class Interrupts:
    """Ctrl-C and SIGTERM while installed: the first one is the request to stop.

    It raises `Interrupted` at once, except while `deferred()` (training): there it sets a flag
    that training checks between batches, so it never lands inside MLflow's logging or a
    checkpoint's upload (where it could leave the store half-written). After it, the same signal
    again interrupts at once (a second Ctrl-C) and the other one is ignored, through the end of
    the run: `mlflow run` answers Ctrl-C by sending its command SIGTERM, the same request, at a
    moment of its choosing, and it must cut short neither a checkpoint nor the run's end.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferring = self._installed = False

    @classmethod
    def current(cls) -> "Interrupts":
        """The one installed in this process (an entry point's, for its whole life), else a new
        one. A run trained inside an entry point shares its request: with one of its own,
        `mlflow run`'s SIGTERM after the Ctrl-C that stopped the run would reach the entry
        point's as a first request and cut the end of the entry point's own run short."""
        return _installed[-1] if _installed else cls()

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum
            if not self._deferring:
                raise Interrupted(signum)
        elif signum == self.signum == signal.SIGINT:  # a person's second Ctrl-C
            raise Interrupted(signum, again=True)
        # a repeated SIGTERM is a machine's (mlflow run's, then the parent-death signal): the
        # same request, which must not cut the checkpoint or the run's end short

    def raise_if_set(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator["Interrupts"]:
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False

    @contextlib.contextmanager
    def installed(self) -> Iterator["Interrupts"]:
        """Its handlers, the previous ones back at the end; inside its own scope, nothing more."""
        if self._installed:
            yield self
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        try:
            previous = [signal.signal(s, self._handle) for s in sigs]
        except ValueError:  # not the main thread: leave signals alone
            yield self
            return
        self._installed = True
        _installed.append(self)
        try:
            yield self
        finally:
            _installed.remove(self)
            self._installed = False
            for s, handler in zip(sigs, previous):
                signal.signal(s, handler)


_installed: list[Interrupts] = []  # innermost last; signal handlers are the process's, so is this
