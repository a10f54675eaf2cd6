"""Every third-party module the code imports is a declared, pinned dependency, in both files."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OURS = {"mnist_mlflow", "tracking", "benchmarks"}


def imported_modules() -> set[str]:
    tops = set()
    for package in OURS:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    tops |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    tops.add(node.module.split(".")[0])
    return tops - OURS - set(sys.stdlib_module_names)


def pinned(requirements: list[str]) -> dict[str, str]:
    """{normalised name: version} of `name==version` lines (pip's name normalisation)."""
    pins = {}
    for line in requirements:
        if m := re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip()):
            pins[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    return pins


def test_every_imported_package_is_declared_pinned_in_pyproject_and_conda():
    declared = pinned(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())["dependencies"]
    conda_pins = pinned(next(d["pip"] for d in conda if isinstance(d, dict)))
    assert conda_pins == declared  # mlflow run's environment is the installed one
    owners = md.packages_distributions()
    undeclared = {module: owners.get(module) for module in imported_modules()
                  if not any(re.sub(r"[-_.]+", "-", d).lower() in declared for d in owners.get(module, []))}
    assert undeclared == {}


def test_every_code_folder_is_checked():
    """A new package (or a script beside the packages) would otherwise import undeclared code unseen."""
    tracked = {path.parts[0] for path in map(Path, subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split())}
    assert tracked - {"tests"} == OURS
