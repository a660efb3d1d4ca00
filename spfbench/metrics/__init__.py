"""Table 1 metrics, one module each, behind a registry of metric ids (docs/metrics.md).

Ids carry backbone and scale. Modules are imported on first use.
"""

from __future__ import annotations

import importlib

from ..errors import SpfbenchError
from .base import Backbones, Batch, Metric, PerSampleMetric

REGISTRY = {
    "clip-i@vit-l-14": "spfbench.metrics.clip:ClipI",
    "clip-t@vit-l-14": "spfbench.metrics.clip:ClipT",
    "clip-i@vit-b-32": "spfbench.metrics.clip:ClipIB32",
    "clip-t@vit-b-32": "spfbench.metrics.clip:ClipTB32",
}


def metric_class(metric_id: str) -> type[Metric]:
    if metric_id not in REGISTRY:
        raise SpfbenchError(f"unknown metric {metric_id!r}; known: {', '.join(REGISTRY)}")
    module, name = REGISTRY[metric_id].split(":")
    return getattr(importlib.import_module(module), name)


def create(metric_id: str, backbones: Backbones) -> Metric:
    return metric_class(metric_id)(backbones)


__all__ = ["Backbones", "Batch", "Metric", "PerSampleMetric", "REGISTRY", "create", "metric_class"]
