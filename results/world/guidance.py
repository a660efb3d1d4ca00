"""How the world model's quality-bar readings depend on the guidance scale (issue 8; docs/world.md,
"Guidance and the bar").

Classifier-free guidance trades sample diversity for fidelity to the caption (Ho & Salimans 2022). The
bar's uncaptioned criteria (total variation of hair style and colour, skin tone, position, pose against
the pretrain distribution) measure diversity, and its spurious-target criterion counts eyewear and
freckles the reader finds on faces that were never asked for them. Question: does the shipped model fail
those criteria because of what it learned, or because CFG 7 sharpens it? Same rows, seeds, sampler and
steps as ``evaluate`` (n = 200, seed 0, its default sampler, 25 steps); only the guidance scale varies.

Usage: python results/world/guidance.py [--model DIR] [--scales 1.5 3 5 7 10] [--n N] [--threads T]
       [--out results/world/guidance.json]
Writes one entry per scale (evaluate's report without the ceiling, which does not depend on the scale,
plus the bar judged against it) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from spfbench.generation import GenerationSettings
from spfbench.io import atomic_write_json
from spfbench.world.components import DEFAULT_OUT
from spfbench.world.evaluate import evaluate
from spfbench.world.pipeline import load_world_pipeline

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_OUT))
    p.add_argument("--scales", type=float, nargs="+", default=[1.5, 3.0, 5.0, 7.0, 10.0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "guidance.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pipe = load_world_pipeline(a.model)
    from spfbench.world.reader import load_reader

    reader = load_reader()
    rows, ceiling = {}, None
    for scale in dict.fromkeys(a.scales):  # each scale once, in the order given
        res = evaluate(pipe, a.n, 0, settings=GenerationSettings(guidance_scale=scale), reader=reader, progress=True)
        ceiling = res.pop("ceiling")
        rows[f"{scale:g}"] = res
        print(f"cfg {scale:g}: " + json.dumps({k: res[k] for k in ("captioned_accuracy", "uncaptioned_tv", "spurious_any", "passed")}), flush=True)
    atomic_write_json(a.out, {"model": a.model, "command": "python " + " ".join(sys.argv), "n": a.n, "seed": 0, "ceiling": ceiling, "by_guidance_scale": rows,
                              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__})
    crit = list(next(iter(rows.values()))["bar"])
    print("| criterion | " + " | ".join(f"CFG {s}" for s in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for c in crit:
        kind, _, attr = c.partition(" ")
        def value(r):
            if kind == "captioned":
                return r["captioned_accuracy"][attr]
            if kind == "tv":
                return r["uncaptioned_tv"][attr]
            return r["spurious_any"]
        print(f"| {c} | " + " | ".join(f"{value(r):.3f}{'' if r['bar'][c] else ' (fail)'}" for r in rows.values()) + " |")


if __name__ == "__main__":
    main()
