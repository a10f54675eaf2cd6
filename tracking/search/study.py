"""Optuna storage and the study: opening, resuming safely, re-queuing interrupted trials."""

from __future__ import annotations

import json
import os
import random
import tempfile
import warnings

import numpy as np
import optuna
import sqlalchemy
from optuna.trial import TrialState

from mnist_mlflow import config as C
from tracking.search import names as N
from tracking.search.sampling import base_params
from tracking.search.space import SearchSpec
from tracking.search.trial_runs import TrialRuns
from tracking.lifecycle.shared_writes import retry

OBJECTIVE = "hold-epoch"  # the objective's name and version, stored with the study
HEARTBEAT_S, MAX_RETRY = 60, 2  # RDB storage: a trial silent for 3 heartbeats is stale
SQLITE_WAIT_S = 60  # how long a worker waits for another's write lock on a SQLite study
RACED_CREATING_TABLES = (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)  # retried


class RetryAndCloseRun:
    """A trial whose worker died without a word (SIGKILL, power): queued again with its
    params (Optuna's RetryHeartbeatStaleTrialCallback) and its MLflow run ended FAILED.

    It runs in whichever worker notices, when that worker starts its next trial.
    """

    def __init__(self, max_retry: int, grace_s: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.max_retry, self.grace_s = max_retry, grace_s

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trial.user_attrs = {**trial.user_attrs, N.RETRY_OF: trial.number}  # copied to the retry
        self.retry(study, trial)
        queued = len(trial.system_attrs.get("retry_history", [])) < self.max_retry
        attrs = trial.user_attrs
        if N.PARENT_ATTR not in attrs:  # died before its objective began: no run yet
            return
        runs = TrialRuns(attrs[N.PARENT_ATTR], attrs[N.EXPERIMENT_ATTR],
                         study.study_name, "search", attrs.get(N.WORKER_ATTR, ""))
        runs.close(trial.number, N.FAIL, "FAILED", {
            "error": f"worker {attrs.get(N.WORKER_ATTR, '?')} lost: no heartbeat for {self.grace_s} s; "
                     + ("queued again" if queued else f"not retried (max {self.max_retry} retries)")})


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S) -> optuna.storages.BaseStorage:
    """``journal:<file>`` -> a journal file (safe for several local processes); else SQLAlchemy.

    RDB storage gets heartbeats: a trial whose process died without a word turns FAIL after
    3 heartbeats and is queued again, up to MAX_RETRY times (RetryAndCloseRun).
    """
    if heartbeat_s < 1:
        raise C.ConfigError(f"--heartbeat={heartbeat_s} is not allowed: 1 second or more")
    if url.startswith("journal:"):
        path = url[len("journal:"):]
        folder = os.path.dirname(os.path.abspath(path))
        if not path or not os.path.isdir(folder):
            raise C.ConfigError(f"storage {url!r}: the journal file's folder {folder!r} "
                                "does not exist")
        try:  # the journal appends to its file and locks with a symlink beside it: probe both
            open(path, "ab").close()
            tempfile.TemporaryFile(dir=folder).close()
            backend = optuna.storages.journal.JournalFileBackend(path)
        except OSError as exc:
            raise C.ConfigError(f"storage {url!r} cannot be written ({exc.strerror or exc})") from None
        check_journal(url, path)
        try:
            return optuna.storages.journal.JournalStorage(backend)  # replays the file
        except (ValueError, KeyError, TypeError) as exc:  # JSON, but not Optuna's entries
            raise corrupt_journal(url, f"{type(exc).__name__}: {exc}") from None

    def rdb() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s,
                heartbeat_stale_trial_callback=RetryAndCloseRun(MAX_RETRY, 3 * heartbeat_s),
                engine_kwargs={"connect_args": {"timeout": SQLITE_WAIT_S}} if is_sqlite(url) else None)
        if is_sqlite(url):
            lock_before_reading(storage.engine)
        return storage

    # Workers starting at once on an empty database race to create Optuna's tables; the loser
    # finds them made on its next try.
    return retry(rdb, attempts=3, wait=lambda _: random.uniform(0.5, 1.5),
                 on=lambda exc: isinstance(exc, RACED_CREATING_TABLES))


def is_sqlite(url: str) -> bool:
    return sqlalchemy.engine.make_url(url).get_backend_name() == "sqlite"


