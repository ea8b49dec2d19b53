"""The layering rules of the design (docs: ../shared/design.md, "Architecture"), held against the code.

Every ``.py`` under ``src/petah`` is parsed (nothing is imported) and every ``import`` and
``from ... import`` in it is collected: module-level, function-local, under ``TYPE_CHECKING`` and
relative ones alike. Each row of ``RULES`` says: no module under ``importer`` imports anything
under ``forbidden``, except modules under one of ``allowed``. Prefixes are dotted module names
and match whole components (``petah.prune`` matches ``petah.prune.policy``, not
``petah.pruned``). To add a rule, add a row; a row whose prefixes match nothing fails too, so a
renamed package cannot silently switch a rule off.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "petah"

# (importer prefix, forbidden prefix, importers allowed to anyway, why)
RULES = [
    ("petah", "petah.bench", ("petah.bench", "petah.cli"),
     "library code never imports the benchmarks (timing helpers live in petah.export.timing)"),
    ("petah.backbones", "petah.prune", (),
     "model -> build: a pruned backbone is rebuilt by petah.backbones.pruned, without the pruner"),
    ("petah.backbones", "torch_pruning", (),
     "loading a pruned backbone must not need Torch-Pruning"),
]

# the device side: never the training stack, never torch task code (serve reaches petah.runtime only
# lazily, on the full install; fleet.gate imports petah.runtime.golden only for a torch backbone: the
# test_device guard checks in fresh interpreters that neither loads torch when serving)
DEVICE_SIDE = {
    "petah.packages": "the package core is read on devices without torch",
    "petah.plans": "plan descriptions are read with packages, on devices without torch",
    "petah.device": "the device engine runs without torch",
    "petah.imaging": "images are decoded on devices without torch",
    "petah.serve": "the station reaches torch only via the runtime",
    "petah.fleet": "the agent and the gate run on devices without torch",
}
TORCH_SIDE = ("petah.adapters", "petah.backbones", "petah.tasks", "petah.runtime", "petah.train", "petah.export",
              "petah.api", "petah.data", "torch")
RULES += [(importer, forbidden, (), why) for importer, why in DEVICE_SIDE.items() for forbidden in TORCH_SIDE
          if not (importer in ("petah.serve", "petah.fleet") and forbidden == "petah.runtime")]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every module ``source`` may import: for ``from a import b`` both ``a`` and ``a.b`` (``b``
    may be a submodule); relative imports resolved against ``module``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = package[:len(package) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            names.add(base_name)
            names.update(f"{base_name}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


@functools.cache
def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        name = module_name(path)
        graph[name] = imported_names(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")
    return graph


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("importer,forbidden,allowed,why", RULES, ids=[f"{r[0]}-x-{r[1]}" for r in RULES])
def test_layering_rule(importer, forbidden, allowed, why):
    graph = import_graph()
    importers = [m for m in graph if under(m, importer)]
    assert importers, f"no module under {importer}: the rule checks nothing"
    if under(forbidden, PACKAGE):
        assert any(under(m, forbidden) for m in graph), f"no module under {forbidden}: the rule checks nothing"
    broken = []
    for m in importers:
        if any(under(m, a) for a in allowed):
            continue
        hits = {name for name in graph[m] if under(name, forbidden)}
        broken += sorted(f"{m} imports {h}" for h in hits if not any(h != o and under(h, o) for o in hits))
    assert not broken, f"{why}:\n  " + "\n  ".join(broken)


def test_the_collector_sees_local_relative_and_from_imports():
    source = (
        "import os\n"
        "from . import sibling\n"
        "from ..bench.latency import thing\n"
        "def f():\n"
        "    from petah import bench\n"
        "    if True:\n"
        "        import torch_pruning as tp\n"
    )
    names = imported_names(source, "petah.export.int8", is_package=False)
    assert {"os", "petah.export.sibling", "petah.bench.latency", "petah.bench", "torch_pruning"} <= names
    assert "petah.prune.pruner" in imported_names("from .pruner import x", "petah.prune", is_package=True)
    assert not under("petah.pruned", "petah.prune") and under("petah.prune.policy", "petah.prune")
