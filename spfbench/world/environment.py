"""Portrait World as a spfbench environment (registered by the ``spfbench.environments`` entry point ``world``).

What the world supplies to the core (docs/world.md): its base-model preset ``world`` (the shipped 64-px model,
or a folder trained the same way), metric backbones (its own CLIP in place of every ``clip-*`` backbone, small
random models for the rest, and the attribute reader of its two ground-truth metrics), the default metrics
(Table 1's eight plus GT-Target and GT-Preserve) and ground-truth TokenCompose masks. Its commands
(``spfbench world ...``, ``cli.app``) come through the ``spfbench.commands`` entry point, so the command line
starts without loading this module (or torch). The core imports nothing from ``spfbench.world``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MissingWeightsError, SpfbenchError
from ..metrics import register as register_metric
from ..metrics.base import BackboneOverride
from ..models import Preset
from ..standard_environments import StandardEnvironment
from .components import DEFAULT_OUT as MODEL_DIR  # the world's original model (docs/world.md)

METRICS = {  # Portrait World's ground truth, read by the world's attribute reader
    "gt-target@world-reader": "spfbench.world.metrics:GtTarget",
    "gt-preserve@world-reader": "spfbench.world.metrics:GtPreserve",
}
CLIP_WEIGHT_NAME = "clip-world"  # its `--weights` name (the world's one CLIP, whatever the clip-* key)


def _load_clip(bb, name: str, given: str | None):
    from ..metrics.clip import ClipBackbone
    from .clip import load_world_clip

    return ClipBackbone(*load_world_clip(given), bb.device, bb.dtype)


class World(StandardEnvironment):
    name = "world"
    description = "Portrait World: rendered portraits with ground-truth attributes, its own 64-px model, CLIP and reader (CPU)"
    presets = (Preset("world", "Portrait World's original model: 64 px SD-architecture model trained on world renders",
                      native_size=64, guidance_scale=3.0, weights_text="spfbench/world/weights/model"),)
    full_size_backbones = False
    published_backbone_weights = False

    def __init__(self):
        for metric_id, target in METRICS.items():
            register_metric(metric_id, target)

    def load_pipeline(self, preset, *, model, vae, revision, seed, device):
        from ..models import real_pipeline

        if vae:
            raise SpfbenchError("preset 'world' has its own VAE; --vae applies to the hub presets only")
        folder = Path(model) if model else MODEL_DIR
        if not (folder / "model_index.json").is_file():
            raise MissingWeightsError(
                f"missing weights: the Portrait World original model is not at {folder}; train it with"
                f" `spfbench world train-model --out {folder}` (docs/world.md, \"Original model\")"
            )
        return real_pipeline(preset, str(folder), None, None)

    def backbone_overrides(self):
        return [BackboneOverride("clip-", CLIP_WEIGHT_NAME, _load_clip)]

    def default_metrics(self):
        return super().default_metrics() + list(METRICS)

    def mask_source(self, *, model=None, device=None, seed=0):
        from .masks import WorldMasks

        return WorldMasks()
