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
    "lpips@alex-v0.1": "spfbench.metrics.lpips:Lpips",
    "fid@inception-2048": "spfbench.metrics.fid:Fid",
}


def metric_class(metric_id: str) -> type[Metric]:
    if metric_id not in REGISTRY:
        raise SpfbenchError(f"unknown metric {metric_id!r}; known: {', '.join(REGISTRY)}")
    module, name = REGISTRY[metric_id].split(":")
    return getattr(importlib.import_module(module), name)


def create(metric_id: str, backbones: Backbones) -> Metric:
    return metric_class(metric_id)(backbones)


__all__ = ["Backbones", "Batch", "Metric", "PerSampleMetric", "REGISTRY", "create", "metric_class"]


def weight_rows() -> list[dict]:
    """Metric weight files for ``spfbench weights``: source, approximate size, local presence."""
    from huggingface_hub import try_to_load_from_cache

    from .clip import CLIP_MODELS
    from .fid import INCEPTION_URL, inception_path
    from .lpips import ALEXNET_URL, _heads_file, alexnet_path

    rows = []
    for key, (name, repo) in CLIP_MODELS.items():
        hits = [try_to_load_from_cache(repo, f) for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")]
        path = next((h for h in hits if isinstance(h, str)), None)
        rows.append({"group": "metric", "name": f"clip-{key}", "what": f"CLIP {name} OpenAI (CLIP-I, CLIP-T)",
                     "source": f"hf://{repo}", "size": "1.71 GB" if key == "vit-l-14" else "605 MB",
                     "present": path is not None, "path": path})
    for name, what, url, path, size in [
        ("lpips-alexnet", "LPIPS AlexNet trunk (torchvision)", ALEXNET_URL, alexnet_path(), "233 MB"),
        ("lpips-heads-v0.1", "LPIPS linear heads v0.1 (in the lpips wheel)", "pip: lpips==0.1.4", _heads_file(), "6 kB"),
        ("fid-inception", "FID Inception-v3 (torch-fidelity)", INCEPTION_URL, inception_path(), "91 MB"),
    ]:
        rows.append({"group": "metric", "name": name, "what": what, "source": url, "size": size,
                     "present": path.is_file(), "path": str(path)})
    return rows
