"""The declared dependencies are what the code imports: nothing declared that nothing imports, nothing imported
that is not declared (pyproject.toml, issue 24)."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# declared but imported by a dependency at run time, not by spfbench: distribution -> who needs it
INDIRECT = {"torch-fidelity": "torchmetrics' FrechetInceptionDistance imports it for its InceptionV3"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _norm(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0])


def _imported_modules(folders) -> set[str]:
    mods = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    mods |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods.add(node.module.split(".")[0])
    return mods


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    """Installed distribution (normalised) -> the imported top-level modules it provides."""
    owners = packages_distributions()
    out: dict[str, set[str]] = {}
    for m in modules:
        for dist in owners.get(m, []):
            out.setdefault(_norm(dist), set()).add(m)
    return out


def test_every_runtime_dependency_is_imported_and_every_import_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_requirement_name(s) for s in project["dependencies"]}
    extras = {_requirement_name(s) for specs in project["optional-dependencies"].values() for s in specs}

    code = _imported_modules(["spfbench", "trainers"]) - set(sys.stdlib_module_names) - {"spfbench", "trainers"}
    by_dist = _distributions(code)
    unimported = sorted(runtime - set(by_dist) - set(INDIRECT))
    assert not unimported, f"declared in dependencies but imported by no module of spfbench/trainers: {unimported}"
    found = {m for mods in by_dist.values() for m in mods}
    unknown = sorted(code - found)
    assert not unknown, f"imported but installed by no distribution: {unknown}"
    undeclared = sorted(d for d in by_dist if d not in runtime | extras)
    assert not undeclared, f"imported by spfbench/trainers but not declared (dependencies or an extra): {undeclared}"

    tests_import = _imported_modules(["tests"]) - set(sys.stdlib_module_names) - {"spfbench", "trainers", "conftest"}
    for dist, mods in _distributions(tests_import).items():
        if dist not in runtime | extras:
            raise AssertionError(f"the tests import {sorted(mods)} of {dist}, declared nowhere (add it to the test extra)")


def test_indirect_dependencies_are_needed_by_who_the_list_says():
    import torchmetrics.image.fid as fid

    assert "torch_fidelity" in Path(fid.__file__).read_text()  # torchmetrics' FID imports torch-fidelity's Inception
