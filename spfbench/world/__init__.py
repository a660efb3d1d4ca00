"""Portrait World: a procedurally rendered portrait world where pollution is measurable exactly.

``attributes`` (schema, samplers, captions), ``render`` (the drawing and its part masks), ``datasets`` (imagefolder
sets and test-set caption rows), ``reader`` (the attribute reader CNN), ``clip`` (the world CLIP), the original
model (``components``, ``renders``, ``train_vae``, ``train_unet``, ``pipeline``, ``evaluate``, ``recipe``, ``vae``)
and ``cli`` (``spfbench world ...``). Definitions and layout: docs/world.md.
"""

from .attributes import (  # noqa: F401
    ATTRIBUTES,
    CAPTIONED,
    SCHEMA,
    SPLITS,
    TARGET_ATTRIBUTES,
    TARGET_TEXTS,
    UNCAPTIONED,
    base_caption,
    distribution,
    sample,
    target_text,
)
from .render import PARTS, part_masks, render, render_parts  # noqa: F401
