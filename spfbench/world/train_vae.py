"""Portrait World's original model, first stage: the autoencoder (docs/world.md, "Original model").

:func:`train_vae`: downsample 4 (64 px -> 16 x 16 x 8 latents) on a render mix (index mod 10: 0-6
pretrain, 7-8 finetune, 9 the reader's uniform stream) so it also reconstructs the targets fine-tuning
will need; loss detail-weighted L1 + ``kl_weight`` x KL; then ``scaling_factor = 1 / std`` of the
posterior means of renders. Resumable (:mod:`spfbench.engine`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from .. import engine
from ..errors import SpfbenchError
from .attributes import SCHEMA
from .components import build_components
from .renders import render_batch, render_batch_details, to_float, to_pil, vae_mix


def train_vae(
    out: str | os.PathLike,
    n: int = 10000,
    steps: int = 2500,
    batch_size: int = 16,
    seed: int = 0,
    threads: int = 2,
    lr: float = 5e-4,
    kl_weight: float = 1e-6,
    detail_weight: float = 10.0,
    warmup: int = 100,
    ckpt_every: int = 250,
    log_every: int = 25,
    overrides: dict | None = None,
    stop_at: int | None = None,
    n_val: int = 512,
    progress: bool = True,
    log=print,
):
    """Train the autoencoder; saves ``OUT/`` (diffusers ``AutoencoderKL`` folder, fp32, with the measured
    ``scaling_factor``) and ``OUT/vae_card.json``. Returns the ``AutoencoderKL``.

    Loss per batch: weighted mean L1 over pixels (images in [-1, 1]; weight 1 + ``detail_weight`` on the
    pixels of :data:`.renders.DETAIL_PARTS`, normalised by the mean weight) + ``kl_weight`` x the KL to N(0, I) summed
    over the latent elements and averaged over the batch (a weak KL: it keeps the latents bounded and
    smooth; the scale is then fixed by ``scaling_factor``).
    ``stop_at`` stops (with a checkpoint) after that step, as if killed: the next call continues.
    Finished folders (card present with the same arguments) are returned as they are."""
    import torch
    from diffusers import AutoencoderKL

    args = dict(n=n, steps=steps, batch_size=batch_size, seed=seed, lr=lr, kl_weight=kl_weight, detail_weight=detail_weight,
                warmup=warmup, overrides=overrides or {})
    out = Path(out)
    card_path = out / "vae_card.json"
    if card_path.is_file():
        card = json.loads(card_path.read_text())
        engine.check_same_args(card.get("args", {}), args, "VAE", out)
        return AutoencoderKL.from_pretrained(out)
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ckpt_path = out / engine.CHECKPOINT
    vae = build_components(seed, overrides)["vae"]
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, engine.warmup_cosine(warmup, steps))
    g = torch.Generator().manual_seed(seed)
    ck, step, seconds_before = engine.resume(out, args, "VAE", opt, sched, g, log)
    if ck is not None:
        vae.load_state_dict(ck["vae"])
    log(f"rendering {n} VAE training images ...")
    x_all, detail_all = render_batch_details([vae_mix(i, seed) for i in range(n)], list(range(n)))

    def save_ckpt(step):
        engine.atomic_torch_save(engine.checkpoint(args, step, seconds_before + time.time() - t0, opt, sched, g, vae=vae.state_dict()),
                                 ckpt_path)

    def one_step(step):
        idx = torch.randint(0, n, (batch_size,), generator=g)
        x = to_float(x_all[idx])
        w = 1.0 + detail_weight * detail_all[idx].float()
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        err = (rec - x).abs()
        l1 = err.mean()  # logged: the plain L1
        kl = post.kl().mean()  # summed over latent elements, averaged over the batch
        loss = (w * err).mean() / w.mean() + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return {"l1": l1.item(), "kl": kl.item()}

    step = engine.run_steps(one_step, step, steps, sched=sched, stop_at=stop_at, log_every=log_every, log_path=out / engine.LOG,
                            save=save_ckpt, ckpt_every=ckpt_every, elapsed=lambda: seconds_before + time.time() - t0, desc="vae",
                            progress=progress)
    if step < steps:
        log(f"stopped at step {step} of {steps} (checkpoint {ckpt_path}); run again to continue")
        return vae
    vae.eval()
    card = _finish_vae(vae, out, args, seed, seconds_before + time.time() - t0, threads, n_val)
    log(f"VAE done: scaling_factor {card['scaling_factor']:.4f}, val L1 {card['val_l1']:.4f}, PSNR {card['val_psnr']:.1f} dB")
    return vae


def _finish_vae(vae, out: Path, args: dict, seed: int, seconds: float, threads: int, n_val: int = 512) -> dict:
    """Measure the latent std (scaling factor) and validation reconstruction; save the folder + card."""
    import torch

    from ..io import atomic_write_json

    val_seed = seed + 1000
    attrs = [vae_mix(i, val_seed) for i in range(n_val)]
    x = to_float(render_batch(attrs, [i + 7_000_001 for i in range(n_val)]))
    with torch.no_grad():
        means, recs = [], []
        for s in range(0, n_val, 128):
            m = vae.encode(x[s : s + 128]).latent_dist.mean
            means.append(m)
            recs.append(vae.decode(m).sample.clamp(-1, 1))
    means, recs = torch.cat(means), torch.cat(recs)
    std = means.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    mse = ((recs - x) / 2).pow(2).mean().item()
    card = {
        "args": args,
        "scaling_factor": 1.0 / std,
        "latent_mean": means.mean().item(),
        "latent_std": std,
        "val_n": n_val,
        "val_mix": "index mod 10: 0-6 pretrain, 7-8 finetune, 9 uniform; seed + 1000",
        "val_l1": (recs - x).abs().mean().item(),
        "val_psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
        "seconds": round(seconds, 1),
        "threads": threads,
        "parameters": sum(p.numel() for p in vae.parameters()),
    }
    try:  # how well the reader reads reconstructions (what fine-tuning/evaluation can resolve at best)
        from .reader import load_reader

        reader = load_reader()
        got = reader.read([to_pil(r) for r in recs])
        card["reader_accuracy_on_reconstructions"] = {a: round(sum(g[a] == t[a] for g, t in zip(got, attrs)) / n_val, 4) for a in SCHEMA}
    except SpfbenchError:
        pass
    vae.save_pretrained(out, safe_serialization=True)
    atomic_write_json(out / "vae_card.json", card)
    ck = out / engine.CHECKPOINT
    if ck.exists():
        ck.unlink()
    return card

