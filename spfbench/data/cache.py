"""The encoding cache: VAE latents and text embeddings computed once per item (docs/data.md "Encoding cache")."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import SpfbenchError
from ..io import atomic_write_bytes, atomic_write_json, remove_stale_tmp
from .items import ItemsBase, PortraitDataset
from .records import CACHE_FORMAT, CACHE_META, PortraitRecord, canonical_json

# ---------------------------------------------------------------------------------------------- cache


def cache_key(dataset: PortraitDataset, model_key: str) -> str:
    """sha256 of what cached encodings depend on: the data fingerprint, the preprocessing, whether
    flipped copies are stored, and the caller's model_key (model identity, dtype, ...)."""
    spec = {
        "format": CACHE_FORMAT,
        "fingerprint": dataset.fingerprint,
        "preprocess": dataset.preprocess_spec(),
        "flipped": dataset.random_flip,
        "model_key": model_key,
    }
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def _as_tensors(out, name: str, n: int) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        out = {name: out}
    if not isinstance(out, dict) or not all(isinstance(v, torch.Tensor) for v in out.values()):
        raise TypeError(f"the {name} encoder must return a tensor or a dict of tensors, got {type(out).__name__}")
    for k, v in out.items():
        if v.shape[0] != n:
            raise ValueError(f"the {name} encoder returned {k} with batch size {v.shape[0]} for {n} inputs")
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _shard_path(folder: Path, s: int) -> Path:
    return folder / f"shard-{s:05d}.safetensors"


def _shard_ok(path: Path, rows: int, key: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("key") == key and f.get_slice("index").get_shape() == [rows]
    except Exception:  # noqa: BLE001 - an unreadable shard is recomputed
        return False


def cache_encodings(
    dataset: PortraitDataset,
    encode_image: Callable[[torch.Tensor], torch.Tensor | dict],
    encode_text: Callable[[list[str]], torch.Tensor | dict],
    cache_dir: str | os.PathLike,
    *,
    model_key: str,
    batch_size: int = 16,
    shard_size: int = 256,
    progress: bool = True,
    encode_record: Callable[[list[PortraitRecord]], dict] | None = None,
) -> "CachedDataset":
    """Encode every item once and store the results; returns a :class:`CachedDataset` over them.

    ``encode_image(pixel_values (B, 3, R, R) float32 CPU) -> tensor (B, ...)`` (e.g. scaled VAE latents;
    stored as ``latents``) and ``encode_text(list of B complete captions) -> tensor (B, L, D)`` (stored as
    ``encoder_hidden_states``); either may return a dict of tensors instead, stored under its keys.
    Results are stored as returned (dtype included) in ``cache_dir/KEY[:24]/shard-NNNNN.safetensors``
    (``shard_size`` items each, written atomically); KEY is :func:`cache_key`, so a changed dataset,
    preprocessing or ``model_key`` gets a fresh folder. Shards already written are reused, so an
    interrupted run resumes. With random_flip, the flipped images are encoded too (``encode_image``'s
    keys get a ``.flipped`` twin). ``encode_record(list of B records) -> dict of tensors (B, ...)``, when
    given, adds what depends on the item's texts only (e.g. a method's base-caption encoding; not flipped).
    Keys of the three encoders may not clash. Whatever ``encode_record`` computes must be named by
    ``model_key`` too.
    """
    from safetensors.torch import save
    from tqdm.auto import tqdm

    if not isinstance(model_key, str) or not model_key:
        raise SpfbenchError("cache_encodings: model_key must be a non-empty string naming the encoders")
    if batch_size <= 0 or shard_size <= 0:
        raise SpfbenchError("cache_encodings: batch_size and shard_size must be positive")
    key = cache_key(dataset, model_key)
    folder = Path(cache_dir) / key[:24]
    n = len(dataset)
    meta_path = folder / CACHE_META
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            shard_size = int(meta["shard_size"])  # the layout belongs to the cache
            if meta["key"] != key or meta["n"] != n:
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError):
            raise SpfbenchError(f"{meta_path} is not a cache of this dataset and model; delete {folder}") from None
    else:
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "n": n,
            "shard_size": shard_size,
            "fingerprint": dataset.fingerprint,
            "preprocess": dataset.preprocess_spec(),
            "flipped": dataset.random_flip,
            "model_key": model_key,
        }
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpfbenchError(f"cannot create cache folder {folder}: {e.strerror or e}") from None
        atomic_write_json(meta_path, meta)
    remove_stale_tmp(folder)

    n_shards = (n + shard_size - 1) // shard_size
    spans = [(s, s * shard_size, min(n, (s + 1) * shard_size)) for s in range(n_shards)]
    todo = [(s, a, b) for s, a, b in spans if not _shard_ok(_shard_path(folder, s), b - a, key)]
    if todo:
        bar = tqdm(total=n, initial=n - sum(b - a for _, a, b in todo), desc="caching encodings", unit="img", disable=not progress)
        try:
            for s, a, b in todo:
                parts: dict[str, list[torch.Tensor]] = {}
                for c in range(a, b, batch_size):
                    idx = list(range(c, min(b, c + batch_size)))
                    pix = torch.stack([dataset.pixels(i) for i in idx])
                    enc = _as_tensors(encode_image(pix), "latents", len(idx))
                    if dataset.random_flip:
                        flipped = _as_tensors(encode_image(torch.flip(pix, dims=[-1])), "latents", len(idx))
                        enc.update({f"{k}.flipped": v for k, v in flipped.items()})
                    txt = _as_tensors(encode_text([dataset.records[i].caption for i in idx]), "encoder_hidden_states", len(idx))
                    clash = set(enc) & set(txt)
                    if clash:
                        raise ValueError(f"image and text encoders both return {', '.join(sorted(clash))}")
                    if encode_record is not None:
                        rec = _as_tensors(encode_record([dataset.records[i] for i in idx]), "record", len(idx))
                        clash = (set(enc) | set(txt)) & set(rec)
                        if clash:
                            raise ValueError(f"the record encoder returns {', '.join(sorted(clash))}, already returned by another encoder")
                        txt.update(rec)
                    for k, v in {**enc, **txt}.items():
                        parts.setdefault(k, []).append(v)
                    bar.update(len(idx))
                tensors = {k: torch.cat(v) for k, v in parts.items()}
                tensors["index"] = torch.arange(a, b, dtype=torch.long)
                atomic_write_bytes(_shard_path(folder, s), save(tensors, metadata={"key": key, "shard": str(s)}))
        finally:
            bar.close()
    return CachedDataset(folder, dataset)


