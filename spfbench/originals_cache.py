"""The originals' features of a pairwise metric, computed once per test set and reused by every scoring.

A :class:`~spfbench.metrics.base.PairwiseMetric` computes part of its value from the original image alone
(LPIPS' trunk features, ArcFace's face count and embedding, CLIP-I's embedding, Seg-Cons' SAM masks, the
world reader's read). :class:`OriginalsCache` keeps those per original in the test set folder, so every
method and every rerun scored against that test set computes them once (docs/metrics.md, "Originals'
feature cache").

Key: sha256 of the canonical JSON of ``{cache format, test set content_sha256, metric id, its
features_version and feature_spec(), metric preset, device type, {backbone: Backbones.fingerprint}}``
(the fingerprint is the sha256 of the tensors the backbone computes with, as loaded and cast: ``--weights``,
a retrained file, another random seed or ``--dtype bf16`` on a backbone that follows it is another key;
a backbone that always runs in fp32 keeps its key under every ``--dtype``). Layout::

    TESTSET/cache/originals/<metric id>.<preset>.<key[:16]>/key.json             what the key is of
    TESTSET/cache/originals/<metric id>.<preset>.<key[:16]>/<triple id>.safetensors

one safetensors file per original, its metadata holding the full key and the sha256 of its tensors.
Concurrency: every entry is written whole to a temporary file and renamed into place
(:func:`spfbench.io.atomic_write_bytes`; temporary names carry host and pid), so two shards or two
scorings writing the same entry leave one complete file (the last rename wins; both computed it from the
same original with the same weights). Nothing is merged and nothing is locked. An entry that does not load,
has another key or fails its checksum is ignored and recomputed (then overwritten). A test set folder
that cannot be written is read as far as it holds entries and otherwise not cached.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .io import atomic_write_bytes, atomic_write_json, remove_stale_tmp
from .metrics import PairwiseMetric
from .metrics.base import tensors_sha256

CACHE_FORMAT = 1
FOLDER = Path("cache") / "originals"
Features = dict[str, torch.Tensor]


def cache_key(content_sha256: str, metric: PairwiseMetric) -> dict:
    """Everything an entry depends on besides the original image itself (the test set's content hash
    stands for every original)."""
    bb = metric.backbones
    return {
        "cache_format": CACHE_FORMAT,
        "testset_content_sha256": content_sha256,
        "metric": metric.id,
        "features_version": metric.features_version,
        "feature_spec": metric.feature_spec(),
        "preset": bb.environment,
        "device": bb.device.type,
        "weights": {name: bb.fingerprint(name) for name in metric.feature_backbones()},
    }


def features_sha256(features: Features) -> str:
    return tensors_sha256(sorted(features.items()))


class OriginalsCache:
    """Per-original features of one metric on one test set (see the module docstring)."""

    def __init__(self, testset: Path, content_sha256: str, metric: PairwiseMetric, root: Path | None = None):
        self.metric = metric
        self.key = cache_key(content_sha256, metric)
        self.digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()
        # root: the cache folder (default TESTSET/cache; `spfbench plan` calibrates on an empty one)
        base = Path(root) / FOLDER.name if root is not None else Path(testset) / FOLDER
        self.folder = base / f"{metric.id}.{metric.backbones.environment}.{self.digest[:16]}"
        self.writable = True
        self._ready = False  # folder made, stale temporary files removed, key.json written
        self.computed = 0  # originals whose features this instance computed (the others were read)

    def path(self, tid: str) -> Path:
        return self.folder / f"{tid}.safetensors"

    def load(self, tid: str) -> Features | None:
        """The cached features of triple ``tid``; ``None`` when absent, unreadable, or not this key's."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:  # read whole, not memory-mapped: a file truncated under a map would kill the process (SIGBUS)
            data = self.path(tid).read_bytes()
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            meta = header.get("__metadata__") or {}
            features = load(data)
        except (OSError, ValueError, AttributeError, SafetensorError):  # missing, truncated, not safetensors: recompute
            return None
        if meta.get("key") != self.digest or meta.get("sha256") != features_sha256(features):
            return None
        return features

    def store(self, tid: str, features: Features) -> None:
        from safetensors.torch import save

        if not self.writable:
            return
        data = save({k: v.contiguous() for k, v in features.items()}, metadata={"key": self.digest, "sha256": features_sha256(features)})
        try:
            if not self._ready:
                self.folder.mkdir(parents=True, exist_ok=True)
                remove_stale_tmp(self.folder)  # a killed process's leftovers (never a live shard's)
                if not (self.folder / "key.json").is_file():
                    atomic_write_json(self.folder / "key.json", self.key)
                self._ready = True
            atomic_write_bytes(self.path(tid), data)
        except OSError:  # a read-only test set: features are simply not cached
            self.writable = False

    def get(self, ids: list[str], images: list) -> dict[str, Features]:
        """Features of each original (``images[i]`` is triple ``ids[i]``'s): read where cached, the rest
        computed in one ``original_features`` call and stored."""
        found = {tid: self.load(tid) for tid in ids}
        missing = [i for i, tid in enumerate(ids) if found[tid] is None]
        if missing:
            new = self.metric.original_features([ids[i] for i in missing], [images[i] for i in missing])
            for i in missing:
                found[ids[i]] = new[ids[i]]
                self.store(ids[i], new[ids[i]])
            self.computed += len(missing)
        return found
