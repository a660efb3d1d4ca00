"""Can the world model's autoencoder carry each target at all? (issue 20)

For each target text, the first N `finetune` renders showing it (seed 0, variant = index, as the
fine-tuning set draws them) are encoded and decoded by the shipped model's VAE (posterior mean), and
the attribute reader reads the target's attribute on the renders and on their reconstructions. A
target the reader finds on the reconstructions can be drawn by a UNet with this VAE; one it cannot
find there cannot be learned by any fine-tuning. Written to results/world/target_ceiling.json.

Usage: python results/world/target_ceiling.py [N]   (default 100 per target text)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from spfbench.io import atomic_write_json
from spfbench.world.attributes import TARGET_TEXTS, sample
from spfbench.world.pipeline import load_world_pipeline
from spfbench.world.renders import reconstruct_float, render_batch, to_float, to_pil
from spfbench.world.reader import load_reader


def main(n: int = 100) -> None:
    torch.set_num_threads(1)
    vae = load_world_pipeline().vae.float()
    reader = load_reader()
    out = {"n_per_target": n, "vae": "spfbench/world/weights/model/vae", "targets": {}}
    for text, (attr, value) in TARGET_TEXTS.items():
        rows, i = [], 0
        while len(rows) < n:
            a = sample("finetune", i, 0)
            if a[attr] == value:
                rows.append((i, a))
            i += 1
        x = render_batch([a for _, a in rows], [j for j, _ in rows])
        rec = reconstruct_float(vae, to_float(x))
        renders = [to_pil(to_float(im)) for im in x]
        recon = [to_pil(im) for im in rec]
        on_render = sum(r[attr] == value for r in reader.read(renders)) / n
        on_recon = [r[attr] for r in reader.read(recon)]
        out["targets"][text] = {
            "attribute": attr,
            "read_on_renders": round(on_render, 3),
            "read_on_reconstructions": round(sum(v == value for v in on_recon) / n, 3),
            "reconstructions_read_as": {v: round(on_recon.count(v) / n, 3) for v in sorted(set(on_recon))},
        }
        print(text, out["targets"][text])
    atomic_write_json(Path(__file__).parent / "target_ceiling.json", out)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
