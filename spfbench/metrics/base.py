"""The shape every metric has, in the spirit of torchmetrics' ``Metric``.

* ``update(batch)`` consumes a batch of pairs; ``compute()`` returns the set-level result.
* State is *sufficient statistics* that merge: per-sample metrics keep ``{triple id: value}`` (so a
  resumed or sharded run merges without double counting), set-level metrics keep sums that add.
* ``id`` carries backbone and scale (``clip-t@vit-l-14``), ``column`` is the paper's Table 1 column,
  ``higher_is_better`` gives the arrow.
* Heavy models are *not* metric state: they come from a shared, lazily loading :class:`Backbones`, so
  CLIP-I and CLIP-T use one CLIP, loaded once.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..errors import SpfbenchError


@dataclass
class Batch:
    """Pairs to score: the original portrait and the customized image of the same triples (PIL RGB).

    ``target_texts`` are the attributes asked for (CLIP-T); ``prompts`` the complete captions (base text +
    target text) the customized images were generated from (the quality models HPSv2 and MPS).
    """

    ids: list[str]
    originals: list  # PIL images
    customized: list  # PIL images
    target_texts: list[str]
    prompts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)


PRESETS = ("real", "tiny", "world")


class Backbones:
    """Models shared by metrics, loaded on first use, once per (name) for this device and dtype.

    ``preset="real"`` loads the published weights (local path or offline hub cache); ``"tiny"`` builds
    small random-weight models of the same kind so every path runs on CPU in tests.
    """

    loaders: ClassVar[dict[str, Callable[["Backbones"], object]]] = {}

    def __init__(
        self,
        preset: str = "real",
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        weights: dict[str, str] | None = None,
    ):
        if preset not in PRESETS:
            raise SpfbenchError(f"unknown metric preset {preset!r}; use 'real' (published weights), 'tiny' (random, for tests)"
                                " or 'world' (Portrait World: its own CLIP, tiny random models for the rest)")
        self.preset = preset
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.weights = dict(weights or {})  # weight-file name (as in `spfbench weights`) -> local path
        self._cache: dict[str, object] = {}

    @property
    def random_weights(self) -> bool:
        """Backbones without a version of this preset are small random-weight models (tiny, and world's
        LPIPS/FID/ID/Seg-Cons/HPSv2/MPS: no real weights can be loaded where the world runs)."""
        return self.preset in ("tiny", "world")

    def weight_path(self, name: str) -> str | None:
        """The local path the user gave for weight file ``name`` (``--weights NAME=PATH``), if any."""
        return self.weights.get(name)

    @classmethod
    def register(cls, name: str):
        def deco(fn):
            cls.loaders[name] = fn
            return fn

        return deco

    def get(self, name: str):
        if name not in self._cache:
            self._cache[name] = self.loaders[name](self)
        return self._cache[name]


class Metric(ABC):
    id: ClassVar[str]
    column: ClassVar[str]
    higher_is_better: ClassVar[bool]
    per_sample: ClassVar[bool] = True
    has_reference: ClassVar[bool] = False  # keeps statistics of the originals alone (cacheable per test set)
    # an axis of the trade-off plot (spfbench/tradeoff.py): "response" (the target shown) or "preservation"
    # (everything else kept), for metrics exact enough to draw a method's trade-off with (ground truth)
    tradeoff_axis: ClassVar[str | None] = None

    def __init__(self, backbones: Backbones):
        self.backbones = backbones
        self.reset()

    @abstractmethod
    def reset(self) -> None: ...

    @abstractmethod
    def update(self, batch: Batch) -> None: ...

    @abstractmethod
    def state(self) -> dict: ...

    @abstractmethod
    def merge(self, state: dict) -> None:
        """Add another instance's ``state()`` (a shard, or an earlier part of a resumed run)."""

    @abstractmethod
    def compute(self) -> dict: ...

    @abstractmethod
    def record_failure(self, tid: str, reason: str) -> None:
        """Triple ``tid`` could not be given to the metric at all (e.g. no customized image): count it."""


class PerSampleMetric(Metric):
    """A value per triple; the set-level value is the mean over the triples that could be scored.

    A triple that cannot be scored (e.g. no face found) is recorded with ``None`` and a reason and
    counted in ``failures``: never dropped silently.
    """

    def reset(self) -> None:
        self.values: dict[str, float | None] = {}
        self.reasons: dict[str, str] = {}

    @abstractmethod
    def score(self, batch: Batch) -> list[float | None]:
        """One value per pair (``None`` when the pair cannot be scored; see ``self.reasons``)."""

    def update(self, batch: Batch) -> None:
        for tid, v in zip(batch.ids, self.score(batch)):
            self.values[tid] = None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    def record_failure(self, tid: str, reason: str) -> None:
        self.values[tid] = None
        self.reasons[tid] = reason

    def state(self) -> dict:
        return {"values": dict(self.values), "reasons": dict(self.reasons)}

    def merge(self, state: dict) -> None:
        self.values.update(state["values"])
        self.reasons.update(state.get("reasons", {}))

    def compute(self) -> dict:
        ok = [v for v in self.values.values() if v is not None]
        return {
            "id": self.id,
            "column": self.column,
            "higher_is_better": self.higher_is_better,
            "value": sum(ok) / len(ok) if ok else None,
            "n": len(ok),
            "failures": len(self.values) - len(ok),
        }
