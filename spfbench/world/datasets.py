"""Portrait World sets on disk (imagefolder) and caption rows for ``spfbench build-testset --captions``.

``make_world_set(out, split, n, seed=0, size=64)`` writes::

    OUT/world.json        {format_version, generator, split, n, seed, size, schema} (written first)
    OUT/images/NNNNN.png  size x size RGB renders
    OUT/metadata.jsonl    file_name, base_caption, target_text, category, attributes (written last)

``attributes`` is the full ground truth (every attribute of the schema). Image i is
``render(sample(split, i, seed), size, variant=i)``: the same arguments give byte-identical files and
image i does not depend on N. Every file is written atomically; a call on a folder holding the same
spec finishes it (resumes) and rewrites nothing. Note: pretrain and heldout rows have an empty
``target_text`` (no target is present), which :class:`spfbench.data.PortraitDataset` rejects: only the
``finetune`` split is a training set for the trainers; the others are for the reader and evaluation.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..captions import derive_seed
from ..errors import SpfbenchError
from ..io import atomic_write_text, write_image_set
from .attributes import CAPTIONED, SCHEMA, SPLITS, TARGET_CATEGORY, TARGET_TEXTS, base_caption, sample, target_text, target_texts
from .render import render

FORMAT_VERSION = 1
SPEC_FILE = "world.json"
IMAGES = "images"


@dataclass
class WorldSetResult:
    out: Path
    split: str
    n: int
    written: int  # images written by this call
    targets: dict = field(default_factory=dict)  # target text -> count ("" = none)

    def __str__(self) -> str:
        counts = ", ".join(f"{t or '(none)'}: {c}" for t, c in self.targets.items())
        return f"{self.n} Portrait World {self.split} images in {self.out} ({counts}); {self.written} written now"


def world_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """The metadata rows of a world set (without writing anything)."""
    width = max(5, len(str(n - 1)))
    rows = []
    for i in range(n):
        attrs = sample(split, i, seed)
        t = target_text(attrs)
        rows.append(
            {
                "file_name": f"{IMAGES}/{i:0{width}d}.png",
                "base_caption": base_caption(attrs),
                "target_text": t,
                "category": TARGET_CATEGORY[TARGET_TEXTS[t][0]] if t else "none",
                "attributes": attrs,
            }
        )
    return rows


def make_world_set(out: str | os.PathLike, split: str, n: int, seed: int = 0, size: int = 64) -> WorldSetResult:
    """Write ``n`` renders of ``split`` as an imagefolder set (layout in the module docstring)."""
    if split not in SPLITS:
        raise SpfbenchError(f"unknown Portrait World split {split!r}; available: {', '.join(SPLITS)}")
    if n <= 0:
        raise SpfbenchError(f"n must be positive, got {n}")
    if not 16 <= size <= 1024:
        raise SpfbenchError(f"size must be between 16 and 1024 pixels, got {size}")
    from ..validate import output_folder

    out = output_folder(out)
    spec = {
        "format_version": FORMAT_VERSION,
        "generator": "spfbench-world",
        "split": split,
        "n": n,
        "seed": seed,
        "size": size,
        "schema": SCHEMA,
    }
    rows = world_rows(split, n, seed)
    written = write_image_set(out, SPEC_FILE, spec, rows, lambda i, r: render(r["attributes"], size, variant=i), "world set",
                              option="out")
    return WorldSetResult(out, split, n, written, dict(Counter(r["target_text"] for r in rows)))


def world_captions(n: int, seed: int = 0) -> list[dict]:
    """``n`` test-set caption rows (for ``spfbench build-testset --captions FILE.jsonl``).

    Base captions come from the pretrain distribution (the ``heldout`` seed stream, so they are not the
    training set's captions); target texts go round-robin over the world's target texts (row i gets
    text i mod T). Keys: id, seed (the generation seed, as the test-set builder derives it), base_caption,
    target_text, category, target_attribute, target_value, base_attributes (the captioned attributes).
    """
    if n <= 0:
        raise SpfbenchError(f"n must be positive, got {n}")
    texts = target_texts()
    width = max(5, len(str(n - 1)))
    rows = []
    for i in range(n):
        attrs = sample("heldout", i, seed)
        t = texts[i % len(texts)]
        a, v = TARGET_TEXTS[t]
        rows.append(
            {
                "id": f"w{i:0{width}d}",
                "seed": derive_seed(seed, i),
                "base_caption": base_caption(attrs),
                "target_text": t,
                "category": TARGET_CATEGORY[a],
                "target_attribute": a,
                "target_value": v,
                "base_attributes": {c: attrs[c] for c in CAPTIONED},
            }
        )
    return rows


def write_world_captions(path: str | os.PathLike, n: int, seed: int = 0) -> Path:
    """:func:`world_captions` written atomically as JSONL (``.jsonl``: the rows carry nested attributes)."""
    from ..validate import output_file

    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise SpfbenchError(f"world captions are written as JSONL (rows carry nested attributes): name the file .jsonl, got {path.name!r}")
    if n <= 0:
        raise SpfbenchError(f"--n must be positive, got {n}")
    output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in world_captions(n, seed)))
    return path
