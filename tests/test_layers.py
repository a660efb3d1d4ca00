"""The layers of docs/architecture.md: no import runs back up, the core never imports a plugin, and no private name
(leading underscore) is imported from another module (issue 25)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import its own layer and the ones below (docs/architecture.md)
LAYERS = [
    ("foundation", ["spfbench.errors", "spfbench.io", "spfbench.captions", "spfbench.clip_tokenizer", "spfbench.timing",
                    "spfbench.trainlog", "spfbench.environments", "spfbench.engine", "spfbench.validate",
                    "spfbench.paper", "spfbench"]),
    ("models and data", ["spfbench.models", "spfbench.data", "spfbench.generation", "spfbench.toydata", "spfbench.painter"]),
    ("metrics, masks, test sets", ["spfbench.metrics", "spfbench.masks", "spfbench.testset"]),
    ("built-in environments", ["spfbench.standard_environments"]),
    ("methods and scoring", ["trainers", "spfbench.originals_cache", "spfbench.scoring"]),
    ("runs and reports", ["spfbench.run", "spfbench.plan", "spfbench.table1", "spfbench.report", "spfbench.curve",
                          "spfbench.viz", "spfbench.tradeoff", "spfbench.weights"]),
    ("command line", ["spfbench.cli", "spfbench.__main__"]),
]
PLUGINS = ["spfbench.world"]  # register through spfbench.environments' entry points; the core imports none of them


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p or (module.startswith(p + ".") and p != "spfbench"):  # (the package itself: its __init__ only)
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    return None if best is None else best[0]


def _imports(path: Path, module: str):
    """(line, imported module, names) of every import outside ``if TYPE_CHECKING:`` blocks, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else [])) if node.level else node.module
            yield node.lineno, target, [a.name for a in node.names]


def _ours(module: str) -> bool:
    return module.split(".")[0] in ("spfbench", "trainers")


def _files():
    for folder in ("spfbench", "trainers"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_every_core_module_has_a_layer():
    missing = [_module(p) for p in _files() if not any(_module(p).startswith(pl) for pl in PLUGINS) and _layer(_module(p)) is None]
    assert not missing, f"add these modules to a layer of docs/architecture.md (and LAYERS here): {missing}"


def test_no_import_runs_up_a_layer_and_the_core_imports_no_plugin():
    bad = []
    for path in _files():
        mod = _module(path)
        if any(mod.startswith(p) for p in PLUGINS):
            continue
        mine = _layer(mod)
        for line, target, names in _imports(path, mod):
            if not _ours(target):
                continue
            for full in [target] + [f"{target}.{n}" for n in names]:
                if any(full == p or full.startswith(p + ".") for p in PLUGINS):
                    bad.append(f"{mod}:{line} imports the plugin {full}")
                    break
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                bad.append(f"{mod}:{line} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for folder in ("spfbench", "trainers", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            mod = _module(path)
            for line, target, names in _imports(path, mod):
                if _ours(target) and target != mod:
                    bad += [f"{path.relative_to(ROOT)}:{line} imports {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not bad, "\n".join(bad)


def test_the_checks_see_what_they_look_for(tmp_path):
    assert _layer("spfbench.metrics.clip") == 2 and _layer("trainers.spf") == 4 and _layer("spfbench.world.render") is None
    f = ROOT / "spfbench" / "x_probe.py"
    code = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .run import Runner\nfrom .data import _Source\nfrom . import world\n"
    f.write_text(code)
    try:
        got = list(_imports(f, "spfbench.x_probe"))
    finally:
        f.unlink()
    assert (4, "spfbench.data", ["_Source"]) in got and (5, "spfbench", ["world"]) in got
    assert not any(t == "spfbench.run" for _, t, _ in got)  # TYPE_CHECKING imports are not arrows
