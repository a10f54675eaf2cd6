"""Our command as the child of `mlflow run`: what that parent does not do for us, or undoes.

`mlflow run` (3.17) creates the run before our command starts and hands it over as MLFLOW_RUN_ID,
which `mlflow.start_run` deletes from our environment: `attach()` reads it at our start. Then:

- a bad value leaves that run behind: `Parent.fail` ends it FAILED with the reason;
- it does not pass SIGTERM on to our command: Linux's parent-death signal does, when `mlflow run`
  dies (the bash that runs the MLproject command replaces itself by our command, so our parent
  is `mlflow run` itself);
- on Ctrl-C it sends our command SIGTERM on top of the terminal's SIGINT, at a moment of its
  choosing (signals.Interrupts takes both as one request), and once our command has exited it sets
  the run's status itself, FAILED on any non-zero exit, even over the KILLED we set (its "already
  terminated?" check compares the status string with integer states).

So `attach()` also starts a keeper, ``python -m tracking.lifecycle.mlflow_run RUN_ID PID STARTED``,
in a session of its own (a terminal's Ctrl-C does not reach it). Our command tells it, through a pipe,
the status it ended the run with; the keeper reads until our command has exited, however it
ended, waits until `mlflow run` has exited too, so that nothing writes the status after it, and
then puts our status back over a FAILED. No step depends on which process gets there first.

Every entry point that may run under `mlflow run` (stage, consistency, search, confirm, tune,
promote) runs its body through `run_entry_point`, the one place for this: the keeper, signals
taken as one request to the last line, and `Parent.settle` at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import psutil

from tracking.lifecycle.liveness import pid_is_owner
from tracking.lifecycle.signals import Interrupts, exit_code

# MLflow is imported in the functions that use it: the keeper runs this module and idles
# through the training without it.

WAIT_S = 3600  # longest wait for `mlflow run` to exit after our command did
STORE_RETRY_S = 600  # how long the keeper retries a store that fails (a busy SQLite file)
SIGNAL_EXITS = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # the shell's 130 and 143


@dataclass
class Parent:
    """`mlflow run` above our command: the run it made, and our keeper with the pipe to it."""

    run_id: str
    keeper: subprocess.Popen
    report_fd: int

    def keep(self, status: str) -> None:
        """The keeper puts `status` back if `mlflow run` writes over it as it exits."""
        with contextlib.suppress(OSError):  # a keeper already gone: mlflow run's status stays
            os.write(self.report_fd, f"{status}\n".encode())

    def fail(self, error: str) -> None:
        """Ends the run `mlflow run` made FAILED before ours began (a bad value), with the reason
        as tag `error`, so the UI says why."""
        import mlflow

        from tracking.lifecycle.store import check_store

        with contextlib.suppress(Exception):  # the store may be the problem; the message is printed anyway
            check_store()  # an unusable store fails in seconds, not after MLflow's retries
            mlflow.MlflowClient().set_tag(self.run_id, "error", error[:5000])
            mlflow.MlflowClient().set_terminated(self.run_id, "FAILED")

    def settle(self, code: int) -> None:
        """After our command, however it ended (exit status `code`): the status it ended the run
        with stays, over the one `mlflow run` writes from `code`. A run it left RUNNING (bad input,
        a signal before the run began, a command that logs into no run) ends here: KILLED after
        a signal, FAILED after an error; after success `mlflow run` ends it FINISHED."""
        import mlflow

        from tracking.lifecycle.store import check_store

        try:
            check_store()
            client = mlflow.MlflowClient()
            status = client.get_run(self.run_id).info.status
            if status == "RUNNING":
                if code == 0:
                    return
                status = "KILLED" if code in SIGNAL_EXITS else "FAILED"
                client.set_terminated(self.run_id, status)
        except Exception:  # noqa: BLE001 - a store gone away: mlflow run's status stays
            return
        if status != ("FINISHED" if code == 0 else "FAILED"):  # what mlflow run writes
            self.keep(status)


def run_entry_point(body: Callable[[Optional[Parent]], int]) -> int:
    """Runs an entry point's `body` (given `mlflow run`'s Parent, or None outside it) and returns
    its exit status. Ctrl-C and SIGTERM are one request (signals.Interrupts) to the last line, so
    `mlflow run`'s SIGTERM after the terminal's SIGINT cuts no run's end short; the runs a body
    trains pick that one up (runs.run_training)."""
    parent = attach()  # first: `mlflow.start_run` takes MLFLOW_RUN_ID from the environment
    code = 1  # an exception escaping the body
    with Interrupts().installed():
        try:
            code = body(parent)
        except KeyboardInterrupt as exc:
            code = exit_code(exc)
            raise
        except SystemExit as exc:  # --help
            code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
            raise
        finally:
            if parent is not None:
                parent.settle(code)
    return code


def attach() -> Parent | None:
    """Under `mlflow run` (MLFLOW_RUN_ID set): its run, our death with it, and the keeper."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    pid = os.getppid()  # `mlflow run`'s: its bash replaced itself by our command
    stop_with_parent()
    return Parent(run_id, *start_keeper(run_id, pid))


def stop_with_parent() -> None:
    """SIGTERM us when our parent dies (Linux's parent-death signal; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM),
                                                ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


def start_keeper(run_id: str, pid: int) -> tuple[subprocess.Popen, int]:
    """Starts the keeper with the read end of a pipe as its stdin; returns it and the write end.

    Only our command holds the write end (a pipe's ends are not inherited by the processes it
    starts), so the keeper sees the end of its input exactly when our command has exited.
    """
    read_fd, write_fd = os.pipe()
    started = psutil.Process(pid).create_time()
    keeper = subprocess.Popen([sys.executable, "-m", "tracking.lifecycle.mlflow_run",
                               run_id, str(pid), repr(started)],
                              stdin=read_fd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    os.close(read_fd)
    return keeper, write_fd


def restore(run_id: str, status: str) -> None:
    """Puts `status` back over `mlflow run`'s FAILED, until the store says it is there.

    Any other status is left alone: ours still, or a resume that has begun.
    """
    import mlflow

    client = mlflow.MlflowClient()
    deadline = time.monotonic() + STORE_RETRY_S
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # a busy or restarting store: try again
            current = client.get_run(run_id).info.status
            if current == status or current != "FAILED":
                return
            client.set_terminated(run_id, status)
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    """The keeper: our command's report on stdin, then `restore` once `mlflow run` has exited."""
    run_id, pid, started = (argv or sys.argv[1:])[:3]
    said = sys.stdin.read().split()  # returns once our command has exited
    if not said:  # finished, failed, or killed before it could say: mlflow run's status is right
        return 0
    status = said[-1]
    deadline = time.monotonic() + WAIT_S
    while pid_is_owner(int(pid), float(started)) and time.monotonic() < deadline:
        time.sleep(0.2)
    restore(run_id, status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
