"""Run configuration: frozen dataclasses, one YAML loader, dotted overrides.

`experiments/*.yaml` hold only their differences from the defaults below. Overrides
such as ``optim.lr=0.02`` use the same dotted paths that runs log as params and that
the Optuna search uses as parameter names, so a best trial maps straight back here.

Over 300 lines on purpose: each field's default, its comment and its validation rule are read
together, and the loader (extends:, overrides, YAML errors) is what they exist for.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


# By hand rather than pydantic (installed with MLflow): errors name the dotted path and the allowed
# values, as every CLI and MLproject override reports them; pydantic is no direct dependency.
class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train_limit: Optional[int] = None  # first N training images (after the validation carve-out)
    test_limit: Optional[int] = None
    val_size: int = 0  # images carved from the 60,000 training images for selection
    split_seed: int = 0  # fixes which images form the validation split
    data_dir: Optional[str] = None  # folder of standard MNIST IDX files, instead of the cached wheel


WIDTHS = ("width1", "width2", "width_transition", "width3", "width4", "width5", "width6")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: Literal["tiny", "barebone"] = "tiny"
    width1: int = 9  # channels of the full-resolution block (and, unless set, of the 1x1 transition)
    width2: int = 16  # channels of the convolution that is pooled (and, unless set, of the later ones)
    width_transition: Optional[int] = None  # the 1x1 after the pooling; null: width1
    width3: Optional[int] = None  # the three 3x3 convolutions after the transition; null: width2
    width4: Optional[int] = None
    width5: Optional[int] = None  # also what the head's 1x1 reads, unless width6 is set
    width6: Optional[int] = None  # a fourth 3x3 convolution (6x6 -> 4x4, RF 22); null: none
    dropout: float = 0.05
    dropout_mask: Literal["bernoulli", "sparse"] = "bernoulli"  # see layers.DROPOUTS
    channels_last_conv: bool = False  # see layers.ChannelsLastConv2d
    pool_before_bn: bool = False  # block 2: conv -> maxpool -> BN -> ReLU -> dropout (models.conv_bn)
    max_params: Optional[int] = 8000  # hard budget, checked when the model is built


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    rotation_degrees: float = 0.0  # uniform in [-d, +d]
    thickness_prob: float = 0.0  # chance of a 3x3 dilation or erosion (half each)
    translate_px: float = 0.0  # shift uniform in [-t, +t] pixels, each axis


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"  # adamw: weight decay decoupled from the gradient
    lr: float = 0.01  # base lr; OneCycle's peak is schedule.max_lr
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only: Nesterov momentum (needs momentum > 0)
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 15
    ema_decay: Optional[float] = None  # evaluate (and keep) an exponential moving average of the weights
    label_smoothing: float = 0.0  # training targets: 1 - s on the label plus s / 10 on every class


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["none", "onecycle", "step", "cosine"] = "onecycle"
    max_lr: float = 0.01  # onecycle peak
    pct_start: float = 0.2  # onecycle warm-up share
    div_factor: float = 25.0  # onecycle: starts at max_lr / div_factor
    final_div_factor: float = 1e4  # onecycle: ends at the start lr / final_div_factor
    anneal: Literal["cos", "linear"] = "cos"  # onecycle: shape of both phases
    step_size: int = 5  # step: epochs between decays
    gamma: float = 0.1  # step: decay factor
    min_lr: float = 0.0  # cosine floor


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    accuracy: float = 99.4  # percent
    hold: int = 4  # consecutive epochs


@dataclasses.dataclass(frozen=True)
class RunConfig:
    stage: str = "stage3"
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda
    threads: Union[int, Literal["auto"]] = "auto"  # torch CPU threads; auto: see mnist_mlflow.threads
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast of training forward passes
    study_data: bool = False  # stage 1: log the data study (statistics, figures, RF study)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    target: TargetConfig = TargetConfig()

    def __post_init__(self) -> None:
        validate(self)


# Values that configs once accepted, kept reproducible by a git tag rather than in the library
RETIRED_TAG, RETIRED_COMMIT = "retired-variants", "2e95a01"
RETIRED = {("model.arch", "lean"): "LeanNet", ("model.dropout_mask", "words16"): "WordMaskDropout",
           ("model.dropout_mask", "channel"): "the channel mask, nn.Dropout2d"}


# ---------------------------------------------------------------- validation

def require(ok: bool, path: str, value: Any, allowed: str) -> None:
    """The one form of a refused value: ``path=value is not allowed: allowed`` (also the search file's)."""
    if not ok:
        raise ConfigError(f"{path}={value!r} is not allowed: {allowed}")


def validate(c: RunConfig) -> None:
    d, m, a, o, s, t = c.data, c.model, c.augment, c.optim, c.schedule, c.target
    require(c.device in ("auto", "cpu", "cuda"), "device", c.device, "auto, cpu or cuda")
    require(c.threads == "auto" or (isinstance(c.threads, int) and c.threads > 0), "threads", c.threads,
            "a positive integer or auto")
    # numpy's legacy seeding takes 32 bits; torch.manual_seed overflows past 64
    require(0 <= c.seed < 2**32, "seed", c.seed, f"an integer from 0 to {2**32 - 1}")
    require(0 <= d.split_seed < 2**32, "data.split_seed", d.split_seed, f"an integer from 0 to {2**32 - 1}")
    for name in ("train_limit", "test_limit"):
        v = getattr(d, name)
        require(v is None or v > 0, f"data.{name}", v, "a positive integer or null")
    require(0 <= d.val_size < 60000, "data.val_size", d.val_size, "0 <= val_size < 60000")
    for name in WIDTHS:
        v = getattr(m, name)
        require(v is None or v > 0, f"model.{name}", v, "a positive integer" +
                ("" if name in ("width1", "width2") else " or null"))
    require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "0 <= dropout < 1")
    require(m.max_params is None or m.max_params > 0, "model.max_params", m.max_params,
            "a positive integer or null")
    require(0.0 <= a.rotation_degrees <= 180.0, "augment.rotation_degrees", a.rotation_degrees,
            "0 <= degrees <= 180")
    require(0.0 <= a.thickness_prob <= 1.0, "augment.thickness_prob", a.thickness_prob,
            "a probability in [0, 1]")
    require(0.0 <= a.translate_px <= 14.0, "augment.translate_px", a.translate_px, "0 <= translate_px <= 14")
    require(o.lr > 0, "optim.lr", o.lr, "lr > 0")
    require(0.0 <= o.momentum < 1.0, "optim.momentum", o.momentum, "0 <= momentum < 1")
    require(not o.nesterov or (o.name == "sgd" and o.momentum > 0), "optim.nesterov", o.nesterov,
            "true only with optim.name=sgd and optim.momentum > 0")
    require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "weight_decay >= 0")
    require(o.batch_size > 0, "optim.batch_size", o.batch_size, "batch_size > 0")
    require(o.epochs > 0, "optim.epochs", o.epochs, "epochs > 0")
    require(0.0 <= o.label_smoothing < 1.0, "optim.label_smoothing", o.label_smoothing,
            "0 <= label_smoothing < 1")
    require(o.ema_decay is None or 0.0 < o.ema_decay < 1.0, "optim.ema_decay", o.ema_decay,
            "null or 0 < ema_decay < 1")
    require(s.max_lr > 0, "schedule.max_lr", s.max_lr, "max_lr > 0")
    require(0.0 < s.pct_start < 1.0, "schedule.pct_start", s.pct_start, "0 < pct_start < 1")
    require(s.div_factor >= 1.0, "schedule.div_factor", s.div_factor, "div_factor >= 1")
    require(s.final_div_factor >= 1.0, "schedule.final_div_factor", s.final_div_factor,
            "final_div_factor >= 1")
    require(s.step_size > 0, "schedule.step_size", s.step_size, "step_size > 0")
    require(0.0 < s.gamma <= 1.0, "schedule.gamma", s.gamma, "0 < gamma <= 1")
    require(0.0 <= s.min_lr, "schedule.min_lr", s.min_lr, "min_lr >= 0")
    require(0.0 < t.accuracy <= 100.0, "target.accuracy", t.accuracy, "0 < accuracy <= 100")
    require(t.hold > 0, "target.hold", t.hold, "hold > 0")


