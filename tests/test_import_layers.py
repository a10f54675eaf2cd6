"""tracking/'s layers, read from the source with `ast`: imports go down only, and never in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

TRACKING = Path(__file__).resolve().parents[1] / "tracking"

# Bottom up. A part is a sub-package or a top-level module of tracking/; it may import its own
# layer's other parts (without a cycle) and the layers below it, never a layer above.
LAYERS: list[set[str]] = [
    {"lifecycle"},  # one run from start to end
    {"cli"},  # the flags every command shares
    {"search"},  # the Optuna search
    {"promotion"},  # which run may be promoted, the registry
    {"stage", "consistency", "noise", "report", "tune_report", "tune_time", "confirm", "confirm_report", "search_seeds", "tune",
     "promote", "doctor", "server", "predict"},  # the commands, python -m tracking.NAME, two reports of theirs and tune's clock
]
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def modules() -> dict[Path, str]:
    """Every module of tracking/ -> its dotted name (a package's for its __init__.py)."""
    out = {}
    for path in sorted(TRACKING.rglob("*.py")):
        names = path.relative_to(TRACKING.parent).with_suffix("").parts
        out[path] = ".".join(names[:-1] if names[-1] == "__init__" else names)
    return out


def part_of(module: str) -> str | None:
    """tracking.search.plan -> search; tracking.cli -> cli; tracking itself -> None."""
    names = module.split(".")
    return names[1] if names[0] == "tracking" and len(names) > 1 else None


def imported(path: Path, module: str) -> list[tuple[str, int]]:
    """(dotted name, line) of every module or name `path` imports, functions' imports included."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]  # where `.` is
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            # `from tracking import cli`: the names may be parts themselves
            found += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return found


def edges() -> list[tuple[str, str, str]]:
    """(importing part, imported part, where) for every import between two parts of tracking/."""
    out = []
    for path, module in modules().items():
        src = part_of(module)
        for name, line in imported(path, module):
            dst = part_of(name)
            if src and dst and dst != src:
                out.append((src, dst, f"{path.relative_to(TRACKING.parent)}:{line}"))
    return out


def test_every_part_of_tracking_has_a_layer():
    parts = {part_of(m) for m in modules().values()} - {None}
    assert parts == set(LAYER), "add the new part to LAYERS (and README's Layout)"


def test_every_import_of_tracking_names_a_part_that_exists():
    """An import of a module that moved (tracking.lifecycle.runs is tracking.lifecycle.runs) fails here."""
    unknown = [f"{where}: {dst}" for _, dst, where in edges() if dst not in LAYER]
    assert unknown == []


def test_imports_go_down_only():
    upward = [f"{where}: {src} (layer {LAYER[src]}) imports {dst} (layer {LAYER[dst]})"
              for src, dst, where in edges() if dst in LAYER and LAYER[dst] > LAYER[src]]
    assert upward == []


def test_no_parts_import_each_other_in_a_circle():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in edges():
        graph.setdefault(src, set()).add(dst)

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert sorted(p for p in graph if p in reaches(p)) == []


def test_every_module_says_what_it_is_for():
    silent = [str(path.relative_to(TRACKING.parent)) for path in modules()
              if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()]
    assert silent == []
