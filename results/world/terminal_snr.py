"""Why the world model draws the wrong background a third of the time: the non-zero terminal SNR of
SD1.5's noise schedule, four times worse at 16 x 16 latents (issue 8; docs/world.md, "Terminal SNR").

At the last training timestep x_T = sqrt(a_T) x_0 + sqrt(1 - a_T) eps still carries sqrt(a_T) = 0.068 of
the latent, and a background colour is above all the per-channel spatial mean of the latent. A pure-noise
start has per-channel means of std 1/sqrt(16 x 16) = 0.0625 (SD1.5's 64 x 64 latents: 0.016): a
model that learned to read the mean from x_T reads it from the seed's noise, not from the caption.
Test: the same rows, seeds and sampler as ``evaluate``, once with the suite's initial noise and once
with its per-channel spatial means removed (the rest of the noise unchanged). If the leak decides the
backgrounds, the centred starts follow the caption more often.

Also measured: the std, across 512 pretrain renders, of the latent's per-channel spatial means, times
sqrt(a_T) (the signal the training x_T leaks) against the pure-noise start's 0.0625.

Usage: python results/world/terminal_snr.py [MODEL ...] [--n N] [--threads T]   (default: the shipped
model). Writes results/world/terminal_snr.json (one entry per model) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

import spfbench.generation as generation
from spfbench.io import atomic_write_json
from spfbench.world.components import CARD, DEFAULT_OUT
from spfbench.world.evaluate import evaluate
from spfbench.world.pipeline import load_world_pipeline
from spfbench.world.renders import encode_latents, render_batch
from spfbench.world.attributes import sample

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def centred_noise():
    """``generation.initial_noise`` with each channel's spatial mean removed, for the block's duration."""
    plain = generation.initial_noise

    def centred(seed, shape):
        x, g = plain(seed, shape)
        return x - x.mean(dim=(2, 3), keepdim=True), g

    generation.initial_noise = centred
    try:
        yield
    finally:
        generation.initial_noise = plain


def leak(pipe, n: int = 512) -> dict:
    from diffusers import DDPMScheduler

    attrs = [sample("pretrain", 10**6 + i, 0) for i in range(n)]
    z = encode_latents(pipe.vae, render_batch(attrs, list(range(n))))
    a_t = DDPMScheduler.from_config(generation.model_scheduler_config(pipe)).alphas_cumprod[-1].item()  # 0 for a vzero model
    h, w = z.shape[2:]
    mean_std = z.mean(dim=(2, 3)).std(dim=0)
    return {"sqrt_alpha_T": round(a_t**0.5, 4), "latent_channel_mean_std_rms": round(mean_std.pow(2).mean().sqrt().item(), 4),
            "signal_in_x_T": round(a_t**0.5 * mean_std.pow(2).mean().sqrt().item(), 4),
            "noise_channel_mean_std": round(((1 - a_t) / (h * w)) ** 0.5, 4), "n": n}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=[str(DEFAULT_OUT)])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = HERE / "terminal_snr.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    keys = ("subject", "expression", "background", "clothing_color", "garment")
    for path in a.models:
        t0 = time.time()
        pipe = load_world_pipeline(path)
        card = json.loads((Path(path) / CARD).read_text())
        plain = evaluate(pipe, a.n)
        with centred_noise():
            centred = evaluate(pipe, a.n)
        results[path] = {
            "unet_stages": card["training"]["unet"].get("stages"),
            "n": a.n,
            "settings": plain["settings"],
            "plain_noise": {k: plain[k] for k in ("captioned_accuracy", "captioned_mean", "uncaptioned_tv", "spurious_any")},
            "centred_noise": {k: centred[k] for k in ("captioned_accuracy", "captioned_mean", "uncaptioned_tv", "spurious_any")},
            "ceiling": plain["ceiling"]["captioned_accuracy"],
            "leak": leak(pipe),
            "seconds": round(time.time() - t0, 1),
        }
        atomic_write_json(out, results)
        r = results[path]
        print(f"\n{path}  (n = {a.n}; leak: signal {r['leak']['signal_in_x_T']} vs noise {r['leak']['noise_channel_mean_std']})")
        print("noise     " + " ".join(f"{k[:10]:>10}" for k in keys) + "       mean")
        for name in ("plain_noise", "centred_noise"):
            acc = r[name]["captioned_accuracy"]
            print(f"{name.split('_')[0]:<9} " + " ".join(f"{acc[k]:>10.3f}" for k in keys) + f" {r[name]['captioned_mean']:>10.3f}")
        print("ceiling   " + " ".join(f"{r['ceiling'][k]:>10.3f}" for k in keys))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