def lock_before_reading(engine: sqlalchemy.engine.Engine) -> None:
    """Every transaction takes SQLite's write lock at its start (BEGIN IMMEDIATE).

    Python's sqlite3 begins a transaction only at the first write, so two workers could both
    read a queued trial (the incumbent, a retry) as WAITING and both run it (optuna#4002):
    Optuna's row lock (SELECT ... FOR UPDATE) is what guards this on PostgreSQL and MySQL.
    """
    @sqlalchemy.event.listens_for(engine, "connect")
    def _driver_leaves_transactions_to_us(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners (creating the tables) are dropped


def check_journal(url: str, path: str) -> None:
    """Every complete line must be JSON. Optuna fails on a bad line only once another follows
    it, mid-search; a last line without its newline is a write in progress, not damage."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.endswith(b"\n"):
                try:
                    json.loads(line)
                except ValueError:
                    raise corrupt_journal(url, f"line {number} is not JSON") from None


def corrupt_journal(url: str, why: str) -> C.ConfigError:
    return C.ConfigError(f"storage {url!r}: the journal file is damaged ({why}); move it away to "
                         "start a new study, or give another --storage")


def fixed_settings(spec: SearchSpec) -> dict:
    """What all trials of one study must share, or their objectives are not comparable."""
    b = spec.base
    return {"data.val_size": b.data.val_size,
            "data.split_seed": b.data.split_seed, "data.train_limit": b.data.train_limit,
            "budget": spec.budget, "objective": OBJECTIVE, "threshold": spec.threshold,
            "hold": b.target.hold, "horizon": spec.horizon}


def space_record(spec: SearchSpec) -> dict[str, list]:
    """The search space as the study stores it (JSON): path -> [distribution, `when` conditions]."""
    return {p.path: [optuna.distributions.distribution_to_json(p.distribution),
                     [[path, list(allowed)] for path, allowed in p.when]] for p in spec.space}


def space_diff(have: dict[str, list], want: dict[str, list]) -> str:
    """What a file with space `want` changes in a study made with `have`, by config path."""
    changes = (("adds", [k for k in want if k not in have]), ("drops", [k for k in have if k not in want]),
               ("changes", [k for k in want if k in have and have[k] != want[k]]))
    return "; ".join(f"{word} {', '.join(paths)}" for word, paths in changes if paths)


def create_or_load(storage: optuna.storages.BaseStorage, name: str) -> tuple[optuna.Study, bool]:
    """The study, and whether this call created it: the database decides, so among workers
    starting at once exactly one is the creator."""
    try:
        return optuna.create_study(storage=storage, study_name=name, direction="minimize"), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage), False


def open_study(spec: SearchSpec, storage: optuna.storages.BaseStorage,
               name: str) -> tuple[optuna.Study, bool]:
    """Creates or loads the study (and says which); refuses to resume it under different fixed
    settings."""
    study, created = create_or_load(storage, name)
    check_settings(spec, study)
    if created:
        enqueue_base(spec, study)
    return study, created


def enqueue_base(spec: SearchSpec, study: optuna.Study) -> None:
    """The base config (stage 3's recipe) as the first trial: the search starts from the incumbent."""
    if spec.settings.enqueue_base:
        study.enqueue_trial(base_params(spec), user_attrs={N.INCUMBENT: True})


def check_settings(spec: SearchSpec, study: optuna.Study) -> None:
    name = study.study_name
    if study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise C.ConfigError(f"study {name!r} exists and maximizes (an older objective); this search "
                            "minimizes the epoch of the validation hold: use another --study-name")
    settings = fixed_settings(spec)
    same_as_recorded(study, "fixed_settings", settings, lambda have: (
        f"study {name!r} was run with "
        + ", ".join(f"{k}={have.get(k)!r} (now {v!r})" for k, v in settings.items() if have.get(k) != v)
        + ": its trials would not be comparable; use the same values or another --study-name"))
    # Optuna itself refuses only some changes (categorical choices), and only inside a trial.
    space = space_record(spec)
    same_as_recorded(study, "space", space, lambda have: (
        f"study {name!r} was made with another search space: {spec.source} "
        f"{space_diff(have, space)}; use the study's search file or another --study-name"))


def same_as_recorded(study: optuna.Study, key: str, want, refusal) -> None:
    """The study's first run records `want` under `key`; a later one that differs is refused
    with `refusal(recorded)`."""
    have = study.user_attrs.get(key)
    if have is None:
        study.set_user_attr(key, want)
    elif have != want:
        raise C.ConfigError(refusal(have))


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Queues each Ctrl-C'd trial again once, with its params, ahead of new samples."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(N.RETRY_OF) for t in trials}
    queued = []
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get(N.INTERRUPTED) and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={N.RETRY_OF: t.number})
            queued.append(t.number)
    return queued


def sampler_seed(seed: int, n_existing: int, worker: int, salt: int = 0) -> int:
    """Distinct per worker and per resume: equal seeds would sample the same startup trials.

    `salt` tells apart workers on several machines, which share everything else."""
    entropy = [seed, n_existing, worker] + ([salt] if salt else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def redact(url: str) -> str:
    """A storage URL without its password, fit for a tag."""
    if "://" not in url or "@" not in url:
        return url
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
