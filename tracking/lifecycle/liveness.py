"""Who runs a RUNNING MLflow run, and whether that process is still there.

Every run this project starts records its owner as tags: host, boot id, pid, start time and a
heartbeat (unix seconds) that a background thread refreshes every `HEARTBEAT_S` seconds and the
training refreshes after every epoch. The thread only sets a tag; the training loop never waits
for it. One rule judges a RUNNING run, used by `tracking.doctor`, by `--resume` (which refuses a
live run) and by the shared search for its parent run:

- on the owner's host (same host name and boot): alive exactly while its pid is running and
  is the same process (started no later than the run's owner record);
- elsewhere: alive while its heartbeat is younger than a limit (default `STALE_S`, never below
  three of the run's heartbeat intervals), so a stopped clock or a lost network errs on "alive";
- a run owned by several processes (a shared search's parent, tag `liveness.shared`): alive
  while any of them heartbeats, by the heartbeat alone;
- a run without these tags (made by older code or another tool) is "unknown" and left alone.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import psutil

if TYPE_CHECKING:
    from mlflow.entities import Run

# MLflow is imported in the functions that write: the keeper (tracking.lifecycle.mlflow_run) judges its
# process by `pid_is_owner` and idles through the training without MLflow.

log = logging.getLogger(__name__)

PREFIX = "liveness."
HOST, BOOT, PID, STARTED, HEARTBEAT, INTERVAL, SHARED = (
    PREFIX + k for k in ("host", "boot_id", "pid", "started", "heartbeat", "interval_s", "shared"))
HEARTBEAT_S = float(os.environ.get("MNIST_MLFLOW_HEARTBEAT_S", "30"))
STALE_S = 600.0  # a heartbeat older than this (other hosts, shared runs) means the owner is gone


def boot_id() -> str:
    """Tells two boots of one host apart: after a reboot no pid of before is alive."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def owner_tags(shared: bool = False, interval_s: float = HEARTBEAT_S) -> dict[str, str]:
    now = f"{time.time():.3f}"
    tags = {HOST: socket.gethostname(), BOOT: boot_id(), PID: str(os.getpid()), STARTED: now,
            HEARTBEAT: now, INTERVAL: f"{interval_s:g}"}
    if shared:
        tags[SHARED] = "true"
    return tags


def beat(run_id: str) -> None:
    import mlflow

    from tracking.lifecycle.shared_writes import retrying

    # retrying: a shared run's other owners beat too
    retrying(lambda: mlflow.MlflowClient().set_tag(run_id, HEARTBEAT, f"{time.time():.3f}"))


class Heartbeat:
    """Records this process as the run's owner, then refreshes the heartbeat from a thread.

    Store errors in the thread are logged, never raised: a hiccup must not stop a training.
    """

    def __init__(self, run_id: str, shared: bool = False, interval_s: float = HEARTBEAT_S):
        self.run_id, self.shared, self.interval_s = run_id, shared, interval_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Heartbeat":
        import mlflow
        from mlflow.entities import RunTag

        from tracking.lifecycle.shared_writes import retrying

        tags = [RunTag(k, v) for k, v in owner_tags(self.shared, self.interval_s).items()]
        # retrying: the other owners of a shared run may record themselves at the same moment
        retrying(lambda: mlflow.MlflowClient().log_batch(self.run_id, tags=tags))
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{self.run_id[:8]}",
                                        daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                beat(self.run_id)
            except Exception as exc:  # noqa: BLE001 - the next beat may get through
                log.warning("heartbeat of run %s not recorded: %r", self.run_id, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


# ---------------------------------------------------------------- judging a run

@dataclass(frozen=True)
class Verdict:
    state: str  # "alive" | "dead" | "unknown"
    reason: str
    last_heartbeat: Optional[float] = None  # unix seconds

    @property
    def alive(self) -> bool:
        return self.state == "alive"

    @property
    def dead(self) -> bool:
        return self.state == "dead"


def _float(tags: dict, key: str) -> Optional[float]:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def pid_is_owner(pid: int, started: Optional[float]) -> bool:
    """The pid runs (not a zombie) and is the process that recorded itself at `started` (unix
    seconds, at or after its start), not a later one reusing the pid."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return psutil.pid_exists(pid) if pid > 0 else False
    return started is None or created <= started + 1.0


def judge(run: Run, stale_s: float = STALE_S, now: Optional[float] = None) -> Verdict:
    """Whether the process that runs `run` is still there (see the module docstring)."""
    if run.info.status != "RUNNING":
        return Verdict("dead", f"status {run.info.status}")
    tags = run.data.tags
    if HOST not in tags or PID not in tags:
        return Verdict("unknown", "no owner recorded (made by older code or another tool)")
    now = time.time() if now is None else now
    last = _float(tags, HEARTBEAT)
    limit = max(stale_s, 3 * (_float(tags, INTERVAL) or HEARTBEAT_S))
    age = None if last is None else now - last
    where = f"pid {tags[PID]} on {tags[HOST]}"
    same_host = tags[HOST] == socket.gethostname() and tags.get(BOOT, "") == boot_id()
    if tags[HOST] == socket.gethostname() and tags.get(BOOT) and boot_id() and not same_host:
        return Verdict("dead", f"{where}: the host has rebooted since", last)
    if same_host and tags.get(SHARED) != "true":
        if pid_is_owner(int(tags[PID]), _float(tags, STARTED)):
            return Verdict("alive", f"{where} is running", last)
        return Verdict("dead", f"{where} is gone" + (f" (last heartbeat {age:.0f} s ago)"
                                                     if age is not None else ""), last)
    if age is None:
        return Verdict("unknown", f"{where}: no heartbeat recorded")
    if age > limit:
        return Verdict("dead", f"no heartbeat for {age:.0f} s (limit {limit:.0f} s) from {where}"
                       + (" or the other processes sharing it" if tags.get(SHARED) == "true" else ""),
                       last)
    return Verdict("alive", f"heartbeat {age:.0f} s ago from {where}", last)