class CachedDataset(ItemsBase):
    """Items of a finished encoding cache: the cached tensors (``latents``, ``encoder_hidden_states`` or
    the encoders' own keys) plus ``caption``, ``base_caption``, ``target_text``, ``index``, ``extras``.
    Rows are read lazily from memory-mapped safetensors shards; with random_flip the flipped encoding
    is returned when :func:`flip_decision` says so."""

    def __init__(self, folder: str | os.PathLike, dataset: PortraitDataset):
        self.folder = Path(folder)
        meta_path = self.folder / CACHE_META
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            raise SpfbenchError(f"{self.folder} is not an encoding cache ({CACHE_META} missing or unreadable)") from None
        if self.meta.get("fingerprint") != dataset.fingerprint or self.meta.get("n") != len(dataset):
            raise SpfbenchError(f"encoding cache {self.folder} belongs to other data; rebuild it with cache_encodings")
        self.records = dataset.records
        self.random_flip = dataset.random_flip
        self.seed = dataset.seed
        self.epoch = dataset.epoch
        self.resolution = dataset.resolution
        self.format = dataset.format
        self.shard_size = int(self.meta["shard_size"])
        n_shards = (len(self.records) + self.shard_size - 1) // self.shard_size
        for s in range(n_shards):
            rows = min(len(self.records), (s + 1) * self.shard_size) - s * self.shard_size
            if not _shard_ok(_shard_path(self.folder, s), rows, self.meta["key"]):
                raise SpfbenchError(f"encoding cache {self.folder} is incomplete (shard {s}); run cache_encodings again")
        self._handles: dict[int, object] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles stay with their process
        return state

    def _handle(self, s: int):
        from safetensors import safe_open

        h = self._handles.get(s)
        if h is None:
            if len(self._handles) >= 16:
                self._handles.pop(next(iter(self._handles)))
            h = self._handles[s] = safe_open(str(_shard_path(self.folder, s)), framework="pt")
        return h

    def __getitem__(self, index) -> dict:
        index = self._check_index(index)
        s, j = divmod(index, self.shard_size)
        h = self._handle(s)
        flip = self.flipped(index)
        item = {}
        for k in h.keys():
            if k == "index" or k.endswith(".flipped"):
                continue
            src = f"{k}.flipped" if flip and f"{k}.flipped" in h.keys() else k
            item[k] = h.get_slice(src)[j : j + 1][0]
        item.update(self._strings(index))
        return item
