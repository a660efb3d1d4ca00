"""What saving the naive artifact in fp16 (issue 24, `save_precision`) changes in the world demo: the naive row
generated from the run's final fp32 weights (its last checkpoint) against the images of its fp16 artifact,
same triples, seeds, sampler and batches; pixel differences and the ground-truth metrics, paired.

    python results/world/fp16/measure.py RUN TESTSET OUT      (RUN: a finished `make demo`-style run folder)
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import trainers
from spfbench.generation import GenerationSettings
from spfbench.models import load_pipeline
from spfbench.testset import load_testset

run, testset, out = map(Path, sys.argv[1:4])
torch.set_num_threads(2)
meta, triples = load_testset(testset)
settings = GenerationSettings(**meta["generation"])
batch = int(meta["spec"].get("batch_size", 4))
ckpt = sorted((run / "methods" / "naive" / "train" / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
pipe, _ = load_pipeline("world", device="cpu")
pipe.unet.load_state_dict(load_file(str(ckpt / "trainable.safetensors")))
fitted = trainers.base_model(pipe)  # naive generates exactly so: the complete caption, the triple's seed
images = out / "images-fp32"
images.mkdir(parents=True, exist_ok=True)
for i in range(0, len(triples), batch):
    chunk = triples[i:i + batch]
    for t, img in zip(chunk, fitted.generate(chunk, settings)[0]):
        img.save(images / f"{t.id}.png")
diffs = []
for t in triples:
    a = np.asarray(Image.open(images / f"{t.id}.png"), dtype=np.int16)
    b = np.asarray(Image.open(run / "methods" / "naive" / "images" / f"{t.id}.png"), dtype=np.int16)
    diffs.append(np.abs(a - b))
d = np.stack(diffs)
metrics = ["gt-target@world-reader", "gt-preserve@world-reader", "lpips@alex-v0.1"]
subprocess.run([sys.executable, "-m", "spfbench", "score", "--testset", str(testset), "--images", str(images), "--out", str(out / "score-fp32"),
                "--preset", "world", "--no-progress", *[a for m in metrics for a in ("--metric", m)]], check=True)
fp32 = {json.loads(l)["id"]: json.loads(l) for l in (out / "score-fp32" / "samples.jsonl").read_text().splitlines()}
fp16 = {json.loads(l)["id"]: json.loads(l) for l in (run / "methods" / "naive" / "score" / "samples.jsonl").read_text().splitlines()}
res = {"checkpoint": ckpt.name, "n": len(triples), "pixel_abs_diff": {"max": int(d.max()), "mean": float(d.mean()),
       "share_of_pixels_differing": float((d > 0).mean()), "images_differing": int(sum(x.max() > 0 for x in diffs))}}
for m in metrics:
    a = np.array([fp32[t.id][m] for t in triples], dtype=float)
    b = np.array([fp16[t.id][m] for t in triples], dtype=float)
    res[m] = {"fp32_weights": float(a.mean()), "fp16_artifact": float(b.mean()), "paired_mean_diff": float((b - a).mean()),
              "triples_differing": int((np.abs(b - a) > 1e-9).sum())}
(out / "fp16.json").write_text(json.dumps(res, indent=1) + "\n")
print(json.dumps(res, indent=1))
