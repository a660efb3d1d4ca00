"""Customization methods (SPF-Portrait, its ablations and the Table 1 baselines) behind one interface.

``trainers.base`` holds the interface (:class:`~trainers.base.Method`, its config dataclass) and the
pieces methods share; ``trainers.loop`` the one training loop; one module per method. Methods are
found by name in :data:`REGISTRY` and imported on first use.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from spfbench.errors import SpfbenchError

REGISTRY = {
    "naive": "trainers.naive:Naive",
    "magnet": "trainers.magnet:Magnet",
    "lora": "trainers.lora:Lora",
    "adalora": "trainers.adalora:AdaLora",
    "spf": "trainers.spf:Spf",
    "spf-no-text": "trainers.spf:SpfNoText",
    "spf-no-fine": "trainers.spf:SpfNoFine",
    "spf-no-enh": "trainers.spf:SpfNoEnh",
    "spf-no-sfcm": "trainers.spf:SpfNoSfcm",
    "tokencompose": "trainers.tokencompose:TokenCompose",
    "original": "trainers.original:Original",
}


def method_class(name: str):
    if name not in REGISTRY:
        raise SpfbenchError(f"unknown method {name!r}; `spfbench methods` lists them: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create(name: str, config: dict | None = None, source: str = "config"):
    """A method instance with its config built from ``config`` (unknown keys are an error)."""
    cls = method_class(name)
    return cls(cls.Config.from_dict(config or {}, source=source))


def fit(name: str, config: dict, data, out, *, progress: bool = True, source: str = "config", **trainer_kwargs) -> Path:
    """Fit method ``name`` with ``config`` on ``data`` into the run folder ``out``; returns its artifact folder."""
    return method_class(name).fit(dict(config), data, Path(out), progress=progress, source=source, **trainer_kwargs)


def read_config_file(path: str | Path) -> dict:
    """A method config file: JSON object of hyper-parameters (as saved in ``method.json``'s ``config``)."""
    from spfbench.io import read_json_object

    values = read_json_object(path)
    return values.get("config", values) if "method" in values else values


def load_artifact(folder: str | Path, pipe):
    """The trained artifact at ``folder`` applied to ``pipe`` (a freshly loaded base pipeline): a
    :class:`trainers.base.Artifact` whose ``generate(triples, settings)`` gives the customized images and notes."""
    from .base import Artifact, read_artifact_meta

    meta = read_artifact_meta(Path(folder))
    return Artifact.load(Path(folder), pipe, method_class(meta["method"]), meta)


def base_model(pipe, config=None):
    """The base pipeline as an :class:`~trainers.base.Artifact` of no method (the complete caption, each triple's
    seed): what a training curve's step 0 generates."""
    from .base import Artifact, Method, TrainConfig

    return Artifact(Method, config or TrainConfig(), pipe)
