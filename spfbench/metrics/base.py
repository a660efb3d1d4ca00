"""The shape every metric has, in the spirit of torchmetrics' ``Metric``.

* ``update(batch)`` consumes a batch of pairs; ``compute()`` returns the set-level result.
* State is *sufficient statistics* that merge: per-sample metrics keep ``{triple id: value}`` (so a
  resumed or sharded run merges without double counting), set-level metrics keep sums that add.
* ``id`` carries backbone and scale (``clip-t@vit-l-14``), ``column`` is the paper's Table 1 column,
  ``higher_is_better`` gives the arrow.
* Heavy models are *not* metric state: they come from a shared, lazily loading :class:`Backbones`, so
  CLIP-I and CLIP-T use one CLIP, loaded once. ``Backbones.fingerprint(name)`` is the sha256 of the
  tensors a loaded backbone computes with (its weights' identity, whatever file or seed they came from).
* A :class:`PairwiseMetric` splits its value into what it computes from the original alone
  (``original_features(ids, images) -> {id: {name: tensor}}``) and the pairwise rest
  (``score_pairs(batch, features)``), so the originals' side can be cached per test set and reused by
  every method (``spfbench/originals_cache.py``); given no features, it computes them itself.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
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
    # metric id -> triple id -> that metric's features of the original (a PairwiseMetric computes them if absent)
    original_features: dict[str, dict[str, dict[str, torch.Tensor]]] | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class BackboneOverride:
    """An environment's own backbone in place of the registered ones whose names start with ``prefix`` (Portrait
    World's CLIP for every ``clip-*``): ``load(backbones, name, given_path)``; ``weight_name`` is its
    ``--weights`` name."""

    prefix: str
    weight_name: str
    load: Callable[["Backbones", str, str | None], object]


@contextmanager
def seeded(seed: int):
    """Torch's CPU generator set to ``seed`` inside, restored after (random weights that never move
    the caller's random stream and are the same on every build)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class Backbones:
    """Models shared by metrics, loaded on first use, once per (name) for this device and dtype.

    Built for an environment (spfbench.environments; ``Backbones("tiny")`` asks the registry, an environment's
    ``backbones()`` passes its properties): with the published weights (``real``: local path or offline hub
    cache), small random-weight models of the same kind so every path runs on CPU (``tiny``), every backbone at
    its published architecture and shapes with seeded random weights (``full-random``: throughput at real size;
    scores mean nothing), plus any backbone the environment overrides (Portrait World's CLIP). Loaders branch on
    :attr:`full_size` and :attr:`random_weights`, never on a name.
    """

    loaders: ClassVar[dict[str, Callable[["Backbones"], object]]] = {}

    def __init__(
        self,
        environment: str = "real",
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        weights: dict[str, str] | None = None,
        *,
        full_size: bool | None = None,
        random_weights: bool | None = None,
        overrides: list[BackboneOverride] | None = None,
    ):
        if full_size is None or random_weights is None:  # the environment's own backbones
            from ..environments import get

            env = get(environment)
            full_size, random_weights = env.full_size_backbones, not env.published_backbone_weights
            overrides = env.backbone_overrides() if overrides is None else overrides
        self.environment = environment
        self._full_size, self._random_weights = bool(full_size), bool(random_weights)
        self.overrides = list(overrides or [])
        if weights and self._full_size and self._random_weights:
            raise SpfbenchError(f"environment {environment!r} builds every backbone with seeded random weights: --weights"
                                f" ({', '.join(sorted(weights))}) does not apply; use the real environment to load weight files")
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.weights = dict(weights or {})  # weight-file name (as in `spfbench weights`) -> local path
        self._cache: dict[str, object] = {}
        self._fingerprints: dict[str, str] = {}

    @property
    def full_size(self) -> bool:
        """Backbones have their published architecture and tensor shapes (real, full-random); otherwise
        they are small models of the same classes (tiny, and world's LPIPS/FID/ID/Seg-Cons/HPSv2/MPS)."""
        return self._full_size

    @property
    def random_weights(self) -> bool:
        """Backbones carry seeded random weights, not the published ones (every environment but real; an
        overriding backbone such as the world's CLIP aside, a trained file of its own)."""
        return self._random_weights

    def override_for(self, name: str) -> BackboneOverride | None:
        return next((o for o in self.overrides if name.startswith(o.prefix)), None)

    def weight_name(self, name: str) -> str:
        """The ``--weights`` name of backbone ``name`` here: an override's (``clip-world``), else ``name``."""
        o = self.override_for(name)
        return o.weight_name if o is not None else name

    @property
    def init_device(self) -> torch.device:
        """Where full-size random weights are made: the CPU (torch's seeded CPU generator, so the same numbers
        whatever device they move to), or ``meta`` when the backbones live there (shapes only, no memory:
        how the tests check the full-random architectures)."""
        return self.device if self.device.type == "meta" else torch.device("cpu")

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
            o = self.override_for(name)
            self._cache[name] = o.load(self, name, self.weight_path(o.weight_name)) if o is not None else self.loaders[name](self)
        return self._cache[name]

    def fingerprint(self, name: str) -> str:
        """sha256 of what backbone ``name`` computes with, as loaded (after ``--weights``, dtype and device
        casts): an ``nn.Module``'s parameters and buffers (:func:`module_sha256`), or the backbone's own
        ``fingerprint()`` (models that are not one module: CLIP with its preprocessing, the ONNX face models).
        Computed once per backbone."""
        if name not in self._fingerprints:
            model = self.get(name)
            if isinstance(model, torch.nn.Module):
                self._fingerprints[name] = module_sha256(model)
            elif callable(getattr(model, "fingerprint", None)):
                self._fingerprints[name] = model.fingerprint()
            else:
                raise TypeError(f"backbone {name!r} ({type(model).__name__}) is no nn.Module and has no fingerprint()")
        return self._fingerprints[name]


