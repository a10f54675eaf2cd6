"""Optuna storage and the study: opening, resuming safely, re-queuing interrupted trials."""

from __future__ import annotations

import os
import warnings

import numpy as np
import optuna
import sqlalchemy
from optuna.trial import TrialState

from mnist_mlflow import config as C
from tracking.search_space import SearchSpec

HEARTBEAT_S, GRACE_S, MAX_RETRY = 60, 180, 2  # RDB storage: a silent trial is stale after 3 min


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """``journal:<file>`` -> a journal file (safe for several local processes); else SQLAlchemy.

    RDB storage gets heartbeats: a trial whose process died without a word (SIGKILL, power)
    turns FAIL after GRACE_S and is queued again, up to MAX_RETRY times.
    """
    if url.startswith("journal:"):
        path = url[len("journal:"):]
        folder = os.path.dirname(os.path.abspath(path))
        if not path or not os.path.isdir(folder):
            raise C.ConfigError(f"storage {url!r}: the journal file's folder {folder!r} "
                                "does not exist")
        backend = optuna.storages.journal.JournalFileBackend(path)
        return optuna.storages.journal.JournalStorage(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=MAX_RETRY))


def fixed_settings(spec: SearchSpec) -> dict:
    """What all trials of one study must share, or their objectives are not comparable."""
    b = spec.base
    return {"optim.epochs": b.optim.epochs, "data.val_size": b.data.val_size,
            "data.split_seed": b.data.split_seed, "data.train_limit": b.data.train_limit,
            "budget": spec.budget, "objective_last_epochs": spec.settings.objective_last_epochs}


def open_study(spec: SearchSpec, storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    """Creates or loads the study; refuses to resume it under different fixed settings."""
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                load_if_exists=True)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise C.ConfigError(f"study {name!r} exists and minimizes; this search maximizes accuracy")
    want, have = fixed_settings(spec), study.user_attrs.get("fixed_settings")
    if have is None:
        study.set_user_attr("fixed_settings", want)
    elif have != want:
        diff = ", ".join(f"{k}={have.get(k)!r} (now {v!r})"
                         for k, v in want.items() if have.get(k) != v)
        raise C.ConfigError(f"study {name!r} was run with {diff}: its trials would not be "
                            "comparable; use the same values or another --study-name")
    return study


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Queues each Ctrl-C'd trial again once, with its params, ahead of new samples."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    queued = []
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            queued.append(t.number)
    return queued


def sampler_seed(seed: int, n_existing: int, worker: int) -> int:
    """Distinct per worker and per resume: equal seeds would sample the same startup trials."""
    return int(np.random.SeedSequence([seed, n_existing, worker]).generate_state(1)[0])


def redact(url: str) -> str:
    """A storage URL without its password, fit for a tag."""
    if "://" not in url or "@" not in url:
        return url
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
