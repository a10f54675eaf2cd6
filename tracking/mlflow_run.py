"""Our command as the child of `mlflow run`: what that parent does not do for us, or undoes.

`mlflow run` (3.17) creates the run before our command starts, so a bad value leaves it
behind; it does not pass SIGTERM on to our command; and when our command exits it sets the
run's status itself, FINISHED on exit 0 and FAILED otherwise, even over the KILLED we set
(its "already terminated?" check compares the status string with integer states).
``python -m tracking.mlflow_run PID RUN_ID STATUS`` waits for process PID to exit, then puts
STATUS back if the run was marked FAILED meanwhile.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

import mlflow

from tracking.store import check_store

WAIT_S = 3600  # longest wait for `mlflow run` to exit after our command did


def parent_run_id() -> str | None:
    """The run `mlflow run` made for us (it sets MLFLOW_RUN_ID for its command only)."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def stop_with_parent() -> None:
    """SIGTERM us when `mlflow run` dies (Linux's parent-death signal)."""
    if parent_run_id() and sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def record_setup_error(message: str) -> None:
    """The run `mlflow run` made ends FAILED with the reason as tag `error`, so the UI says why."""
    run_id = parent_run_id()
    if not run_id:
        return
    try:
        check_store()  # an unusable store fails in seconds, not after MLflow's retries
        client = mlflow.MlflowClient()
        client.set_tag(run_id, "error", message[:5000])
        client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001 - the store may be the problem; the message is printed anyway
        pass


def keep_status_after_parent(run_id: str, status: str = "KILLED") -> None:
    """Starts a watcher that restores `status` once `mlflow run` has exited and overwritten it."""
    if parent_run_id() != run_id:
        return
    subprocess.Popen([sys.executable, "-m", "tracking.mlflow_run", str(os.getppid()), run_id, status],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def main(argv: list[str] | None = None) -> int:
    pid, run_id, status = (argv or sys.argv[1:])[:3]
    deadline = time.monotonic() + WAIT_S
    while _alive(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    client = mlflow.MlflowClient()
    if client.get_run(run_id).info.status == "FAILED":  # mlflow run's overwrite; not a resumed run
        client.set_terminated(run_id, status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
