"""The house rules of src/mixtune (docs/ARCHITECTURE.md): floors with arrows pointing down only, no import
cycle, no file over 600 lines. Every import counts, including the lazy ones inside functions."""

from __future__ import annotations

import ast
import fnmatch
import os

import pytest

SRC = os.path.join(os.path.dirname(__file__), "..", "src")
PKG = "mixtune"

# bottom to top; a module may import from its own floor or below, never from above
FLOORS = [
    ("foundations", ["mixtune", "mixtune.config", "mixtune._yaml", "mixtune.runtime", "mixtune._fs",
                     "mixtune.runlock", "mixtune.distributed",
                     "mixtune.quant", "mixtune.quant.*"]),
    ("data and kernels", ["mixtune.data", "mixtune.data.*", "mixtune.kernels", "mixtune.kernels.*"]),
    ("model", ["mixtune.model", "mixtune.model.*"]),
    ("lora and planning", ["mixtune.lora", "mixtune.lora.*", "mixtune.memory_plan"]),
    ("training loop", ["mixtune.loop", "mixtune.loop.*"]),
    ("verbs", ["mixtune.train", "mixtune.evaluate", "mixtune.generate", "mixtune.merge", "mixtune.inspect_model",
               "mixtune.bench", "mixtune.bench_checks", "mixtune.bench_dist", "mixtune.bench_kernels"]),
    ("cli", ["mixtune.cli", "mixtune.__main__"]),
]


def _modules() -> dict[str, str]:
    mods = {}
    root = os.path.join(SRC, PKG)
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, SRC)[:-3].replace(os.sep, ".")
                mods[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return mods


def _imports(mods: dict[str, str]) -> dict[str, set[str]]:
    """module -> the package modules it imports (the most specific existing module of each import)."""
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.endswith("__init__.py") else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path).read())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and t.startswith(PKG):
                    edges[m].add(t)
                    break
    return edges


def _floor(mod: str) -> int:
    for i, (_, patterns) in enumerate(FLOORS):
        if any(fnmatch.fnmatchcase(mod, p) for p in patterns):
            return i
    raise AssertionError(f"{mod} is on no floor: add it to FLOORS here and to docs/ARCHITECTURE.md")


MODS = _modules()
EDGES = _imports(MODS)


def test_every_module_has_a_floor():
    for m in MODS:
        _floor(m)


def test_no_import_goes_up_a_floor():
    up = _upward(EDGES)
    assert not up, "upward imports:\n" + "\n".join(sorted(up))


def _cycles(edges: dict[str, set[str]]) -> list[str]:
    state, cycles = {}, []

    def visit(u, stack):
        state[u] = 1
        stack.append(u)
        for v in sorted(edges[u]):
            if v == PKG:  # the package root holds only __version__
                continue
            if state.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    return cycles


def _upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({FLOORS[_floor(m)][0]}) imports {t} ({FLOORS[_floor(t)][0]})"
                  for m, ts in edges.items() for t in ts if _floor(t) > _floor(m))


def test_no_import_cycle():
    cycles = _cycles(EDGES)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("mod", sorted(MODS))
def test_no_file_over_600_lines(mod):
    with open(MODS[mod]) as fh:
        n = sum(1 for _ in fh)
    assert n <= 600, f"{MODS[mod]} has {n} lines: split it by concern"


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The rules above can fail: a fake upward edge and a fake same-floor cycle are both caught."""
    fake = {m: set(ts) for m, ts in EDGES.items()}
    fake["mixtune.config"].add("mixtune.train")
    assert any(u.startswith("mixtune.config ") for u in _upward(fake))
    fake = {m: set(ts) for m, ts in EDGES.items()}
    fake["mixtune.model.config"].add("mixtune.model.loading")  # loading imports model.config already
    assert any("mixtune.model.config" in c and "mixtune.model.loading" in c for c in _cycles(fake))
