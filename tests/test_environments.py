"""Environments behind one registry (spfbench.environments): what each supplies, a third-party one by entry point,
and no environment or preset name decided on anywhere else (issue 25)."""

import ast
from pathlib import Path

import pytest
import torch

from spfbench import environments as E
from spfbench.errors import SpfbenchError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ the grep


def _names() -> set[str]:
    return set(E.names()) | set(E.all_presets())


def _owner(path: Path) -> bool:
    """Modules that define names: the registry, the base-model presets of the built-ins, an environment's own package."""
    rel = path.relative_to(ROOT).as_posix()
    return rel in ("spfbench/environments.py", "spfbench/standard_environments.py", "spfbench/models.py") or rel.startswith("spfbench/world/")


def _decisions_by_name(tree: ast.AST, names: set[str]):
    """Comparisons with a name (==, !=, in, not in a literal tuple/list/set) and dict literals keyed by names."""

    def literal(node) -> str | None:
        if isinstance(node, ast.Constant) and node.value in names:
            return node.value
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return next((e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in names), None)
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                hit = literal(side)
                if hit:
                    yield node.lineno, hit
        elif isinstance(node, ast.Dict) and node.keys:  # a table keyed by names (not e.g. FID's "real"/"fake" sides)
            keys = [k.value if isinstance(k, ast.Constant) else None for k in node.keys]
            if all(k in names for k in keys):
                yield node.lineno, keys[0]


