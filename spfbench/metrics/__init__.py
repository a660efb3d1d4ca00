"""Table 1 metrics, one module each, behind a registry of metric ids (docs/metrics.md).

Ids carry backbone and scale. Modules are imported on first use.
"""

from __future__ import annotations

import importlib

from ..errors import SpfbenchError
from .base import Backbones, Batch, Metric, PairwiseMetric, PerSampleMetric

REGISTRY = {
    "clip-i@vit-l-14": "spfbench.metrics.clip:ClipI",
    "clip-t@vit-l-14": "spfbench.metrics.clip:ClipT",
    "clip-i@vit-b-32": "spfbench.metrics.clip:ClipIB32",
    "clip-t@vit-b-32": "spfbench.metrics.clip:ClipTB32",
    "lpips@alex-v0.1": "spfbench.metrics.lpips:Lpips",
    "fid@inception-2048": "spfbench.metrics.fid:Fid",
    "id@arcface-buffalo-l": "spfbench.metrics.id:IdSimilarity",
    "seg-cons@sam-vit-h": "spfbench.metrics.segcons:SegCons",
    "seg-cons@sam-vit-b": "spfbench.metrics.segcons:SegConsVitB",
    "hpsv2@v2.1": "spfbench.metrics.hpsv2:HpsV2",
    "mps@overall": "spfbench.metrics.mps:Mps",
}
# Table 1's eight, in the paper's column order: what the built-in environments score by default
DEFAULT_METRICS = [
    "fid@inception-2048",
    "lpips@alex-v0.1",
    "id@arcface-buffalo-l",
    "clip-i@vit-l-14",
    "seg-cons@sam-vit-h",
    "clip-t@vit-l-14",
    "hpsv2@v2.1",
    "mps@overall",
]
# an environment plugin adds its own metrics (Portrait World's ground truth) with `register` when it loads


def register(metric_id: str, target: str) -> None:
    """Add a metric id (``"module:Class"``); an environment plugin calls this when it is loaded."""
    if REGISTRY.get(metric_id, target) != target:
        raise SpfbenchError(f"metric {metric_id!r} is registered twice ({REGISTRY[metric_id]} and {target})")
    REGISTRY[metric_id] = target


def is_known(metric_id: str) -> bool:
    if metric_id not in REGISTRY:
        from ..environments import load_plugins

        load_plugins()  # a plugin's metric registers when its environment loads
    return metric_id in REGISTRY


def ids() -> list[str]:
    """Every metric id, the environment plugins' included."""
    from ..environments import load_plugins

    load_plugins()
    return list(REGISTRY)


def metric_class(metric_id: str) -> type[Metric]:
    if not is_known(metric_id):
        raise SpfbenchError(f"unknown metric {metric_id!r}; known: {', '.join(REGISTRY)}")
    module, name = REGISTRY[metric_id].split(":")
    return getattr(importlib.import_module(module), name)


def check_ids(metric_ids: list[str]) -> None:
    """Refuse unknown or repeated metric ids (one line naming them), before any work."""
    unknown = [m for m in metric_ids if not is_known(m)]
    if unknown:
        raise SpfbenchError(f"unknown metric {', '.join(unknown)}; `spfbench metrics` lists them: {', '.join(REGISTRY)}")
    if len(set(metric_ids)) != len(metric_ids):
        raise SpfbenchError("a metric is given twice")


def create(metric_id: str, backbones: Backbones) -> Metric:
    return metric_class(metric_id)(backbones)


__all__ = ["DEFAULT_METRICS", "Backbones", "Batch", "Metric", "PairwiseMetric", "PerSampleMetric", "REGISTRY", "check_ids", "create", "metric_class",
           "ids", "is_known", "register"]


# Modules whose real weight files ``spfbench weights`` lists (each has ``weight_rows() -> list[dict]``).
WEIGHT_MODULES = ["clip", "lpips", "fid", "id", "segcons", "hpsv2", "mps"]


def weight_rows() -> list[dict]:
    """Metric weight files for ``spfbench weights``: source, approximate size, local presence."""
    rows = []
    for name in WEIGHT_MODULES:
        rows.extend(importlib.import_module(f"{__name__}.{name}").weight_rows())
    return rows
