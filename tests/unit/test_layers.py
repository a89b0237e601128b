"""The import graph of the layers: config -> algo -> learner/rollout -> trainer -> cli; the operator reads only
config/api/algo (and the CRD and control types built on them); the synthetic world stands beside the product.

Every import statement of every module (function-level ones included) is read from the source, so a lazy import
that points the wrong way fails here as well. A new top-level module of `gprl` must be given a layer below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A module may import modules of its own layer or lower ones, never higher ones.
LAYERS = {
    "gprl": 0,  # the package's __init__
    "gprl.config": 0, "gprl.api": 0, "gprl.checkpoint": 0, "gprl.distributed": 0, "gprl.metrics": 0,
    "gprl.algo": 1, "gprl.crd": 1, "gprl.prefix": 1, "gprl.buckets": 1, "gprl.overlap": 1,
    "gprl.gpm": 2, "gprl.data": 2, "gprl.sources": 2, "gprl.control": 2, "gprl.observability": 2,
    "gprl.report": 2, "gprl.tracking": 2, "gprl.fetch": 2,
    "gprl.learner": 3, "gprl.rollout": 3, "gprl.serving": 3, "gprl.evaluate": 3,
    "gprl.trainer": 4, "gprl.export": 4,
    "gprl.demo": 5,
    "gprl.cli": 6, "gprl.devcluster": 6,
}
OPERATOR_MAY_IMPORT = {"gprl.config", "gprl.api", "gprl.algo", "gprl.crd", "gprl.control"}
BESIDE = ("gprl_world",)  # packages beside the product: they may use it, it never imports them


def _unit(name: str) -> str:
    """`gprl.rollout.hf` -> `gprl.rollout`; other packages -> their top level."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "gprl" else parts[0]


def imports(pkg_dir: Path, pkg_root: Path) -> list[tuple[str, str, str]]:
    """(importing unit, imported unit, file:line) for every import of a gprl* package under pkg_dir."""
    out = []
    for f in sorted(pkg_dir.rglob("*.py")):
        rel = f.relative_to(pkg_root).with_suffix("")
        module = list(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = module if rel.name == "__init__" else module[:-1]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                # `from gprl import distributed` imports gprl.distributed
                names = [f"{target}.{a.name}" for a in node.names] if target == "gprl" else [target]
            for name in names:
                if name.split(".")[0].startswith("gprl"):
                    out.append((_unit(".".join(module)), _unit(name), f"{f.relative_to(pkg_root)}:{node.lineno}"))
    return out


def test_the_product_never_imports_the_world():
    bad = [w for _, dst, w in imports(ROOT / "gprl", ROOT) if dst.split(".")[0] in BESIDE]
    bad += [w for _, dst, w in imports(ROOT / "operator" / "gprl_operator", ROOT / "operator") if dst in BESIDE]
    assert not bad, f"the product imports a package that stands beside it: {bad}"


def test_product_layers_point_one_way():
    unknown, upward = set(), []
    for src, dst, where in imports(ROOT / "gprl", ROOT):
        if src == dst or dst.split(".")[0] != "gprl":
            continue
        for unit in (src, dst):
            if unit not in LAYERS:
                unknown.add(unit)
        if src in LAYERS and dst in LAYERS and LAYERS[dst] > LAYERS[src]:
            upward.append(f"{where}: {src} (layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]})")
    assert not unknown, f"give these modules a layer in tests/unit/test_layers.py: {sorted(unknown)}"
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_operator_reads_only_config_api_algo():
    bad = [f"{where}: imports {dst}" for _, dst, where in imports(ROOT / "operator" / "gprl_operator", ROOT / "operator")
           if dst.startswith("gprl.") and dst not in OPERATOR_MAY_IMPORT]
    assert not bad, "the operator reaches past config/api/algo:\n" + "\n".join(bad)


@pytest.mark.parametrize("line, src, dst", [
    ("from gprl.trainer import Trainer", "gprl.algo", "gprl.trainer"),
    ("from gprl_world import build_world", "gprl.sources", "gprl_world"),
])
def test_the_check_catches_a_wrong_way_import(tmp_path, line, src, dst):
    """The graph reader sees an offending import (so the tests above can fail)."""
    pkg = tmp_path / "gprl" / src.split(".")[1]
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"def f():\n    {line}\n")
    found = [(s, d) for s, d, _ in imports(tmp_path / "gprl", tmp_path)]
    assert (src, dst) in found and LAYERS.get(dst, 99) > LAYERS[src] or dst in BESIDE
