"""The built-in environments (``real``, ``tiny``, ``full-random``) and the usual implementations an environment
starts from (:class:`StandardEnvironment`). The registry and the interface: spfbench/environments.py."""

from __future__ import annotations

import torch

from .environments import Environment
from .errors import SpfbenchError


class StandardEnvironment(Environment):
    """Pipelines from a preset's hub id / local files or its random-weight configs; backbones by the class's two
    flags; Table 1's eight metrics; CLIPSeg masks (a small random one where the backbones are small)."""

    def load_pipeline(self, preset, *, model, vae, revision, seed, device):
        """Random weights from the preset's config folder, else the published (or ``model``) weights."""
        from . import models

        if preset.config is not None:
            if model or vae:
                raise SpfbenchError(f"preset {preset.name!r} has random weights; --model/--vae apply to real presets only")
            return models.random_pipeline(preset, seed, device)
        return models.real_pipeline(preset, model, vae, revision)

    def backbones(self, device=None, dtype=None, weights=None):
        from .metrics.base import Backbones

        return Backbones(self.name, device, dtype or torch.float32, weights=weights, full_size=self.full_size_backbones,
                         random_weights=not self.published_backbone_weights, overrides=self.backbone_overrides())

    def default_metrics(self):
        """Table 1's eight."""
        from .metrics import DEFAULT_METRICS

        return list(DEFAULT_METRICS)

    def mask_source(self, *, model=None, device=None, seed=0):
        """CLIPSeg (the published weights, or ``model``); a small random one where the backbones are small."""
        from .masks import SegmenterMasks, load_segmenter

        return SegmenterMasks(lambda: load_segmenter(model=model, device=device, seed=seed, full_size=self.full_size_backbones))


class Real(StandardEnvironment):
    name = "real"
    description = "the published weights: base models from the hub cache or local files, every metric's published backbone"

    @property
    def presets(self):
        from .models import REAL_PRESETS

        return REAL_PRESETS


class Tiny(StandardEnvironment):
    name = "tiny"
    description = "seeded random 64-px SD-shaped models and small random metric backbones (tests, CPU smoke runs; numbers meaningless)"
    full_size_backbones = False
    published_backbone_weights = False

    @property
    def presets(self):
        from .models import TINY_PRESETS

        return TINY_PRESETS


class FullRandom(StandardEnvironment):
    name = "full-random"
    description = ("SD1.5's architecture and every metric backbone at its published shapes, seeded random weights "
                   "(throughput and memory at real size without the weights; numbers meaningless)")
    published_backbone_weights = False

    @property
    def presets(self):
        from .models import FULL_RANDOM_PRESETS

        return FULL_RANDOM_PRESETS
