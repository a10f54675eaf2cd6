"""One Optuna trial as one nested MLflow run: sample -> budget check -> train -> objective.

Every trial leaves a child run under the search's parent run, tagged ``trial_state``:

    COMPLETE  run FINISHED, metric `objective` (lower is better: see HoldReporter)
    PRUNED    run KILLED: the pruner stopped it (its per-epoch metrics show where)
    REJECTED  run KILLED, never trained: over the parameter budget (tag `rejected_reason`)
    FAIL      run FAILED, or KILLED when interrupted (tag `error`); FAILED too when its
              worker died (no heartbeat): the worker that notices closes it
    SURPLUS   run KILLED, never trained: a shared search's worker started it after the study
              already had its trials (a rare race between workers; the trial is FAIL)

So FINISHED always means COMPLETE, and KILLED means "stopped on purpose": a pruned trial
raises `Pruned`, a `runs.StopRun`, so `run_training` ends its run KILLED itself and the
objective only tags it. The names are tracking/search/names.py's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NoReturn, Optional

import mlflow
import optuna
from optuna.trial import TrialState

from mnist_mlflow import config as C
from mnist_mlflow.data import Mnist
from mnist_mlflow.evaluation import hold_score, hold_summary
from mnist_mlflow.models import param_count_of, widths_text
from mnist_mlflow.train import EpochMetrics
from tracking.lifecycle import runs
from tracking.search import names as N
from tracking.search.sampling import sample_params
from tracking.search.space import SearchSpec
from tracking.search.trial_runs import TrialRuns


@dataclass
class TrialContext:
    """What all trials of one worker share."""

    spec: SearchSpec
    study_name: str
    parent_run_id: str
    experiment_id: str
    mnist: Mnist
    worker: str = ""  # host:pid, recorded on every trial and its run
    quota: Optional[int] = None  # shared search: finished trials the whole study stops at
    deadline: Optional[float] = None  # --hard-budget: the Unix time at which trials end

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline


class SurplusTrial(Exception):
    """A shared search's worker started a trial past the study's quota (a rare race)."""


class Pruned(optuna.TrialPruned, runs.StopRun):
    """The pruner stopped the trial: PRUNED in Optuna, its run ended KILLED by run_training."""


class RaceCut(runs.StopRun):
    """The search's hard budget ended a racing trial's further seed: that seed's run is KILLED,
    the trial scores the seeds it finished."""


def is_surplus(study: optuna.Study, number: int, quota: int) -> bool:
    """Past the first `quota` trials that have not failed, by number: every worker agrees."""
    alive = sorted(t.number for t in study.get_trials(deepcopy=False, states=(
        TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)))
    return number not in alive[:quota]


def retry_of(trial: optuna.Trial | optuna.trial.FrozenTrial) -> Optional[int]:
    """The trial this one runs again: after Ctrl-C (resume) or after its worker died."""
    return trial.user_attrs.get(N.RETRY_OF)


class HoldReporter:
    """The per-epoch hook inside a trial's training, on validation accuracy only.

    Reports a lower-is-better score per epoch, as the study minimizes, so Optuna's pruners
    compare values in the study's own direction: once held, the final score
    (`mnist_mlflow.evaluation.hold_score`); before, horizon + 1 + how many points this epoch's
    accuracy is short of the threshold (the final score's best 4-epoch window would still
    contain epoch 1 at epoch 4, so early pruning would judge the warm-up). Prunes, and ends
    training once the hold completes, since nothing later can change the score.

    `bar` (the best trial's objective + the race margin, None before there is one) stops a
    trial as soon as even its best possible score is above it: it could not become the best
    (nor be raced), so its remaining epochs would teach nothing. A further seed of a racing
    trial (`primary=False`) neither reports nor stops early.

    `out_of_time` (the search's hard budget) ends a trial that has not held yet: STOPPED, or
    for a further seed `RaceCut`.
    """

    def __init__(self, trial: optuna.Trial, spec: SearchSpec, epochs: int,
                 bar: Callable[[], Optional[float]] = lambda: None, primary: bool = True,
                 out_of_time: Callable[[], bool] = lambda: False):
        self.trial, self.spec, self.epochs, self.bar, self.primary = trial, spec, epochs, bar, primary
        self.out_of_time = out_of_time
        self.val: list[float] = []

    @property
    def value(self) -> float:
        t = self.spec.base.target
        return hold_score(self.val, self.spec.threshold, t.hold, self.spec.horizon)

    @property
    def held(self) -> bool:
        t = self.spec.base.target
        return hold_summary(self.val, self.spec.threshold, t.hold).target_reached_epoch is not None

    @property
    def progress(self) -> float:
        if self.held:
            return self.value
        return self.spec.horizon + 1 + (self.spec.threshold - self.val[-1])

    def lowest_possible(self) -> float:
        """The best score this trial can still reach: its hold completing as soon as the
        epochs left allow, at 100 %; past its last epoch, the never-held scores."""
        hold = self.spec.base.target.hold
        streak = next((i for i, a in enumerate(reversed(self.val)) if a < self.spec.threshold),
                      len(self.val))
        earliest = len(self.val) + max(hold - streak, 1)
        return earliest - 0.99 if earliest <= self.epochs else self.spec.horizon + 1.0

    def __call__(self, m: EpochMetrics) -> bool:
        self.val.append(m.val_accuracy)
        if not self.primary:
            if self.held:
                return True
            if self.out_of_time():
                raise RaceCut(f"the search's time budget ended at epoch {m.epoch}")
            return False
        self.trial.report(self.progress, m.epoch)
        if self.held:
            return True  # stop: the objective is final
        if self.out_of_time():
            reason = f"stopped at epoch {m.epoch}: the search's time budget ended (--hard-budget)"
            self.trial.set_user_attr(N.STOPPED_ATTR, reason)
            raise Pruned(reason)
        bar = self.bar()
        if bar is not None and self.lowest_possible() > bar:
            reason = (f"stopped at epoch {m.epoch}: its best possible score "
                      f"{self.lowest_possible():.2f} is above the best trial's + race margin {bar:.2f}")
            self.trial.set_user_attr(N.STOPPED_ATTR, reason)
            raise Pruned(reason)
        if self.trial.should_prune():
            raise Pruned(f"pruned at epoch {m.epoch}: val_accuracy {m.val_accuracy:.2f}%, "
                         f"score {self.progress:.3f}")
        return False

    def report_rest(self, epochs: int) -> None:
        """A trial that held early reports its final score for the epochs it skipped, so the
        pruner's later steps compare against it too."""
        for step in range(len(self.val) + 1, epochs + 1):
            self.trial.report(self.value, step)


def race_bar(study: optuna.Study, margin: float) -> Optional[float]:
    """The best COMPLETE trial's objective + `margin`; None while there is none."""
    try:
        return study.best_value + margin
    except ValueError:  # no complete (feasible) trial yet
        return None


def _behind(score: float, bar: Optional[float]) -> bool:
    """A first seed that scores above the bar cannot become the best: not worth more seeds
    (nor is one that never held: among those the order matters little)."""
    return bar is not None and score > bar


def _racing(reporters: list[HoldReporter], status: str) -> Optional[str]:
    """A trial that fails while racing has a FINISHED first run: it must not stay FINISHED
    (FINISHED means COMPLETE). Before that, run_training has ended the run itself."""
    return status if len(reporters) > 1 else None


class Objective:
    def __init__(self, ctx: TrialContext):
        self.ctx = ctx
        self.client = mlflow.MlflowClient()
        self.runs = TrialRuns(ctx.parent_run_id, ctx.experiment_id, ctx.study_name,
                              ctx.spec.base.stage, ctx.worker)

    def __call__(self, trial: optuna.Trial) -> float:
        # Where this trial's run lives: a worker that finds it dead closes that run.
        trial.set_user_attr(N.PARENT_ATTR, self.ctx.parent_run_id)
        trial.set_user_attr(N.EXPERIMENT_ATTR, self.ctx.experiment_id)
        trial.set_user_attr(N.WORKER_ATTR, self.ctx.worker)
        if self.ctx.quota is not None and is_surplus(trial.study, trial.number, self.ctx.quota):
            trial.set_user_attr(N.SURPLUS_ATTR, True)
            self._close(trial, N.SURPLUS, "KILLED", {"error": "started after the study had its "
                                                              f"{self.ctx.quota} trials"})
            raise SurplusTrial(f"trial {trial.number}: the study already has its {self.ctx.quota} trials")
        try:
            cfg, count = self._configure(trial)
        except Exception as exc:  # e.g. a sampled combination the config refuses
            self._close(trial, N.FAIL, None, {"error": repr(exc)[:4000]})
            raise
        if count > self.ctx.spec.budget:
            self._reject(trial, cfg, count)
        return self._train(trial, cfg)

    def _configure(self, trial: optuna.Trial) -> tuple[C.RunConfig, int]:
        """Sampled params -> the trial's config and its parameter count, before any training."""
        spec = self.ctx.spec
        cfg = C.replace(spec.base, sample_params(trial, spec.space, spec.base))
        trial.set_user_attr(N.CONFIG, C.flatten(cfg))  # best_config.yaml is rebuilt from this
        count = param_count_of(cfg.model)
        trial.set_user_attr(N.NUM_PARAMS, count)
        # Feasible when <= 0: TPE then ranks over-budget trials by how far over they are.
        trial.set_constraint("params_over_budget", count - spec.budget)
        return cfg, count

    # ---------------------------------------------------------------- outcomes

    def _reject(self, trial: optuna.Trial, cfg: C.RunConfig, count: int) -> NoReturn:
        """Pruned in Optuna (never COMPLETE, so never best), REJECTED in MLflow; no training."""
        reason = (f"{count:,} parameters, over the budget of {self.ctx.spec.budget:,} "
                  f"({widths_text(cfg.model)})")
        trial.set_user_attr(N.REJECTED_ATTR, reason)
        params = {**C.flatten(cfg), "num_params": count}
        run_id = self._stub_run(trial, N.REJECTED, "KILLED", {"rejected_reason": reason}, params)
        trial.set_user_attr(N.RUN_ATTR, run_id)
        raise optuna.TrialPruned(f"rejected: {reason}")

    def _train(self, trial: optuna.Trial, cfg: C.RunConfig) -> float:
        race = self.ctx.spec.settings.race
        out_of_time = self.ctx.past_deadline
        reporter = HoldReporter(trial, self.ctx.spec, cfg.optim.epochs,
                                bar=lambda: race_bar(trial.study, race["margin"]), out_of_time=out_of_time)
        reporters = [reporter]
        try:
            try:
                outcome = self._fit(trial, cfg, reporter, f"trial-{trial.number}",
                                    self._tags(trial, N.RUNNING))
                scores = {str(cfg.seed): reporter.value}  # str: Optuna stores attrs as JSON
                trial.set_user_attr(N.SEED_SCORES, scores)
                if race["seeds"] > 1 and reporter.held and not _behind(
                        reporter.value, race_bar(trial.study, race["margin"])):
                    for seed in range(cfg.seed + 1, cfg.seed + race["seeds"]):
                        if out_of_time():
                            self._cut(trial, outcome.run_id, f"seed {seed} never started: the "
                                                             "search's time budget had ended")
                            break
                        reporters.append(HoldReporter(trial, self.ctx.spec, cfg.optim.epochs, primary=False,
                                                      out_of_time=out_of_time))
                        try:
                            scores[str(seed)] = self._race_seed(trial, C.replace(cfg, {"seed": seed}),
                                                                outcome.run_id, reporters[-1])
                        except RaceCut as exc:  # its run is KILLED already
                            self._cut(trial, outcome.run_id, f"seed {seed}: {exc}", exc.run_id)
                            break
                        trial.set_user_attr(N.SEED_SCORES, scores)
            finally:  # what the trial cost, however it ended: the search's epochs per hour
                trial.set_user_attr(N.EPOCHS_TRAINED, sum(len(r.val) for r in reporters))
        except optuna.TrialPruned as exc:  # its run is KILLED already (Pruned is a StopRun)
            state = N.STOPPED if N.STOPPED_ATTR in trial.user_attrs else N.PRUNED
            self._close(trial, state, None, {"pruned_reason": str(exc)})
            raise
        except KeyboardInterrupt:
            trial.set_user_attr(N.INTERRUPTED, True)  # a resumed search runs it again
            self._close(trial, N.FAIL, _racing(reporters, "KILLED"), {"error": "interrupted"})
            raise
        except Exception as exc:
            self._close(trial, N.FAIL, _racing(reporters, "FAILED"), {"error": repr(exc)[:4000]})
            raise
        value = sum(scores.values()) / len(scores)
        reporter.report_rest(cfg.optim.epochs)
        trial.set_user_attr(N.VAL_HOLD_EPOCH, len(reporter.val) if reporter.held else None)
        self.client.log_metric(outcome.run_id, "objective", value)
        self.client.log_metric(outcome.run_id, "seeds", len(scores))
        if reporter.held:
            self.client.log_metric(outcome.run_id, "val_hold_epoch", len(reporter.val))
        self.client.set_tag(outcome.run_id, N.TRIAL_STATE, N.COMPLETE)
        trial.set_user_attr(N.RUN_ATTR, outcome.run_id)
        return value

    def _cut(self, trial: optuna.Trial, trial_run_id: str, reason: str,
             seed_run_id: Optional[str] = None) -> None:
        """A race the hard budget cut short: the trial scores the seeds it finished."""
        trial.set_user_attr(N.RACE_CUT, reason)
        for run_id in filter(None, (trial_run_id, seed_run_id)):
            self.client.set_tag(run_id, N.RACE_CUT, reason)

    def _fit(self, trial: optuna.Trial, cfg: C.RunConfig, reporter: HoldReporter, name: str,
             tags: dict[str, str]) -> runs.RunOutcome:
        return runs.run_training(
            cfg, mnist=self.ctx.mnist, nested=True, run_name=name, tags=tags, on_epoch_end=reporter,
            log_model_artifact=self.ctx.spec.settings.log_models, progress=False)

    def _race_seed(self, trial: optuna.Trial, cfg: C.RunConfig, trial_run_id: str,
                   reporter: HoldReporter) -> float:
        """One further seed of a promising trial, as a run nested under the trial's run."""
        tags = {N.PARENT_TAG: trial_run_id, N.STUDY_TAG: self.ctx.study_name,
                N.RACE_TRIAL_TAG: str(trial.number), N.ROLE: N.RACE_ROLE, N.WORKER_TAG: self.ctx.worker}
        outcome = self._fit(trial, cfg, reporter, f"trial-{trial.number}-seed-{cfg.seed}", tags)
        self.client.log_metric(outcome.run_id, "objective", reporter.value)
        return reporter.value

    # ---------------------------------------------------------------- MLflow bookkeeping

    def _tags(self, trial: optuna.Trial, state: str) -> dict[str, str]:
        return self.runs.tags(trial.number, state, retry_of(trial))

    def _close(self, trial: optuna.Trial, state: str, status: str | None,
               tags: dict[str, str]) -> None:
        run_id = self.runs.close(trial.number, state, status, tags, retry_of(trial))
        if run_id is not None:
            trial.set_user_attr(N.RUN_ATTR, run_id)

    def _stub_run(self, trial: optuna.Trial, state: str, status: str, tags: dict[str, str],
                  params: dict) -> str:
        return self.runs.stub(trial.number, state, status,
                              {**self._tags(trial, state), **tags}, params)
