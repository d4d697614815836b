"""The package's import picture, read from the source (every import, also those inside functions): no circle,
no arrow up a floor, sibling rooms of the top floors independent, the vLLM plugin on its narrow base.

Floors from the ground up (``../shared/ARCHITECTURE.md``); a module may import its own floor or below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "swiftkv"

FLOORS = [
    {"config", "sampling_params", "outputs", "platforms", "fileio", "memory", "data"},
    {"kernels"},
    {"layers"},
    {"models"},
    {"transform", "builtin", "sized", "cli_args"},
    {"engine"},
    {"llm", ""},  # "": the package's __init__ (the LLM facade)
    {"server", "distill", "eval", "bench", "vllm"},  # rooms: none imports another
    {"*/cli"},  # each room's subcommands
    {"cli"},
]
ROOMS = FLOORS[7]
# what the vLLM plugin may import of swiftkv (besides itself): no engine, no model, no kernel binding
PLUGIN_BASE = {"swiftkv.config", "swiftkv.models.arch", "swiftkv.models.hf_config"}


def module_graph(package: Path) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, dotted names; ``from pkg import sub`` counts as
    importing ``pkg.sub`` where that is a module, else ``pkg``."""
    root = package.name
    files = {}
    for f in package.rglob("*.py"):
        parts = list(f.relative_to(package.parent).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, f in files.items():
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == root}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if base.split(".")[0] == root:
                    targets |= {resolve(f"{base}.{a.name}") if f"{base}.{a.name}" in files else resolve(base)
                                for a in node.names}
        graph[mod] = {t for t in targets if t and t != mod}
    return graph


def floor_of(module: str) -> int:
    parts = module.split(".")[1:]  # without the package name
    if len(parts) >= 2 and parts[0] in ROOMS and parts[-1] == "cli":
        return FLOORS.index({"*/cli"})
    top = parts[0] if parts else ""
    for i, floor in enumerate(FLOORS):
        if top in floor:
            return i
    raise AssertionError(f"{module} is on no floor: add {top!r} to FLOORS (and to the map)")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def violations(graph: dict[str, set[str]]) -> list[str]:
    bad = [f"circle: {' <-> '.join(c)}" for c in cycles(graph)]
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            a, b = floor_of(mod), floor_of(t)
            if b > a:
                bad.append(f"{mod} (floor {a}) imports {t} (floor {b}): an arrow up")
            room_a, room_b = mod.split(".")[1:2], t.split(".")[1:2]
            if a == b == 7 and room_a != room_b:
                bad.append(f"{mod} imports {t}: sibling rooms stay independent (share a module below both)")
    return bad


def test_the_package_has_no_circle_and_no_arrow_up():
    graph = module_graph(PACKAGE)
    assert len(graph) > 50 and graph["swiftkv.cli"]  # the whole package was read
    assert violations(graph) == []


def test_the_vllm_plugin_imports_only_its_narrow_base():
    graph = module_graph(PACKAGE)
    plugin = {m for m in graph if m == "swiftkv.vllm" or m.startswith("swiftkv.vllm.")}
    used = {t for m in plugin for t in graph[m]} - plugin
    assert used <= PLUGIN_BASE, f"the plugin imports {sorted(used - PLUGIN_BASE)}"
    assert not [m for m in graph if m not in plugin and graph[m] & plugin], "nothing in swiftkv imports the plugin"


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        f = root / "swiftkv" / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root / "swiftkv"


@pytest.mark.parametrize("files, expected", [
    ({"config.py": "def f():\n    from swiftkv.llm import LLM\n", "llm.py": "from swiftkv import config\n"},
     ["circle: swiftkv.config <-> swiftkv.llm", "swiftkv.config (floor 0) imports swiftkv.llm (floor 6): an arrow up"]),
    ({"eval/__init__.py": "", "eval/runner.py": "from ..distill.data import x\n",
      "distill/__init__.py": "", "distill/data.py": "x = 1\n"},
     ["swiftkv.eval.runner imports swiftkv.distill.data: sibling rooms stay independent (share a module below both)"]),
    ({"cli.py": "import swiftkv.distill.cli\n", "distill/__init__.py": "", "distill/cli.py": "import swiftkv.config\n",
      "config.py": ""}, []),
])
def test_the_checker_finds_circles_arrows_up_and_siblings(tmp_path, files, expected):
    """The check above can fail: it finds what it looks for in a package made to have it (relative imports and
    imports inside functions included), and passes one without."""
    assert violations(module_graph(_write(tmp_path, files))) == expected