def tensors_sha256(named, prefix: str = "") -> str:
    """sha256 over ``prefix`` and each ``(name, tensor)`` of ``named`` in order: name, dtype, shape, bytes."""
    h = hashlib.sha256(prefix.encode())
    for name, t in named:
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update((flat if flat.dtype == torch.bool else flat.view(torch.uint8)).numpy().tobytes())
    return h.hexdigest()


def module_sha256(module: torch.nn.Module) -> str:
    """sha256 over the class name and every parameter and buffer of ``module``."""
    return tensors_sha256(chain(module.named_parameters(), module.named_buffers()), type(module).__qualname__)


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


class PairwiseMetric(PerSampleMetric):
    """A per-triple value of (original, customized) whose original side depends on the original alone.

    ``original_features(ids, images)`` returns, per triple id, a flat dict of named CPU tensors computed
    from that original only (embeddings, feature maps, masks, reads); ``score_pairs(batch, features)``
    consumes them, in ``batch.ids`` order, with the customized images. The Scorer passes cached features
    in ``batch.original_features[self.id]``; without them the metric computes them itself, so the cached
    and uncached paths run the same code. A cache entry's identity is ``feature_spec()``,
    ``features_version`` and the fingerprints of ``feature_backbones()`` (``spfbench/originals_cache.py``).
    """

    features_version: ClassVar[int] = 1  # bump when what original_features computes changes

    @abstractmethod
    def feature_backbones(self) -> tuple[str, ...]:
        """Names of the :class:`Backbones` that ``original_features`` computes with."""

    def feature_spec(self) -> dict:
        """Settings other than weights that ``original_features`` depends on (JSON-serialisable)."""
        return {}

    @abstractmethod
    def original_features(self, ids: list[str], images: list) -> dict[str, dict[str, torch.Tensor]]:
        """Per triple id: named CPU tensors computed from that original image alone."""

    @abstractmethod
    def score_pairs(self, batch: Batch, features: list[dict[str, torch.Tensor]]) -> list[float | None]:
        """One value per pair, ``features[i]`` being the original features of ``batch.ids[i]``."""

    def score(self, batch: Batch) -> list[float | None]:
        given = dict((batch.original_features or {}).get(self.id) or {})
        missing = [i for i, t in enumerate(batch.ids) if t not in given]
        if missing:
            given.update(self.original_features([batch.ids[i] for i in missing], [batch.originals[i] for i in missing]))
        return self.score_pairs(batch, [given[t] for t in batch.ids])