# ---------------------------------------------------------------- building from dicts

def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """Checks `value` against a field annotation; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        allowed = []
        for option in (a for a in args if a is not type(None)):  # the first that accepts it
            try:
                return _coerce(path, value, option)
            except ConfigError as exc:
                allowed.append(str(exc).split("is not allowed: ", 1)[-1])
        require(False, path, value, " or ".join(allowed))
    if origin is Literal:
        choices = typing.get_args(annotation)
        allowed = "one of " + ", ".join(map(str, choices))
        if (path, value) in RETIRED:
            allowed += (f"; {value} ({RETIRED[path, value]}) was retired and is kept in git tag "
                        f"{RETIRED_TAG} (commit {RETIRED_COMMIT})")
        require(value in choices, path, value, allowed)
        return value
    if annotation is bool:
        require(isinstance(value, bool), path, value, "true or false")
        return value
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(ok, path, value, "a number")
        require(math.isfinite(value), path, value, "a finite number")  # .inf/.nan train to NaN
        return float(value)
    if annotation is int:
        require(isinstance(value, int) and not isinstance(value, bool), path, value, "an integer")
        return value
    if annotation is str:
        require(isinstance(value, str), path, value, "a string")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} at {path}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}'; allowed under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, hint)
    return cls(**kwargs)


def _defaults_of(cls: type) -> dict[str, Any]:
    return dataclasses.asdict(cls())


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.02"`` -> ``("optim.lr", 0.02)``; values are read as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: its value is not a YAML scalar "
                          f"({getattr(exc, 'problem', None) or exc})") from None


def _nest(path: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out


def from_dict(values: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then `values` (nested), then dotted `overrides`."""
    merged = _merge(_defaults_of(RunConfig), values or {})
    for path, value in (overrides or {}).items():
        merged = _merge(merged, _nest(path, value))
    return _build(RunConfig, merged)


