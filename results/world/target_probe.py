"""Which target texts does a fine-tuned world UNet tell apart? (issue 20: what blocks sunglasses and freckles)

For the first N triples of a test set (base caption and seed), every model given draws the base caption
alone and the base caption with each of the five target texts, all from the triple's own seed, and the
attribute reader reads every image. Per model:

* ``reads``: for each text, the share of its images on which each *target* attribute (headwear, eyewear,
  freckles, style) takes each value: the row "sunglasses" says what the model draws when asked for
  sunglasses, beside what it draws for "glasses" and for the base caption alone;
* ``mean_probs``: the reader's mean probability of each eyewear and freckles value on each text's
  images: whether a model's "sunglasses" images differ at all from its "glasses" images in the reader's
  eye, and how close its "freckles" images come to showing them (the reader finds freckles on 0.91 of
  the VAE's reconstructions of renders with freckles, results/world/target_ceiling.json).

Usage: python results/world/target_probe.py TESTSET OUT.json NAME=ARTIFACT ... [--n N]
(an ARTIFACT of ``-`` is the untrained world model). Made with:
``python results/world/target_probe.py runs/world-exp/testset results/world/target_probe.json
original=- naive=runs/world-exp/run/methods/naive/artifact
naive-noglasses=runs/probe/naive-noglasses/artifact --n 40``
(naive-noglasses: naive at the experiment's budget on the fine-tuning set without its 800 "glasses" rows).
"""

from __future__ import annotations

import argparse

import torch

from spfbench.captions import join_caption
from spfbench.generation import GenerationSettings, generate
from spfbench.io import atomic_write_json
from spfbench.models import load_pipeline
from spfbench.testset import load_testset
from spfbench.world.attributes import TARGET_TEXTS
from spfbench.world.reader import load_reader

TARGET_ATTRS = sorted({a for a, _ in TARGET_TEXTS.values()})
TEXTS = ["(base)", *TARGET_TEXTS]
PROB_ATTRS = ("eyewear", "freckles")


def probe_model(artifact: str, testset_meta: dict, triples, reader) -> dict:
    import trainers

    pipe, _ = load_pipeline("world", device="cpu")
    if artifact != "-":
        trainers.load_artifact(artifact, pipe)
    pipe.set_progress_bar_config(disable=True)
    settings = GenerationSettings(**testset_meta["generation"])
    images = {}
    for text in TEXTS:
        captions = [t.base_caption if text == "(base)" else join_caption(t.base_caption, text) for t in triples]
        out = []
        for i in range(0, len(triples), 8):
            out += generate(pipe, captions[i:i + 8], [t.seed for t in triples[i:i + 8]], settings)
        images[text] = out
    reads, probs = {}, {}
    for text in TEXTS:
        got = reader.read(images[text])
        reads[text] = {a: {v: round(c / len(got), 3) for v, c in sorted(_count(r[a] for r in got).items())} for a in TARGET_ATTRS}
        p = reader.probs(images[text])
        probs[text] = {a: {v: round(float(p[a][:, k].mean()), 3) for k, v in enumerate(reader.schema[a])} for a in PROB_ATTRS}
    return {"reads": reads, "mean_probs": probs}


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("testset")
    ap.add_argument("out")
    ap.add_argument("models", nargs="+", help="NAME=ARTIFACT (ARTIFACT '-': the untrained world model)")
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    torch.manual_seed(0)
    meta, triples = load_testset(args.testset)
    triples = triples[:args.n]
    reader = load_reader()
    out = {"testset": args.testset, "n": len(triples), "generation": meta["generation"], "models": {}}
    for spec in args.models:
        name, artifact = spec.split("=", 1)
        out["models"][name] = {"artifact": artifact, **probe_model(artifact, meta, triples, reader)}
        print(name, {t: r["eyewear"] for t, r in out["models"][name]["reads"].items()}, flush=True)
        atomic_write_json(args.out, out)


if __name__ == "__main__":
    main()
