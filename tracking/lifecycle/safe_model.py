"""Reads a run's logged model back without running anything from the store: promotion's check.

`mlflow.pytorch.load_model` unpickles the logged file and puts the model's attached code on
sys.path: anyone who can log a run could run code on whoever promotes. Here the network is
rebuilt from the run's logged `model.*` config with our own code, the pickle is read by torch's
weights-only unpickler allowing only the classes that network is made of (a pickle naming
anything else is refused), and its weights must fit the rebuilt network exactly.
"""

from __future__ import annotations

import tempfile

import mlflow
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from torch import nn

from mnist_mlflow import config as C
from mnist_mlflow.models import TinyNet, build_model

WEIGHTS_FILE = "data/model.pth"  # where mlflow.pytorch keeps the pickled model inside a logged model
MADE_BY = ("made_by", "mnist-mlflow")  # tag of the runs and registered models this project made


class Unverifiable(Exception):
    """A candidate whose model cannot be shown to be ours; the message says why."""


def model_config(run: Run) -> C.ModelConfig:
    """The run's logged `model.*` params as a ModelConfig, with no budget (promotion checks it)."""
    params = run.data.params
    keys = [k for k in C.flatten(C.RunConfig()) if k.startswith("model.")]
    if params.get("model.arch") != "tiny":
        raise Unverifiable(f"model.arch param {params.get('model.arch')!r} is not 'tiny' (TinyNet)")
    values = {}
    for key in keys:
        if key in params:  # a key newer than the run keeps its default
            raw = params[key]
            values[key] = None if raw == "None" else yaml.safe_load(raw)
    values["model.max_params"] = None
    try:
        return C.from_dict({}, values).model
    except (C.ConfigError, yaml.YAMLError) as exc:
        raise Unverifiable(f"its model.* params are not a valid config ({exc})") from None


def rebuild(run: Run) -> nn.Module:
    """An untrained TinyNet as the run's config describes it, built by our code."""
    return build_model(model_config(run)).eval()


def load_verified(client: MlflowClient, model_uri: str, net: nn.Module) -> nn.Module:
    """`net` holding the logged model's weights; Unverifiable unless the logged pickle is a
    TinyNet of exactly `net`'s layers, made of nothing but the classes `net` is made of."""
    try:
        location = client.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(f"{location}/{WEIGHTS_FILE}", dst_path=tmp)
            allowed = sorted({type(m) for m in net.modules()}, key=str)
            with torch.serialization.safe_globals(allowed):
                logged = torch.load(path, map_location="cpu", weights_only=True)
    except (MlflowException, OSError) as exc:  # e.g. artifacts deleted
        raise Unverifiable(f"logged model cannot be loaded ({exc})") from None
    except Exception as exc:  # the weights-only unpickler refused it: it names a foreign global
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        why = next((ln.strip() for ln in lines if "Unsupported" in ln), lines[0])
        raise Unverifiable(f"logged model is refused by torch's weights-only loader ({why})") from None
    if type(logged) is not TinyNet:
        raise Unverifiable(f"logged model is a {type(logged).__name__}, not a TinyNet")
    if str(logged) != str(net):  # same layers, kernel sizes and widths, in the same order
        raise Unverifiable("logged model's layers differ from its logged model.* config")
    try:
        net.load_state_dict(logged.state_dict(), strict=True)
    except RuntimeError as exc:
        raise Unverifiable(f"logged weights do not fit its config ({str(exc).splitlines()[0]})") from None
    return net.eval()
