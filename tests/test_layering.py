"""The package's shape: imports only point down the layers of the loop's data flow, and no module imports
itself back through others. Read from the source with `ast` (nothing is imported), so that an import inside
a function, the usual way to hide a circle, counts as much as one at the top of a module."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from tests.support import REPO

# Source folders installed under another name (pyproject's package-dir).
SOURCE_ROOTS = {"spin_mega": REPO / "spin_mega", "spin_mega.kernels": REPO / "kernels",
                "spin_mega.conversion": REPO / "conversion", "spin_mega.configs": REPO / "configs"}

# Top to bottom. A unit is a package or a module with everything under it.
LAYERS = (
    ("commands", ("spin_mega.__main__", "spin_mega.cli", "spin_mega.commands", "spin_mega.demo")),
    ("loop", ("spin_mega.loop",)),
    ("stages", ("spin_mega.training", "spin_mega.generation", "spin_mega.evaluation", "spin_mega.report",
                "spin_mega.conversion")),
    ("data and models", ("spin_mega.data", "spin_mega.models", "spin_mega.kernels")),
    ("parallel and config", ("spin_mega.parallel", "spin_mega.config", "spin_mega.configs")),
    ("io", ("spin_mega", "spin_mega.io", "spin_mega.errors", "spin_mega.rundir")),
)

# Imports between two units of one layer: none, except these (importing unit, imported unit or module). Stages
# meet in the run directory (spin_mega.rundir), not through each other's modules.
SIDEWAYS = {
    ("spin_mega.__main__", "spin_mega.cli"),  # `python -m spin_mega` is the CLI
    ("spin_mega.cli", "spin_mega.commands"),  # the CLI dispatches to one module per subcommand
    ("spin_mega.commands", "spin_mega.demo"),  # `spin-mega demo`
    ("spin_mega.report", "spin_mega.evaluation.significance"),  # the verdict: the paired test on what evaluation measured
    ("spin_mega.report", "spin_mega.training.loss"),  # the loss the run trained with, and its value at step 1
    ("spin_mega.config", "spin_mega.configs"),  # the shipped presets
    ("spin_mega.config", "spin_mega.parallel"),  # validating a layout is the layout module's rule
    ("spin_mega.parallel", "spin_mega.config"),  # the planner and the launcher read typed config sections
    ("spin_mega.rundir", "spin_mega.io"),  # markers and pointers are written atomically
    ("spin_mega.rundir", "spin_mega.errors"),
    ("spin_mega.io", "spin_mega.errors"),
}


def _module_files() -> dict[str, Path]:
    modules = {}
    for root_name, root in SOURCE_ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([root_name, *parts])
            if root_name == "spin_mega" and parts and f"spin_mega.{parts[0]}" in SOURCE_ROOTS:
                continue
            modules[name] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The spin_mega modules `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]  # `import spin_mega.x.y` names the module spin_mega.x.y
            if target and target != name:
                found.add(target)
    return found


@functools.cache
def import_graph() -> dict[str, set[str]]:
    modules = _module_files()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _unit(module: str) -> tuple[int, str]:
    """(layer index, unit) of a module: the longest unit of the table that contains it."""
    best = None
    for index, (_, units) in enumerate(LAYERS):
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and (best is None or len(unit) > len(best[1])):
                best = (index, unit)
    assert best is not None, f"{module} is in no layer of tests/test_layering.py: add it to LAYERS"
    return best


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in sorted(graph.items()):
        layer, unit = _unit(module)
        for target in sorted(targets):
            target_layer, target_unit = _unit(target)
            if target_unit == unit or target_layer > layer:
                continue
            if target_layer == layer and any(unit == a and (target == b or target.startswith(b + ".")) for a, b in SIDEWAYS):
                continue
            where = "up to" if target_layer < layer else "sideways to"
            wrong.append(f"{module} ({LAYERS[layer][0]}) imports {target}: {where} {LAYERS[target_layer][0]}")
    return wrong


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, circles = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_every_module_is_read_and_imports_are_found():
    graph = import_graph()
    # The reader itself: the modules that must exist and an edge of each import form it resolves.
    assert {"spin_mega.cli", "spin_mega.kernels.logprobs", "spin_mega.conversion.converters", "spin_mega.rundir",
            "spin_mega.loop.driver", "spin_mega.report.markdown"} <= set(graph)
    assert "spin_mega.commands" in graph["spin_mega.cli"]  # from spin_mega.commands import COMMANDS
    assert "spin_mega.kernels._ops" in graph["spin_mega.kernels.logprobs"]  # from spin_mega.kernels import _ops
    assert "spin_mega.models.checkpoint" in graph["spin_mega.conversion.converters"]  # inside a function


def test_no_import_circle():
    circles = import_circles(import_graph())
    assert not circles, "modules that import each other (directly or through others): " + "; ".join(
        " <-> ".join(c) for c in circles)


def test_each_layer_imports_only_the_layers_below_it():
    wrong = layer_violations(import_graph())
    assert not wrong, "imports against the layers (tests/test_layering.py: LAYERS):\n" + "\n".join(wrong)


def test_the_checks_catch_what_they_are_for():
    upward = {"spin_mega.io": {"spin_mega.loop.driver"}, "spin_mega.loop.driver": {"spin_mega.io"}}
    assert layer_violations(upward) == ["spin_mega.io (io) imports spin_mega.loop.driver: up to loop"]
    assert import_circles(upward) == [["spin_mega.io", "spin_mega.loop.driver"]]
    sideways = {"spin_mega.report.health": {"spin_mega.training.health"}, "spin_mega.training.health": set()}
    assert layer_violations(sideways) == [
        "spin_mega.report.health (stages) imports spin_mega.training.health: sideways to stages"]
