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
    # Portrait World's ground truth (docs/world.md), read by the world's attribute reader
    "gt-target@world-reader": "spfbench.metrics.world:GtTarget",
    "gt-preserve@world-reader": "spfbench.metrics.world:GtPreserve",
}


def metric_class(metric_id: str) -> type[Metric]:
    if metric_id not in REGISTRY:
        raise SpfbenchError(f"unknown metric {metric_id!r}; known: {', '.join(REGISTRY)}")
    module, name = REGISTRY[metric_id].split(":")
    return getattr(importlib.import_module(module), name)


def check_ids(metric_ids: list[str]) -> None:
    """Refuse unknown or repeated metric ids (one line naming them), before any work."""
    unknown = [m for m in metric_ids if m not in REGISTRY]
    if unknown:
        raise SpfbenchError(f"unknown metric {', '.join(unknown)}; `spfbench metrics` lists them: {', '.join(REGISTRY)}")
    if len(set(metric_ids)) != len(metric_ids):
        raise SpfbenchError("a metric is given twice")


def create(metric_id: str, backbones: Backbones) -> Metric:
    return metric_class(metric_id)(backbones)


__all__ = ["Backbones", "Batch", "Metric", "PairwiseMetric", "PerSampleMetric", "REGISTRY", "check_ids", "create", "metric_class"]


# Modules whose real weight files ``spfbench weights`` lists (each has ``weight_rows() -> list[dict]``).
WEIGHT_MODULES = ["clip", "lpips", "fid", "id", "segcons", "hpsv2", "mps"]


def weight_rows() -> list[dict]:
    """Metric weight files for ``spfbench weights``: source, approximate size, local presence."""
    rows = []
    for name in WEIGHT_MODULES:
        rows.extend(importlib.import_module(f"{__name__}.{name}").weight_rows())
    return rows
