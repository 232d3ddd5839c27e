"""The shape of the code: floors, no import circle, module sizes, imports at the top.

Floors, lowest first: ``common`` (the data types) → ``judges`` (the plug-in API) → ``actors`` →
``orchestrator``. A module imports only from its own floor or below, never in a circle (imports
inside functions included), and imports the project's own modules at the top of the file; an
import inside a function is kept for what is heavy to load (torch, Ray, vLLM, transformers, the
trackers) — directly, or through a project module whose top-level imports load one — so that
``odpo --help`` and ``odpo validate`` stay fast and the driver loads no model code.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from tests.conftest import REPO

FLOORS = {"common": 0, "judges": 1, "actors": 2, "orchestrator": 3}
HEAVY = {"torch", "ray", "vllm", "transformers", "datasets", "safetensors", "peft", "numpy", "matplotlib",
         "tensorboard", "wandb", "mlflow", "trackio", "prometheus_client", "psutil", "tqdm"}
MAX_LINES, EXCEPTIONS = 400, {"orchestrator/config.py": 600}


def modules() -> dict[str, Path]:
    out = {}
    for package in FLOORS:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            out[name] = path
    return out


MODULES = modules()


def _resolve(name: str) -> str | None:
    """The project module an import names (``a.b.c`` may be a module or a name inside ``a.b``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


@cache
def imports(module: str) -> list[tuple[str, bool, int]]:
    """``(imported name, at top level, line)`` for every import in ``module``'s file."""
    tree = ast.parse(MODULES[module].read_text())
    top = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / try blocks at the top count as top level
        if isinstance(node, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(f"{node.module}.{a.name}", id(node) in top, node.lineno) for a in node.names]
    return found


def project_edges(module: str) -> list[tuple[str, bool, int]]:
    return [(target, at_top, line) for name, at_top, line in imports(module)
            if (target := _resolve(name)) and target != module]


@cache
def heavy(module: str) -> bool:
    """Whether importing ``module`` loads a heavy dependency (through its top-level imports)."""
    for name, at_top, _ in imports(module):
        if not at_top:
            continue
        if name.split(".")[0] in HEAVY:
            return True
        target = _resolve(name)
        if target and target != module and heavy(target):
            return True
    return False


def test_no_import_reaches_a_higher_floor():
    bad = [f"{m} -> {t} (line {line})" for m in MODULES for t, _, line in project_edges(m)
           if FLOORS[t.split(".")[0]] > FLOORS[m.split(".")[0]]]
    assert not bad, "imports from a lower floor to a higher one:\n" + "\n".join(bad)


def test_no_import_circle():
    graph = {m: sorted({t for t, _, _ in project_edges(m)} - {m}) for m in MODULES}
    state: dict[str, int] = {}
    path: list[str] = []
    circles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in graph[m]:
            if t.startswith(m + ".") or m.startswith(t + "."):
                continue  # a package and its own modules: __init__ re-exports are not circles
            if state.get(t) == 1:
                circles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_modules_stay_small():
    big = []
    for path in MODULES.values():
        rel = str(path.relative_to(REPO))
        n = len(path.read_text().splitlines())
        if n > EXCEPTIONS.get(rel, MAX_LINES):
            big.append(f"{rel}: {n} lines (limit {EXCEPTIONS.get(rel, MAX_LINES)})")
    assert not big, "\n".join(big)


def test_folders_are_not_flat_rooms():
    crowded = [f"{d.relative_to(REPO)}: {n} modules" for package in FLOORS for d in [REPO / package, *(REPO / package).rglob("*")]
               if d.is_dir() and (n := len(list(d.glob("*.py")))) > 13]
    assert not crowded, crowded


def test_project_modules_are_imported_at_the_top_unless_heavy():
    late = [f"{MODULES[m].relative_to(REPO)}:{line} imports {t} inside a function" for m in MODULES
            for t, at_top, line in project_edges(m) if not at_top and not heavy(t)]
    assert not late, "\n".join(late)


def test_the_plug_in_api_imports_nothing_heavy():
    assert not heavy("common.types") and not heavy("judges.base") and not heavy("judges.loader")
