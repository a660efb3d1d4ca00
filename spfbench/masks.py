"""Noun-phrase masks for TokenCompose from text: ``spfbench masks --data DIR`` (docs/baselines.md).

TokenCompose grounds each noun phrase of the caption on a binary mask (the ``attn_list`` column:
``[[phrase, mask path | null], ...]``, paths relative to the dataset root). When a training set does not
supply them, this module produces them with a real text-prompted segmenter, CLIPSeg
(``CLIPSegForImageSegmentation`` from transformers, hub id :data:`HUB_ID`), and writes them beside the
data so that training reads them exactly like supplied masks:

* phrases of a sample (:func:`sample_phrases`): the comma-separated phrases of ``base_caption``
  (:func:`trainers.spf_losses.split_base_phrases`) followed by ``target_text``; for our caption shape
  these are the noun phrases of the complete caption ``join_caption(base, target)``;
* mask k of an image ``DIR/<file_name>`` is ``DIR/masks/<file_name without extension>/<k>.png``: an
  8-bit grey PNG of the image's size, 255 inside and 0 outside;
* mask = ``bilinear_upsample(sigmoid(logits), image size) > threshold`` (logits: CLIPSeg's 352 x 352
  output for the real model; bilinear with ``align_corners=False``, :func:`upsample_masks`);
* all phrases of an image go through CLIPSeg in one call (the image repeated once per phrase);
* ``metadata.jsonl`` is rewritten atomically with ``attn_list`` added (or replaced) on every row, every
  other column kept as it was; a sample whose mask files all exist is not segmented again, and a rerun
  with nothing to do leaves every file untouched.

Only imagefolder sets (``DIR/metadata.jsonl``) are handled; an HF datasets folder or WebDataset shards
is refused with a message saying to convert it to an imagefolder.

Where a phrase's mask comes from is the environment's (spfbench.environments: ``mask_source()``): CLIPSeg
(``real``, ``full-random``), a small random CLIPSeg (``tiny``), or, in Portrait World, the exact ground-truth
regions the renderer drew (spfbench/world/masks.py; a phrase without a region gets ``null`` in ``attn_list``).
"""

from __future__ import annotations

import io as _io
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MissingWeightsError, SpfbenchError

HUB_ID = "CIDAS/clipseg-rd64-refined"
MASKS_DIR = "masks"
DEFAULT_THRESHOLD = 0.5
TINY_IMAGE_SIZE = 64  # the tiny CLIPSeg's input side (patch 16 -> 4 x 4 tokens)
_IMAGENET_MEAN = [0.485, 0.456, 0.406]  # CIDAS/clipseg-rd64-refined preprocessor_config.json
_IMAGENET_STD = [0.229, 0.224, 0.225]


# ---------------------------------------------------------------------------------------------- segmenter


