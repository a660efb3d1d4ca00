"""Preprocessing and the training items: :class:`PortraitDataset` (docs/data.md "Items")."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import SpfbenchError
from .records import PREPROCESS_VERSION, PortraitRecord
from .scan import decode_image, fingerprint_of, read_all, resolve_validate, scan_source

# ---------------------------------------------------------------------------------------------- preprocessing


def to_rgb(img):
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def preprocess(image, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """A PIL image -> float32 tensor (3, R, R) in [-1, 1].

    center_crop=True: resize so the shorter side is R (bicubic, antialiased; the longer side becomes
    ``int(R * long / short)``, as torchvision's ``Resize(R)``), then crop the centre R x R (offsets
    ``round((size - R) / 2)``, as ``CenterCrop``). center_crop=False: resize to R x R (aspect not kept).
    Transparent images are composited over white first.
    """
    from PIL import Image

    img = to_rgb(image)
    w, h = img.size
    R = int(resolution)
    if center_crop:
        if w <= h:
            nw, nh = R, int(R * h / w)
        else:
            nw, nh = int(R * w / h), R
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC)
        top, left = int(round((nh - R) / 2.0)), int(round((nw - R) / 2.0))
        if (nw, nh) != (R, R):
            img = img.crop((left, top, left + R, top + R))
    elif (w, h) != (R, R):
        img = img.resize((R, R), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32)
    return t / 127.5 - 1.0


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether item ``index`` is flipped in ``epoch`` (random_flip): a sha256 bit, independent of order,
    workers and restarts."""
    d = hashlib.sha256(f"spfbench-flip/{seed}/{epoch}/{index}".encode()).digest()
    return bool(d[0] & 1)


# ---------------------------------------------------------------------------------------------- datasets


class ItemsBase(torch.utils.data.Dataset):
    records: list[PortraitRecord]
    random_flip: bool
    seed: int
    epoch: int

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Flips of random_flip depend on (seed, epoch, index); call before each epoch for fresh flips
        (the DataLoader's workers see it only if they are started after the call)."""
        self.epoch = int(epoch)

    def flipped(self, index: int) -> bool:
        return self.random_flip and flip_decision(self.seed, self.epoch, index)

    def _strings(self, index: int) -> dict:
        r = self.records[index]
        return {
            "caption": r.caption,
            "base_caption": r.base_caption,
            "target_text": r.target_text,
            "index": r.index,
            "extras": json.loads(json.dumps(r.extras)),  # a copy: a caller may not change the records
        }

    def _check_index(self, index) -> int:
        index = int(index)
        if not 0 <= index < len(self.records):
            raise IndexError(f"item {index} out of range (dataset of {len(self.records)})")
        return index


class PortraitDataset(ItemsBase):
    """A validated portrait training set; items are dicts of ``pixel_values`` (3, R, R) float32 in
    [-1, 1], ``caption`` (complete), ``base_caption``, ``target_text``, ``index`` and ``extras``.

    Opening it validates everything except image decoding, which runs when ``validate_images`` is True
    (None: True for sets of up to 50,000 items). Deterministic: the only randomness is random_flip, a
    horizontal flip decided by :func:`flip_decision` (seed, epoch, index).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        *,
        seed: int = 0,
        validate_images: bool | None = None,
        progress: bool = False,
    ):
        if int(resolution) <= 0:
            raise SpfbenchError(f"resolution must be positive, got {resolution}")
        self.path = path
        scan = scan_source(path, decode=False, hashes=False)
        if resolve_validate(validate_images, len(scan.source.records)):
            scan = scan_source(path, decode=True, hashes=True, progress=progress)
        self._scan = scan
        self.source = scan.source
        self.records = scan.source.records
        self.format = scan.source.format
        self.root = scan.source.root
        self.resolution = int(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)
        self.seed = int(seed)
        self.epoch = 0

    @property
    def fingerprint(self) -> str:
        """:func:`dataset_fingerprint` of this set (hashes the images on first use if validation did not)."""
        if self._scan.image_sha256 is None:
            read_all(self._scan, False, False)
        return fingerprint_of(self._scan)

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.records]

    def resolve(self, relative: str) -> Path:
        """A path from an extra column (e.g. an attn_list mask), resolved against the dataset root."""
        return self.root / relative

    def load_image(self, index: int):
        """The item's image as an RGB PIL image, before resizing (EXIF orientation applied)."""
        index = self._check_index(index)
        return to_rgb(decode_image(self.source.read_bytes(index), self.source.image_name(index)))

    def pixels(self, index: int, flip: bool = False) -> torch.Tensor:
        t = preprocess(self.load_image(index), self.resolution, self.center_crop)
        return torch.flip(t, dims=[-1]) if flip else t

    def __getitem__(self, index) -> dict:
        index = self._check_index(index)
        return {"pixel_values": self.pixels(index, self.flipped(index)), **self._strings(index)}

    def preprocess_spec(self) -> dict:
        return {"version": PREPROCESS_VERSION, "resolution": self.resolution, "center_crop": self.center_crop}


def collate(items: list[dict]) -> dict:
    """A batch: tensors stacked, ``index`` as a LongTensor, strings and extras as lists."""
    if not items:
        raise ValueError("collate: empty batch")
    batch = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if isinstance(vals[0], torch.Tensor):
            batch[key] = torch.stack(vals)
        elif key == "index":
            batch[key] = torch.tensor(vals, dtype=torch.long)
        else:
            batch[key] = vals
    return batch


