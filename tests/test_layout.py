"""The package's one direction of imports, checked on its source (every import counts, those inside
functions too):

    io → sources → preprocessing → cropstore → data → models → evaluation | inference
       → tracking | distributed → apps → the five ``python -m crc_lightning.<app>`` shims

A module may import its own package and any lower layer, never a higher one; ``evaluation`` and
``inference`` (one layer) do not import each other, nor do ``tracking`` and ``distributed``; and
no chain of imports between modules comes back to where it started.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import crc_lightning

PACKAGE = Path(crc_lightning.__file__).parent
LAYERS: dict[str, int] = {
    "crc_lightning": 0,  # __init__: the version only
    "crc_lightning.io": 0,
    "crc_lightning.sources": 1,
    "crc_lightning.preprocessing": 2,
    "crc_lightning.cropstore": 3,
    "crc_lightning.data": 4,
    "crc_lightning.models": 5,
    "crc_lightning.evaluation": 6,
    "crc_lightning.inference": 6,
    "crc_lightning.tracking": 7,
    "crc_lightning.distributed": 7,
    "crc_lightning.apps": 8,
    **{f"crc_lightning.{app}": 9 for app in ("preprocess", "pretrain", "run", "report", "predict")},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def unit(module: str) -> str:
    """The layer unit a module belongs to: its longest prefix in LAYERS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return prefix
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


def imports_of(path: Path) -> set[str]:
    """Every crc_lightning module ``path`` imports, at any depth of its code."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("crc_lightning"))
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: use absolute imports"
            if node.module.startswith("crc_lightning"):
                for alias in node.names:  # `from pkg import module` imports the module
                    sub = f"{node.module}.{alias.name}"
                    exists = (
                        any(
                            (PACKAGE.parent / Path(*sub.split("."))).with_suffix(s).exists()
                            for s in (".py",)
                        )
                        or (PACKAGE.parent / Path(*sub.split(".")) / "__init__.py").exists()
                    )
                    out.add(sub if exists else node.module)
    return out


GRAPH = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_is_in_a_layer() -> None:
    for module in GRAPH:
        unit(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_from_a_higher_layer(module: str) -> None:
    own = unit(module)
    for target in sorted(GRAPH[module]):
        dest = unit(target)
        if dest == own or target == "crc_lightning":
            continue
        assert LAYERS[dest] < LAYERS[own], (
            f"{module} (layer {LAYERS[own]}, {own}) imports {target} (layer {LAYERS[dest]}): "
            "imports go down the layers only"
        )


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if target not in GRAPH:
                continue
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_rule_catches_a_violation(tmp_path) -> None:
    """The checker itself: an upward import and a cycle are found."""
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from crc_lightning.apps.run import run\n")
    assert imports_of(bad) == {"crc_lightning.apps.run"}
    assert LAYERS[unit("crc_lightning.apps.run")] > LAYERS[unit("crc_lightning.io.nifti")]
    saved = dict(GRAPH)
    try:
        GRAPH["crc_lightning.io.nifti"] = {"crc_lightning.io.volume"}
        GRAPH["crc_lightning.io.volume"] = {"crc_lightning.io.nifti"}
        with pytest.raises(AssertionError, match="import cycle"):
            test_no_import_cycle()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