@dataclass
class Segmenter:
    """A CLIPSeg model and its processor on one device."""

    model: torch.nn.Module
    processor: object
    device: torch.device

    @torch.inference_mode()
    def probabilities(self, image, phrases: list[str]) -> torch.Tensor:
        """(P, h, w) sigmoid of CLIPSeg's logits for the P phrases on one PIL image (one forward)."""
        inputs = self.processor(text=list(phrases), images=[image] * len(phrases), padding=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        logits = self.model(**inputs).logits
        if logits.ndim == 2:  # CLIPSeg squeezes a batch of one
            logits = logits[None]
        return torch.sigmoid(logits.float()).cpu()


def upsample_masks(probs: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """(P, h, w) probabilities -> (P, H, W) bool: bilinear (align_corners=False) to size = (H, W), then > threshold."""
    up = F.interpolate(probs[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return up > threshold


def tiny_segmenter(seed: int = 0, device: str | torch.device = "cpu") -> Segmenter:
    """A small random-weight CLIPSeg of the real class (seeded), with the project's offline CLIP tokenizer
    and a ViTImageProcessor configured like CIDAS's (bilinear resize, ImageNet mean/std) at 64 px."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    from .clip_tokenizer import clip_tokenizer

    config = CLIPSegConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"image_size": TINY_IMAGE_SIZE, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 3, "num_attention_heads": 2},
        projection_dim=32, extract_layers=(1, 2), reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPSegForImageSegmentation(config)
    image_processor = ViTImageProcessor(
        do_resize=True, size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, resample=2,
        do_rescale=True, do_normalize=True, image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD,
    )
    processor = CLIPSegProcessor(image_processor=image_processor, tokenizer=clip_tokenizer())
    dev = torch.device(device)
    return Segmenter(model.to(dev).eval(), processor, dev)


def _missing(where: str) -> str:
    return (f"missing weights: CLIPSeg {where} not found locally (hub id {HUB_ID}, ~600 MB); get it with "
            f"`huggingface-cli download {HUB_ID}` on a machine with network (then copy the HF cache), or pass "
            f"--model DIR holding a save_pretrained() copy of model and processor")


def load_segmenter(model: str | None = None, device: str | None = None, seed: int = 0, *, full_size: bool = True) -> Segmenter:
    """CLIPSeg ``model`` (a local folder or hub id, default :data:`HUB_ID`) from disk / the HF cache only; with
    ``full_size=False`` the small random :func:`tiny_segmenter` (tests)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not full_size:
        return tiny_segmenter(seed, dev)
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    src = model or HUB_ID
    if model and not Path(model).exists() and ("/" not in model or model.startswith((".", "/"))):
        raise MissingWeightsError(_missing(repr(model)))
    try:
        proc = CLIPSegProcessor.from_pretrained(src, local_files_only=True)
        net = CLIPSegForImageSegmentation.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError) as e:
        if model and Path(model).exists():
            raise SpfbenchError(f"cannot load CLIPSeg from {model}: {str(e).splitlines()[0]}") from None
        raise MissingWeightsError(_missing(repr(src))) from None
    return Segmenter(net.to(dev).eval(), proc, dev)


# ---------------------------------------------------------------------------------------------- dataset


def sample_phrases(base_caption: str, target_text: str) -> list[str]:
    """The noun phrases of ``join_caption(base, target)`` for our caption shape: the comma-separated
    phrases of the base caption, then the target text."""
    from .captions import split_base_phrases

    return [*split_base_phrases(base_caption), target_text.strip()]


def mask_relpath(file_name: str, k: int) -> str:
    """``masks/<file_name without extension>/<k>.png`` (POSIX, relative to the dataset root)."""
    stem = Path(os.path.normpath(file_name)).with_suffix("").as_posix()
    return f"{MASKS_DIR}/{stem}/{k}.png"


# ---------------------------------------------------------------------------------------------- mask sources


class MaskSource(ABC):
    """Where the masks of an image's phrases come from (an environment supplies one: ``mask_source()``)."""

    def regions(self, row: dict, where: str, phrases: list[str]) -> list[object | None]:
        """Per phrase, what its mask is drawn from, or None: the phrase has no region (``null`` in
        ``attn_list``, no file). Called for every row before any mask is made (so a bad row fails first)."""
        return [()] * len(phrases)

    @abstractmethod
    def masks(self, image, row: dict, index: int, where: str, phrases: list[str], regions: list, threshold: float) -> list[np.ndarray | None]:
        """The (H, W) bool mask of each phrase with a region (None where ``regions`` is None)."""


class SegmenterMasks(MaskSource):
    """A text-prompted segmenter (CLIPSeg): ``upsample(sigmoid(logits)) > threshold`` per phrase, all phrases of an
    image in one call. ``load`` builds the segmenter on first use (no model loads when nothing is to be done)."""

    def __init__(self, load: Callable[[], Segmenter]):
        self._load, self._segmenter = load, None

    def masks(self, image, row, index, where, phrases, regions, threshold):
        if self._segmenter is None:
            self._segmenter = self._load()
        probs = self._segmenter.probabilities(image, phrases)
        return [m.numpy() for m in upsample_masks(probs, (image.height, image.width), threshold)]


@dataclass
class MasksResult:
    samples: int
    segmented: int  # samples segmented in this call (the others already had every mask)
    masks: int  # mask files in the set (phrases with a null mask not counted)
    metadata_rewritten: bool


def generate_masks(
    data: str | os.PathLike,
    preset: str = "real",
    *,
    threshold: float = DEFAULT_THRESHOLD,
    model: str | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    segmenter: Segmenter | None = None,
) -> MasksResult:
    """Write a mask per phrase of every sample of the imagefolder ``data`` and add ``attn_list`` to its
    ``metadata.jsonl`` (see the module docstring). Resumable; a rerun with nothing to do writes nothing.
    ``preset``: the environment whose mask source draws them (spfbench.environments; ``world``: the ground-truth
    regions of a Portrait World set, phrases without a region null); ``segmenter``: this segmenter instead."""
    from PIL import Image
    from tqdm.auto import tqdm

    from .data import METADATA, ImageFolder, detect_format
    from .environments import get
    from .io import atomic_write_bytes, atomic_write_text

    source = SegmenterMasks(lambda: segmenter) if segmenter is not None else \
        get(preset).mask_source(model=model, device=device, seed=seed)
    if not 0.0 <= threshold < 1.0:
        raise SpfbenchError(f"--threshold must be in [0, 1), got {threshold}")
    fmt = detect_format(data)
    if fmt != "imagefolder":
        raise SpfbenchError(
            f"spfbench masks writes masks beside an imagefolder (DIR/{METADATA}); {os.fspath(data)} is "
            f"{ {'hf': 'an HF datasets folder', 'hub': 'a datasets name'}.get(fmt, 'WebDataset')}: convert it to an imagefolder first"
        )
    root = Path(data)
    src = ImageFolder(root)  # validates every row (captions, image files, extras)
    meta = root / METADATA
    text = meta.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert len(rows) == len(src.records)

    plans = []  # per sample: phrases, mask path or None (no region) per phrase, the source's region per phrase
    for row, rec in zip(rows, src.records):
        phrases = sample_phrases(rec.base_caption, rec.target_text)
        regions = source.regions(row, rec.where, phrases)
        rels = [mask_relpath(row["file_name"], k) if r is not None else None for k, r in enumerate(regions)]
        plans.append((phrases, rels, regions))
    todo = [i for i, (_, rels, _) in enumerate(plans) if not all((root / r).is_file() for r in rels if r is not None)]

    for i in tqdm(todo, desc="masks", unit="image", disable=not progress):
        phrases, rels, regions = plans[i]
        with Image.open(src.files[i]) as im:
            image = im.convert("RGB")
        masks = source.masks(image, rows[i], i, src.records[i].where, phrases, regions, threshold)
        for m, rel in zip(masks, rels):
            if rel is None:
                continue
            png = Image.fromarray(m.astype(np.uint8) * 255, mode="L")
            buf = _io.BytesIO()
            png.save(buf, format="PNG")
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buf.getvalue())

    for row, (phrases, rels, _) in zip(rows, plans):
        row["attn_list"] = [[p, r] for p, r in zip(phrases, rels)]
    new_text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    rewritten = new_text != text
    if rewritten:
        atomic_write_text(meta, new_text)
    return MasksResult(len(rows), len(todo), sum(r is not None for _, rels, _ in plans for r in rels), rewritten)


def weight_rows() -> list[dict]:
    from huggingface_hub import try_to_load_from_cache

    hits = [try_to_load_from_cache(HUB_ID, f) for f in ("model.safetensors", "pytorch_model.bin")]
    path = next((h for h in hits if isinstance(h, str)), None)
    return [{"group": "masks", "name": "clipseg-rd64-refined", "what": "CLIPSeg (spfbench masks, TokenCompose)",
             "source": f"hf://{HUB_ID}", "size": "603 MB", "present": path is not None, "path": path}]
