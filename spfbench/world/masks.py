"""TokenCompose masks of Portrait World sets: the exact ground-truth regions the renderer drew (docs/world.md).

The world environment's mask source (``spfbench masks --preset world``; rows with an ``attributes`` column):
no segmenter; each phrase gets the regions of :func:`world_phrase_parts` (phrase -> attribute -> rendered
parts, :func:`spfbench.world.render.render_parts`), a phrase with no region gets ``null`` in ``attn_list`` (no
file). The image is first re-rendered from its attributes (size = the image's, variant = the number in its
file name, else its row index) and must equal the file pixel for pixel, so a mask can never describe a
different image. Threshold, model and device do not apply.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SpfbenchError
from ..masks import MaskSource


# attribute a phrase names -> the rendered parts (spfbench.world.render.PARTS) of its region
_FACE = ("face", "eyes", "brows", "nose", "mouth", "wrinkles", "freckles", "eyewear")


def _world_regions() -> dict[str, tuple[str, ...]]:
    from .render import PARTS

    return {
        "subject": tuple(p for p in PARTS if p != "background"),  # the whole person, hat and glasses included
        "expression": _FACE,  # the face and everything drawn on it (not the hair or a hat)
        "background": ("background",),
        "garment": ("garment",),  # the clothing phrase ("in a red T-shirt"): the garment, not the bare neck
        "headwear": ("hat",),
        "eyewear": ("eyewear",),  # rims, bridge and arms (the lenses of sunglasses; glasses' lenses show the eyes)
        "freckles": ("freckles",),
        "style": PARTS,  # the pencil style is applied to every pixel: the whole image
    }


def world_phrase_parts(attrs: dict, phrases: list[str]) -> list[tuple[str, ...] | None]:
    """For each phrase, the rendered parts it denotes in a portrait with ``attrs``, or None (no region).

    A phrase is matched (trimmed, case-folded) against the four phrases of ``base_caption(attrs)``
    (subject, expression, background, clothing) and the target texts whose attribute value ``attrs``
    shows; the matched attribute picks the parts (:func:`_world_regions`). Any other phrase, including a
    target text the image does not show, gets None."""
    from .attributes import TARGET_TEXTS, caption_phrases

    regions = _world_regions()
    named = {text.strip().casefold(): attr for text, attr in caption_phrases(attrs)}
    for text, (attr, value) in TARGET_TEXTS.items():
        if attrs.get(attr) == value:
            named[text.strip().casefold()] = attr
    out = []
    for ph in phrases:
        attr = named.get(ph.strip().casefold())
        out.append(regions[attr] if attr is not None else None)
    return out


def world_attributes(row: dict, where: str) -> dict:
    from .attributes import validate

    need = ("--preset world takes its masks from the ground truth of a Portrait World set: write one with "
            "`spfbench world data --out DIR` (or use --preset real)")
    attrs = row.get("attributes")
    if not isinstance(attrs, dict):
        raise SpfbenchError(f"{where}: no `attributes` column (not a Portrait World set); {need}")
    try:
        return validate(attrs)
    except SpfbenchError as e:
        raise SpfbenchError(f"{where}: `attributes` is not a Portrait World ground truth ({e}); {need}") from None


def world_variants(file_name: str, index: int) -> list[int]:
    """make_world_set renders image i as ``images/<i>.png`` with variant i: the file name's number first,
    then the row index."""
    stem = Path(file_name).stem
    cands = [int(stem)] if stem.isdigit() else []
    return cands + [index] if index not in cands else cands


def world_masks(image, attrs: dict, parts: list[tuple[str, ...] | None], variants: list[int], where: str) -> list[np.ndarray | None]:
    """The (H, W) bool mask of each phrase's parts (None stays None) in ``image``, the render of ``attrs``
    at the image's size with the first of ``variants`` that reproduces it pixel for pixel."""
    from .render import render_parts

    got = np.asarray(image.convert("RGB"))
    part = None
    for v in variants if image.width == image.height else []:
        img, masks = render_parts(attrs, image.width, variant=v)
        if np.array_equal(np.asarray(img), got):
            part = masks
            break
    if part is None:
        raise SpfbenchError(
            f"{where}: the image is not the Portrait World render of its `attributes` (size {image.width}x"
            f"{image.height}, variant {' or '.join(map(str, variants))}): --preset world needs the images exactly as "
            f"`spfbench world data` wrote them (same Pillow version)"
        )
    return [None if ps is None else np.logical_or.reduce([part[p] for p in ps]) for ps in parts]


class WorldMasks(MaskSource):
    """The world environment's mask source: ground-truth regions, no model."""

    def regions(self, row, where, phrases):
        return world_phrase_parts(world_attributes(row, where), phrases)

    def masks(self, image, row, index, where, phrases, regions, threshold):
        return world_masks(image, row["attributes"], regions, world_variants(row["file_name"], index), where)