EXTENDS = "extends"  # an experiment file may derive from another and hold only its differences


def read_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """An experiment file's values, merged over the file it `extends:` (a path relative to it)."""
    path = Path(path)
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"config files extend each other in a cycle: {chain}")
    values = dict(read_yaml(path))
    base = values.pop(EXTENDS, None)
    if base is None:
        return values
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: extends={base!r} is not allowed: the path of another "
                          "experiment file, relative to this one")
    return _merge(read_file(path.parent / base, (*_seen, path.resolve())), values)


def load(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Loads an experiment file and applies overrides (``["optim.lr=0.02", ...]`` or a dict)."""
    values = read_file(path)
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    return from_dict(values, overrides)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key twice in one mapping: PyYAML keeps the last silently, so
    ``optim: {epochs: 3}`` then ``optim: {batch_size: 64}`` would drop the epochs."""

    def construct_mapping(self, node, deep=False):
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}, first on line {first[key] + 1}",
                        key_node.start_mark)
                first[key] = key_node.start_mark.line
            except TypeError:  # unhashable: SafeLoader reports it below
                continue
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """An experiment file's mapping; ConfigError with the file (and line) for anything else."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:  # also the !!python/... tags: safe_load refuses them
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r}{where}: not valid YAML ({reason})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({exc})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of settings, "
                          f"not a {type(values).__name__}")
    return values


def replace(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A copy of `config` with dotted overrides applied (validated like a fresh load)."""
    return from_dict(dataclasses.asdict(config), overrides)


def differences(config: RunConfig, base: RunConfig, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The nested values where `config` differs from `base`: an experiment file that
    `extends:` base's file. Paths starting with an entry of `skip` are left out."""
    mine, theirs = flatten(config), flatten(base)
    out: dict[str, Any] = {}
    for path, value in mine.items():
        if value != theirs[path] and not path.startswith(skip):
            out = _merge(out, _nest(path, value))
    return out


# What a derived experiment file leaves to its parent: run plumbing, the machine, the data slice
# and the target; the rest is the recipe (best_config.yaml and recipe.yaml carry its differences).
NOT_RECIPE = ("stage", "seed", "device", "threads", "study_data", "data.", "target.")
# A null width means "as an earlier one" (models.py): compared by value, equal networks are equal.
WIDTH_DEFAULTS = {"model.width_transition": "model.width1", "model.width3": "model.width2",
                  "model.width4": "model.width2", "model.width5": "model.width2"}


def resolved_widths(config: RunConfig) -> RunConfig:
    flat = flatten(config)
    return replace(config, {p: flat[src] for p, src in WIDTH_DEFAULTS.items() if flat[p] is None})


def derived_yaml(config: RunConfig, parent_path: str | Path | None, header: str = "",
                 stage: Optional[str] = None) -> str:
    """An experiment file to sit next to `parent_path`: ``extends:`` it, then `stage` when given,
    then only the recipe keys (not NOT_RECIPE) where `config` differs; `header` as comments."""
    parent = load(parent_path) if parent_path else RunConfig()
    body = (({EXTENDS: Path(parent_path).name} if parent_path else {}) | ({"stage": stage} if stage else {})
            | differences(resolved_widths(config), resolved_widths(parent), skip=NOT_RECIPE))
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + yaml.safe_dump(body, sort_keys=False)


def flatten(config: RunConfig) -> dict[str, Any]:
    """``{"optim.lr": 0.01, ...}``: what a run logs as params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix.rstrip(".")] = value

    walk("", dataclasses.asdict(config))
    return out