def test_no_environment_or_preset_name_is_decided_on_outside_its_module():
    names = _names()
    assert {"real", "tiny", "full-random", "world", "realistic-vision-v4", "sd15", "sd15-random"} <= names
    found = []
    for folder in ("spfbench", "trainers", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if _owner(path):
                continue
            for line, name in _decisions_by_name(ast.parse(path.read_text(), str(path)), names):
                found.append(f"{path.relative_to(ROOT)}:{line} decides on {name!r}")
    assert not found, "ask spfbench.environments instead:\n" + "\n".join(found)


def test_the_grep_finds_what_it_looks_for():
    code = 'if preset == "tiny": pass\nx = p in ("a", "world")\ny = {"sd15": 1}\nz = "tiny"\n'
    assert [n for _, n in _decisions_by_name(ast.parse(code), _names())] == ["tiny", "world", "sd15"]


# ------------------------------------------------------------------------------------------ what each supplies


def test_each_environment_supplies_presets_backbones_metrics_and_masks():
    from spfbench.masks import SegmenterMasks
    from spfbench.metrics import DEFAULT_METRICS

    assert E.names()[:3] == ["real", "tiny", "full-random"] and "world" in E.names()  # the world comes by entry point
    assert {p: env.name for p, (env, _) in E.all_presets().items()} == {
        "realistic-vision-v4": "real", "sd15": "real", "tiny": "tiny", "sd15-random": "full-random", "world": "world"}
    flags = {n: (E.get(n).backbones("cpu").full_size, E.get(n).backbones("cpu").random_weights) for n in E.names()}
    assert flags == {"real": (True, False), "tiny": (False, True), "full-random": (True, True), "world": (False, True)}
    for n in ("real", "tiny", "full-random"):
        assert E.get(n).default_metrics() == DEFAULT_METRICS
        assert isinstance(E.get(n).mask_source(device="cpu"), SegmenterMasks)
    assert E.get("world").default_metrics() == DEFAULT_METRICS + ["gt-target@world-reader", "gt-preserve@world-reader"]
    assert type(E.get("world").mask_source()).__name__ == "WorldMasks"


def test_the_command_line_starts_without_torch_and_takes_plugin_commands_by_entry_point():
    """`spfbench --help` and every refused option run before any model library loads: the CLI module imports no torch,
    and a plugin's commands (the world's) come from the spfbench.commands entry point, not from its environment."""
    import subprocess
    import sys
    from importlib.metadata import entry_points

    code = "import sys, spfbench.cli; print(sorted(m for m in ('torch', 'diffusers', 'spfbench.world.environment') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout
    eps = {ep.name: ep.value for ep in entry_points(group="spfbench.commands")}
    assert eps == {"world": "spfbench.world.cli:app"}
    from spfbench.cli import app

    assert "world" in {g.name for g in app.registered_groups}


def test_the_world_overrides_every_clip_backbone_with_its_own():
    from spfbench.world.clip import load_world_clip

    bb = E.get("world").backbones("cpu")
    assert bb.weight_name("clip-vit-l-14") == bb.weight_name("clip-vit-b-32") == "clip-world"
    assert E.get("tiny").backbones("cpu").weight_name("clip-vit-l-14") == "clip-vit-l-14"
    ref, _, _ = load_world_clip()
    name, param = next(iter(ref.state_dict().items()))
    assert torch.equal(bb.get("clip-vit-b-32").model.state_dict()[name].float(), param.float())


def test_unknown_names_and_duplicates_are_one_line():
    for call in (lambda: E.get("wrold"), lambda: E.of_preset("sd-15")):
        with pytest.raises(SpfbenchError) as e:
            call()
        assert "\n" not in str(e.value) and "choose one of" in str(e.value)

    from spfbench.standard_environments import StandardEnvironment

    class Again(StandardEnvironment):
        name = "tiny"
        description = "another tiny"

    with pytest.raises(SpfbenchError, match="registered twice"):
        E.register(Again)


# ------------------------------------------------------------------------------------------ a third party

PLUGIN = '''
from spfbench.models import Preset
from spfbench.standard_environments import StandardEnvironment


class Acme(StandardEnvironment):
    name = "acme"
    description = "a third party's environment: the tiny model under its own preset, LPIPS only"
    presets = (Preset("acme-tiny", "tiny architecture, seeded random weights", config="tiny", native_size=64),)
    full_size_backbones = False
    published_backbone_weights = False

    def default_metrics(self):
        return ["lpips@alex-v0.1"]
'''


@pytest.fixture
def acme(tmp_path, monkeypatch):
    """An installed third-party package (a dist-info with one entry point in spfbench.environments) on sys.path."""
    (tmp_path / "acme_env.py").write_text(PLUGIN)
    info = tmp_path / "acme_env-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-env\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[spfbench.environments]\nacme = acme_env:Acme\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    E.load_plugins(force=True)
    yield
    monkeypatch.undo()
    E.load_plugins(force=True)  # the registry without it again
    assert "acme" not in E.names()


@pytest.mark.usefixtures("one_thread")
def test_a_third_party_environment_is_one_module_and_one_entry_point(acme, tmp_path, cli):
    from spfbench.models import load_pipeline
    from spfbench.scoring import default_metrics

    assert "acme" in E.names() and E.of_preset("acme-tiny")[0].name == "acme"
    mine, _ = load_pipeline("acme-tiny", device="cpu")
    tiny, _ = load_pipeline("tiny", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(mine.unet.state_dict().values(), tiny.unet.state_dict().values()))
    assert default_metrics("acme") == ["lpips@alex-v0.1"]
    code, out, err = cli("environments")
    assert code == 0 and "acme: a third party's environment" in out and "presets: acme-tiny" in out

    # end to end: a test set of its preset, then a run whose metrics are the environment's
    code, _, err = cli("build-testset", "--preset", "acme-tiny", "--n", "2", "--steps", "2", "--device", "cpu",
                       "--out", tmp_path / "ts", "--no-progress")
    assert code == 0, err
    from spfbench.toydata import make_toy_data

    make_toy_data(tmp_path / "data", 2, size=64)
    code, _, err = cli("run", "--testset", tmp_path / "ts", "--data", tmp_path / "data", "--out", tmp_path / "run",
                       "--method", "original", "--device", "cpu", "--no-progress")
    assert code == 0, err
    import json

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "acme" in json.dumps(results) and "lpips@alex-v0.1" in json.dumps(results)
    assert "fid@inception-2048" not in json.dumps(results)
