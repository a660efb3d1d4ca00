"""Environments: the worlds a benchmark runs in, behind one registry (docs/architecture.md).

An environment supplies everything that differs between "the paper's models on a GPU", "tiny random models
for tests" and "Portrait World": its base-model presets and how a pipeline is built from them, the metric
backbones, the default metrics, the TokenCompose masks and SPF's CLIP (through its backbones). Nothing
outside this module (and an environment's own module) compares an environment or preset name; code asks
the registry instead (tests/test_environments.py greps for it).

Built in (``spfbench/standard_environments.py``): ``real`` (the published weights: Realistic Vision V4.0, SD1.5; every metric's published
backbone), ``tiny`` (seeded random 64-px models and small random backbones: tests, CPU smoke runs) and
``full-random`` (SD1.5's architecture and every backbone at its published shapes with seeded random
weights: speed and memory at real size without the weights). Others register through the entry-point group
``spfbench.environments`` (``name = "module:Class"``), as Portrait World does (``spfbench/world/environment.py``).
A new environment is one module plus that one line.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, ClassVar

from .errors import SpfbenchError

if TYPE_CHECKING:  # (no torch at import: the command line starts without it)
    import torch

    from .masks import MaskSource
    from .metrics.base import Backbones
    from .models import ModelInfo, Preset

ENTRY_POINT_GROUP = "spfbench.environments"


class Environment(ABC):
    """What a world supplies. Subclasses set the class attributes and implement the methods; the built-in ones
    (spfbench.standard_environments.StandardEnvironment) give the usual implementations to start from."""

    name: ClassVar[str]
    description: ClassVar[str]
    presets: ClassVar[tuple["Preset", ...]] = ()  # the base-model presets it serves (spfbench.models.Preset)
    # metric backbones: their published architecture and shapes? their published weights?
    full_size_backbones: ClassVar[bool] = True
    published_backbone_weights: ClassVar[bool] = True

    @abstractmethod
    def load_pipeline(self, preset: "Preset", *, model: str | None, vae: str | None, revision: str | None, seed: int,
                      device: torch.device) -> tuple[object, "ModelInfo"]:
        """The preset's ``StableDiffusionPipeline`` (on CPU or ``device``; moved and cast by the caller) and where
        its weights came from."""

    @abstractmethod
    def backbones(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                  weights: dict[str, str] | None = None) -> "Backbones":
        """The metric models of this environment (one shared set per run; ``dtype`` None: float32)."""

    def backbone_overrides(self) -> list:
        """Backbones this environment replaces (``spfbench.metrics.base.BackboneOverride``); none by default."""
        return []

    @abstractmethod
    def default_metrics(self) -> list[str]:
        """The metric ids a run or a scoring computes when none are given."""

    @abstractmethod
    def mask_source(self, *, model: str | None = None, device: str | None = None, seed: int = 0) -> "MaskSource":
        """Where ``spfbench masks`` takes a phrase's mask from (``spfbench.masks.MaskSource``)."""

# the built-in environments, imported by name when the registry first fills (they sit a layer above this module)
BUILT_IN = ("spfbench.standard_environments:Real", "spfbench.standard_environments:Tiny",
            "spfbench.standard_environments:FullRandom")
_REGISTRY: dict[str, Environment] = {}
_PLUGINS_LOADED = False


def register(env: Environment | type[Environment]) -> Environment:
    """Add an environment (an instance or a class); a second one of the same name is refused."""
    inst = env() if isinstance(env, type) else env
    if not isinstance(inst, Environment):
        raise SpfbenchError(f"{env!r} is not a spfbench Environment")
    old = _REGISTRY.get(inst.name)
    if old is not None and type(old) is not type(inst):
        raise SpfbenchError(f"environment {inst.name!r} is registered twice ({type(old).__module__} and {type(inst).__module__})")
    _REGISTRY[inst.name] = inst
    return inst


def load_plugins(force: bool = False) -> None:
    """Register the built-ins and every ``spfbench.environments`` entry point (once; ``force``: again, from scratch)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED and not force:
        return
    _REGISTRY.clear()  # (force: from scratch, e.g. after a package was installed or removed)
    for target in BUILT_IN:
        module, _, attr = target.partition(":")
        register(getattr(importlib.import_module(module), attr))
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin is named, the others still load
            raise SpfbenchError(f"environment plugin {ep.name} ({ep.value}) does not load: {e}") from None
        inst = register(cls)
        if inst.name != ep.name:
            raise SpfbenchError(f"entry point {ep.name} ({ep.value}) registers an environment named {inst.name!r}; use one name")
    _PLUGINS_LOADED = True


def names() -> list[str]:
    load_plugins()
    return list(_REGISTRY)


def get(name: str) -> Environment:
    load_plugins()
    if name not in _REGISTRY:
        raise SpfbenchError(f"unknown environment {name!r}; choose one of: {', '.join(map(repr, _REGISTRY))}"
                            " (a plugin's environment appears once its package is installed)")
    return _REGISTRY[name]


def all_presets() -> dict[str, tuple[Environment, "Preset"]]:
    """Every base-model preset of every environment: name -> (environment, preset)."""
    out = {}
    for env in (get(n) for n in names()):
        for p in env.presets:
            if p.name in out:
                raise SpfbenchError(f"preset {p.name!r} is served by two environments ({out[p.name][0].name}, {env.name})")
            out[p.name] = (env, p)
    return out


def of_preset(preset: str) -> tuple[Environment, "Preset"]:
    """The environment serving a base-model preset, and the preset."""
    found = all_presets()
    if preset not in found:
        raise SpfbenchError(f"unknown preset {preset!r}; choose one of: {', '.join(found)}")
    return found[preset]


def for_text_width(cross_attention_dim: int) -> Environment:
    """The environment a UNet of unknown preset belongs to, by the width of the text it attends to: SD1.x's 768-d
    CLIP text -> ``real``, smaller -> ``tiny`` (SPF's CLIP for a bare ``Models`` object)."""
    return get("real" if cross_attention_dim >= 768 else "tiny")
