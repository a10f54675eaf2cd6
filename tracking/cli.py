"""The command-line layer every command shares: flags, typed values, the store, the markdown tables.

MLproject passes every parameter, set or not, so an empty string means "unset" for every flag
here. A flag's text is converted once, by argparse, into its type (`value`); config overrides
from flags are typed values handed to the config as they are, never turned back into text,
so ``--data-dir 2024`` stays the string "2024". Only ``--set key=value`` is text by nature and
read as YAML. A bad flag is a `ConfigError` (one line, exit 2), never argparse's usage dump.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import mlflow

from mnist_mlflow import config as C
from tracking.lifecycle import store

ROOT = Path(__file__).resolve().parent.parent
STAGE3 = ROOT / "experiments" / "stage3.yaml"  # the recipe that search files and recipes extend
DEFAULT_EXPERIMENT = "mnist-mlflow"
UNSET = ("", None)

# flag dest -> (config path, type, help) of the typed shortcuts for the most used overrides
OVERRIDES: dict[str, tuple[str, type, str]] = {
    "epochs": ("optim.epochs", int, "optim.epochs"),
    "seed": ("seed", int, "seed"),
    "train_limit": ("data.train_limit", int, "data.train_limit: train on the first N images"),
    "test_limit": ("data.test_limit", int, "data.test_limit"),
    "data_dir": ("data.data_dir", str, "folder of MNIST IDX files instead of the cached wheel"),
}


class Parser(argparse.ArgumentParser):
    """Raises ConfigError instead of printing usage and exiting: callers report it in one line."""

    def error(self, message: str):
        raise C.ConfigError(re.sub(r"^argument [^:]+: (?=--)", "", message))


def parser(prog: str, doc: str | None) -> Parser:
    return Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def exit_bad_input(exc: C.ConfigError) -> NoReturn:
    """For entry points whose main returns data, not an exit code (the benchmarks): one line, exit 2."""
    print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(2)


def value(name: str, text: Optional[str], kind: type = int, minimum: float | None = None) -> Any:
    """'' -> None; otherwise `text` as `kind` (>= minimum), or a ConfigError naming ``--name``."""
    if text in UNSET:
        return None
    if kind is bool:
        word = text.strip().lower()
        if word not in ("true", "false", "1", "0", "yes", "no"):
            raise C.ConfigError(f"--{name}={text!r} is not allowed: true or false")
        return word in ("true", "1", "yes")
    if kind is str:
        return text
    try:
        number = kind(text)
    except ValueError:
        raise C.ConfigError(f"--{name}={text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if minimum is not None and number < minimum:
        raise C.ConfigError(f"--{name}={text!r} is not allowed: {minimum} or more")
    return number


def typed(name: str, kind: type = int, minimum: float | None = None,
          unset: Any = None) -> Callable[[str], Any]:
    """`value` as an argparse `type`; '' gives `unset`."""

    def convert(text: str) -> Any:
        try:
            parsed = value(name, text, kind, minimum)
        except C.ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return unset if parsed is None else parsed

    return convert


def add(p: argparse.ArgumentParser, flag: str, kind: type = int, minimum: float | None = None,
        unset: Any = None, **kwargs) -> None:
    """A typed flag; absent or '' (MLproject's unset) it is `unset`."""
    p.add_argument(flag, type=typed(flag.lstrip("-"), kind, minimum, unset), default="", **kwargs)


def int_list(name: str, text: str, minimum: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise C.ConfigError(f"--{name}={text!r} is not allowed: comma-separated integers") from None
    if not values or min(values) < minimum:
        raise C.ConfigError(f"--{name}={text!r} is not allowed: integers >= {minimum}")
    return values


def choice_list(name: str, text: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values or not set(values) <= set(choices):
        raise C.ConfigError(f"--{name}={text!r} is not allowed: comma-separated {' and/or '.join(choices)}")
    return values


# ---------------------------------------------------------------- config overrides

def add_overrides(p: argparse.ArgumentParser, *flags: str, helps: dict[str, str] | None = None,
                  set_help: str = "any config override, e.g. --set schedule.name=step (repeatable; "
                                  "one argument may hold several, space-separated)") -> None:
    """The typed shortcuts named in `flags` (keys of OVERRIDES) and ``--set``."""
    for dest in flags:
        path, kind, help_text = OVERRIDES[dest]
        add(p, "--" + dest.replace("_", "-"), kind, help=(helps or {}).get(dest, help_text))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=set_help)


def overrides(args: Any, flags: tuple[str, ...] = tuple(OVERRIDES)) -> dict[str, Any]:
    """Dotted config path -> value: the typed `flags` that are set, then ``--set`` (which wins).

    `args`: parsed arguments, or any object with those attributes (tracking.search's Options).
    """
    out = {OVERRIDES[dest][0]: getattr(args, dest) for dest in flags
           if getattr(args, dest, None) is not None}
    for item in getattr(args, "overrides", []):
        out.update(C.parse_override(o) for o in item.split())
    return out


# ---------------------------------------------------------------- the store and the experiment

def add_experiment(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default="", help=f"MLflow experiment (default {DEFAULT_EXPERIMENT}, "
                                                    "or the one `mlflow run` set)")


def check_server() -> None:
    """An unreachable tracking server fails now, in seconds (tracking/lifecycle/store.py)."""
    store.check_server(mlflow.get_tracking_uri())


def use_experiment(name: str) -> str:
    """Inside `mlflow run` the experiment is already chosen; otherwise ours, or the one named.

    This is also the first contact with the tracking store: an unusable one fails here.
    Returns the experiment's id.
    """
    store.check_store()
    if not name and "MLFLOW_EXPERIMENT_ID" in os.environ:
        return mlflow.set_experiment(experiment_id=os.environ["MLFLOW_EXPERIMENT_ID"]).experiment_id
    experiment = mlflow.set_experiment(name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                                       or DEFAULT_EXPERIMENT)
    # MLflow 3.17 leaves the experiment inactive when another process created it at the same
    # moment (several workers starting at once): activate it by id.
    return mlflow.set_experiment(experiment_id=experiment.experiment_id).experiment_id


def markdown(table: list[dict], skip: tuple[str, ...] = ("curve",)) -> str:
    """The rows as a markdown table (the first row's keys less `skip`); "" for no rows."""
    # by hand: pandas' DataFrame.to_markdown needs `tabulate`, not a dependency, for these lines
    if not table:
        return ""
    head = [h for h in table[0] if h not in skip]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(r[h]) for h in head) + " |" for r in table]
    return "\n".join(lines)


def cell(v: object) -> str:
    """Empty for no value (None, nan), yes/no for a flag, two decimals for a float."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.2f}" if isinstance(v, float) else str(v)
