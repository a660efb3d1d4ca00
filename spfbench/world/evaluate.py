"""Portrait World's original model, evaluated: generate for held-out captions and read the images back
with the attribute reader, against the ceiling the autoencoder allows (docs/world.md, "Original model").
"""

from __future__ import annotations

import os
import time

from .attributes import CAPTIONED, SCHEMA, TARGET_ATTRIBUTES, UNCAPTIONED, distribution, sample
from .renders import load_vae, reconstruct_float, render_batch, to_float, to_pil

# What the original model must reach (evaluate(): the reader's reading of its generations), set against
# the ceiling (ceiling(): the same reading of the VAE's reconstructions of the same rows' renders; no
# generation can be read better than the autoencoder lets it be).
QUALITY_BAR = {
    "captioned_of_ceiling": 0.85,  # every captioned attribute matches its caption at >= 85% of the ceiling's rate
    "uncaptioned_tv_over_ceiling": 0.10,  # every uncaptioned attribute's TV to pretrain <= the ceiling's + 0.10
    "spurious_over_ceiling": 0.03,  # images read with any target attribute (never trained) <= the ceiling's + 0.03
}


def meets_bar(res: dict, ceil: dict) -> dict:
    """attribute / criterion -> whether ``res`` (an :func:`evaluate` reading) reaches :data:`QUALITY_BAR`
    against ``ceil`` (a :func:`ceiling` reading of the same rows)."""
    b = QUALITY_BAR
    ok = {f"captioned {a}": res["captioned_accuracy"][a] >= b["captioned_of_ceiling"] * ceil["captioned_accuracy"][a] for a in CAPTIONED}
    ok |= {f"tv {a}": res["uncaptioned_tv"][a] <= ceil["uncaptioned_tv"][a] + b["uncaptioned_tv_over_ceiling"] for a in UNCAPTIONED}
    ok["spurious any"] = res["spurious_any"] <= ceil["spurious_any"] + b["spurious_over_ceiling"]
    return ok


def evaluate(pipe, n: int = 200, seed: int = 0, batch_size: int = 25, settings=None, reader=None, progress: bool = False) -> dict:
    """Generate ``n`` images for held-out base captions (``world_captions(n, seed)``: the heldout stream,
    each row's own seed; suite's ``generate`` with ``settings``, default dpmpp-2m-karras 25 steps CFG 7,
    dpmpp-2m for a ``vzero`` model: ``generation.default_sampler``)
    and read them back with the attribute reader. Keys:

    * ``captioned_accuracy``: attribute -> rate at which the reader finds the caption's value;
      ``captioned_mean``; ``all_captioned``: rate with all five right;
    * ``uncaptioned_distribution``: attribute -> value -> frequency; ``uncaptioned_tv``: attribute ->
      total variation distance to the pretrain distribution (``uncaptioned_tv_max``);
    * ``spurious_target_rate``: target attribute -> rate of a non-absent reading; ``spurious_any``;
    * ``ceiling``: the same keys for the VAE's reconstructions of these rows' renders (:func:`ceiling`);
    * ``quality_bar`` (the thresholds, :data:`QUALITY_BAR`), ``bar`` (criterion -> reached), ``passed``
      (all reached), ``n``, ``seed``, ``settings``, ``seconds``.
    """
    from tqdm import tqdm

    from ..generation import GenerationSettings, generate, settings_for
    from .datasets import world_captions
    from .reader import load_reader

    t0 = time.time()
    settings = settings_for(pipe, settings or GenerationSettings())
    reader = reader or load_reader()
    rows = world_captions(n, seed)
    images = []
    for s in tqdm(range(0, n, batch_size), desc="evaluate", disable=not progress):
        chunk = rows[s : s + batch_size]
        images += generate(pipe, [r["base_caption"] for r in chunk], [r["seed"] for r in chunk], settings)
    res = reading_report(reader.read(images), [r["base_attributes"] for r in rows])
    ceil = ceiling(pipe.vae, n, seed, reader)
    bar = meets_bar(res, ceil)
    return {"n": n, "seed": seed, "settings": settings.to_dict(), "reader_sha256": reader.card.get("weights_sha256"), **res,
            "ceiling": ceil, "quality_bar": dict(QUALITY_BAR),
            "bar": bar, "passed": all(bar.values()), "seconds": round(time.time() - t0, 1)}


def ceiling(vae, n: int = 200, seed: int = 0, reader=None) -> dict:
    """:func:`evaluate`'s report on the VAE's reconstructions of the renders of the same held-out rows
    (``sample("heldout", i, seed)``, variant i): what the autoencoder and the reader let any generation
    show. A model's generations cannot be read better than this, so its bar is set against it."""
    from .reader import load_reader

    t0 = time.time()
    reader = reader or load_reader()
    attrs = [sample("heldout", i, seed) for i in range(n)]
    if isinstance(vae, (str, os.PathLike)):
        vae = load_vae(vae)
    images = [to_pil(im) for im in reconstruct_float(vae, to_float(render_batch(attrs, list(range(n)))), 100)]
    res = reading_report(reader.read(images), [{c: a[c] for c in CAPTIONED} for a in attrs])
    return {"n": n, "seed": seed, "images": "VAE reconstructions of the held-out renders", **res, "seconds": round(time.time() - t0, 1)}


def reading_report(got: list[dict], captioned: list[dict]) -> dict:
    """The reading statistics of :func:`evaluate` for reader outputs ``got`` against each image's
    captioned attributes."""
    n = len(got)
    acc = {a: sum(g[a] == c[a] for g, c in zip(got, captioned)) / n for a in CAPTIONED}
    all_ok = sum(all(g[a] == c[a] for a in CAPTIONED) for g, c in zip(got, captioned)) / n
    ref = distribution("pretrain")
    dist = {a: {v: sum(g[a] == v for g in got) / n for v in SCHEMA[a]} for a in UNCAPTIONED}
    tv = {a: 0.5 * sum(abs(dist[a][v] - ref[a][v]) for v in SCHEMA[a]) for a in UNCAPTIONED}
    absent = {a: SCHEMA[a][0] for a in TARGET_ATTRIBUTES}
    spurious = {a: sum(g[a] != absent[a] for g in got) / n for a in TARGET_ATTRIBUTES}
    spurious_any = sum(any(g[a] != absent[a] for a in TARGET_ATTRIBUTES) for g in got) / n
    r4 = lambda v: round(v, 4)  # noqa: E731
    return {
        "captioned_accuracy": {a: r4(v) for a, v in acc.items()},
        "captioned_mean": r4(sum(acc.values()) / len(acc)),
        "all_captioned": r4(all_ok),
        "uncaptioned_distribution": {a: {v: r4(p) for v, p in d.items()} for a, d in dist.items()},
        "uncaptioned_tv": {a: r4(v) for a, v in tv.items()},
        "uncaptioned_tv_max": r4(max(tv.values())),
        "spurious_target_rate": {a: r4(v) for a, v in spurious.items()},
        "spurious_any": r4(spurious_any),
    }
