"""Portrait World's "original model": a small SD-architecture text-to-image pipeline trained from scratch.

A real diffusers ``StableDiffusionPipeline`` (``UNet2DConditionModel`` with cross-attention blocks,
``AutoencoderKL``, transformers ``CLIPTextModel``, the real CLIP BPE tokenizer, SD1.5's scheduler
config) at 64 x 64 px, pretrained on ``pretrain`` renders with their base captions only: the novel
target attributes (hat, glasses, sunglasses, freckles, pencil drawing) were never shown to the UNet.
Configs: ``spfbench/configs/world/``. Definitions and numbers: docs/world.md, "Original model".

Training (two stages, both resumable; the command records itself in the card)::

    python -m spfbench.world.model train --out spfbench/world/weights/model --work runs/world-model

* :func:`train_vae`: the autoencoder (downsample 4: 64 px -> 16 x 16 x 8 latents) on a render mix
  (index mod 10: 0-6 pretrain, 7-8 finetune, 9 the reader's uniform stream) so it also reconstructs
  the targets fine-tuning will need; loss L1 + ``kl_weight`` x KL; then ``scaling_factor = 1 / std``
  of the posterior means of renders.
* :func:`train_unet`: text encoder + UNet jointly from scratch on cached latents of ``pretrain``
  renders with ``base_caption`` (empty caption with probability ``caption_dropout``, for CFG);
  epsilon loss with the scheduler config's DDPM noise schedule (or, ``vzero``, v-prediction at zero
  terminal SNR); AdamW, warmup + cosine LR, EMA; periodic atomic checkpoints (a killed run continues
  where its last checkpoint left it); continuation stages (``continuations``) chain further runs.
* :func:`save_pipeline`: the diffusers folder (fp16 safetensors, tokenizer included).
* :func:`evaluate`: generate for held-out captions, read the images back with the attribute reader.

Evaluate a model folder::

    python -m spfbench.world.model evaluate --model spfbench/world/weights/model --n 200
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import SpfbenchError
from .attributes import CAPTIONED, SCHEMA, TARGET_ATTRIBUTES, UNCAPTIONED, base_caption, distribution, sample
from .render import render

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "world"
DEFAULT_OUT = Path(__file__).parent / "weights" / "model"
DEFAULT_WORK = Path("runs") / "world-model"
CARD = "world_model.json"
FORMAT = "spfbench-world-model/1"
RESOLUTION = 64

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


# ------------------------------------------------------------------------------------------ components


def build_components(seed: int = 0, overrides: dict | None = None) -> dict:
    """Seeded random ``unet``, ``vae``, ``text_encoder`` from ``spfbench/configs/world`` (``overrides``:
    component -> config keys to replace, e.g. micro sizes for tests)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    overrides = overrides or {}
    comps = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = dict(UNet2DConditionModel.load_config(CONFIG / "unet"), **overrides.get("unet", {}))
        comps["unet"] = UNet2DConditionModel.from_config(cfg)
        torch.manual_seed(seed + 1)
        cfg = dict(AutoencoderKL.load_config(CONFIG / "vae"), **overrides.get("vae", {}))
        comps["vae"] = AutoencoderKL.from_config(cfg)
        torch.manual_seed(seed + 2)
        tcfg = CLIPTextConfig.from_pretrained(CONFIG / "text_encoder")
        for k, v in overrides.get("text_encoder", {}).items():
            setattr(tcfg, k, v)
        comps["text_encoder"] = CLIPTextModel(tcfg)
    return comps


def parameter_counts(comps: dict) -> dict:
    return {k: sum(p.numel() for p in m.parameters()) for k, m in comps.items() if hasattr(m, "parameters")}


def scheduler_config(vzero: bool = False) -> dict:
    """SD1.5's scheduler config (``spfbench/configs/world/scheduler``); ``vzero``: with v-prediction, betas
    rescaled to zero terminal SNR and trailing timesteps (Lin et al. 2024; docs/world.md, "Terminal SNR")."""
    cfg = json.loads((CONFIG / "scheduler" / "scheduler_config.json").read_text())
    if vzero:
        cfg.update(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return cfg


# ------------------------------------------------------------------------------------------ data


def vae_mix(index: int, seed: int) -> dict:
    """The VAE's training mix by index mod 10: 0-6 pretrain, 7-8 finetune (one target each, shifted
    attributes), 9 the reader's uniform stream (every attribute uniform, targets possibly combined)."""
    from .reader import sample_uniform

    r = index % 10
    if r < 7:
        return sample("pretrain", index, seed)
    if r < 9:
        return sample("finetune", index, seed)
    return sample_uniform(index, seed)


def render_batch(attrs_list: list[dict], variants: list[int]):
    """uint8 tensor (N, 3, 64, 64) of renders."""
    import numpy as np
    import torch

    x = np.stack([np.asarray(render(a, RESOLUTION, variant=v), dtype=np.uint8) for a, v in zip(attrs_list, variants)])
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


# the parts whose small details carry the fine attributes (subject, expression, pose, targets): the VAE's
# reconstruction loss weighs them up, else L1 over the whole image spends the capacity on backgrounds
DETAIL_PARTS = ("hair", "face", "eyes", "brows", "nose", "mouth", "wrinkles", "freckles", "eyewear", "hat")


def render_batch_details(attrs_list: list[dict], variants: list[int]):
    """(uint8 (N, 3, 64, 64) renders, bool (N, 1, 64, 64) masks of :data:`DETAIL_PARTS`), one drawing each."""
    import numpy as np
    import torch

    from .render import render_parts

    ims, masks = [], []
    for a, v in zip(attrs_list, variants):
        im, parts = render_parts(a, RESOLUTION, variant=v)
        ims.append(np.asarray(im, dtype=np.uint8))
        masks.append(np.any([parts[p] for p in DETAIL_PARTS], axis=0))
    x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.stack(masks))[:, None]


def to_float(x_uint8):
    """uint8 images (N, 3, H, W) as floats in [-1, 1], the VAE's input range."""
    return x_uint8.float() / 127.5 - 1.0


def _tokenize(captions: list[str]):
    """(N, 77) token ids exactly as the pipeline's ``encode_prompt`` makes them (unique captions once)."""
    import torch

    from ..clip_tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    uniq = sorted(set(captions))
    ids = tok(uniq, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    row = {c: i for i, c in enumerate(uniq)}
    return ids[torch.tensor([row[c] for c in captions])].to(torch.int32)


# ------------------------------------------------------------------------------------------ training helpers


def _lr_lambda(warmup: int, total: int, schedule: str):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))  # cosine down to 10%

    return f


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _append_log(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _trim_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint a resumed run starts from."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    from ..io import atomic_write_text

    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _check_args(ckpt_args: dict, args: dict, what: str, path: Path) -> None:
    keys = sorted(set(args) | set(ckpt_args), key=list({**args, **ckpt_args}).index)
    diffs = [k for k in keys if k not in ("stop_at", "threads", "progress") and ckpt_args.get(k) != args.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: {ckpt_args.get(k)!r} there, {args.get(k)!r} now" for k in diffs[:4])
        raise SpfbenchError(f"{path} holds a {what} checkpoint of another training ({detail}); use another folder or the same arguments")


def _resume(out: Path, args: dict, what: str, opt, sched, g, log):
    """``(checkpoint, step, seconds)`` of ``out/checkpoint.pt`` (weights-only load) with the optimizer, LR
    schedule and RNG restored and the log trimmed to it; ``(None, 0, 0.0)`` (and a stale log removed)
    when there is none. The caller loads its own modules from the checkpoint."""
    import torch

    ckpt_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    if not ckpt_path.is_file():
        if log_path.exists():
            log_path.unlink()
        return None, 0, 0.0
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    _check_args(ck["args"], args, what, out)
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    g.set_state(ck["rng"])
    _trim_log(log_path, ck["step"])
    log(f"resuming {what} training at step {ck['step']}")
    return ck, ck["step"], ck["seconds"]


def _step_loop(step: int, steps: int, stop_at: int | None, one_step, sched, log_path: Path, save_ckpt, elapsed,
               ckpt_every: int, log_every: int, desc: str, progress: bool) -> int:
    """Run training steps ``step`` .. ``min(steps, stop_at)``: ``one_step(step)`` does one optimizer step and
    returns the numbers to log (averaged over each ``log_every`` rows of ``log_path``, with the learning
    rate and ``elapsed()`` seconds); ``save_ckpt(step)`` every ``ckpt_every`` steps and at the end. Returns
    the step reached. One skeleton for the VAE, decoder and UNet trainings."""
    from tqdm import tqdm

    end = steps if stop_at is None else min(steps, stop_at)
    bar = tqdm(total=steps, initial=step, desc=desc, disable=not progress)
    run: list[dict] = []
    while step < end:
        run.append(one_step(step))
        step += 1
        bar.update(1)
        if step % log_every == 0 or step == end:
            row = {"step": step, **{k: sum(r[k] for r in run) / len(run) for k in run[0]}, "lr": sched.get_last_lr()[0],
                   "seconds": round(elapsed(), 1)}
            _append_log(log_path, row)
            first = next(iter(run[0]))
            bar.set_postfix({first: f"{row[first]:.4f}"})
            run = []
        if step % ckpt_every == 0 or step == end:
            save_ckpt(step)
    bar.close()
    return step


class _EMA:
    def __init__(self, modules, decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    def update(self, step: int) -> None:
        import torch

        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    def copy_to(self, modules) -> None:
        _copy_params(modules, self.shadow)


def _copy_params(modules, tensors) -> None:
    """Copy ``tensors`` (in ``parameters()`` order of ``modules``, as :class:`_EMA` keeps them) into the modules."""
    import torch

    params = [p for m in modules for p in m.parameters()]
    if len(params) != len(tensors):
        raise SpfbenchError(f"{len(tensors)} saved tensors for {len(params)} parameters: not this architecture's checkpoint")
    with torch.no_grad():
        for p, s in zip(params, tensors):
            p.copy_(s)


# ------------------------------------------------------------------------------------------ VAE


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
    pixels of :data:`DETAIL_PARTS`, normalised by the mean weight) + ``kl_weight`` x the KL to N(0, I) summed
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
        _check_args(card.get("args", {}), args, "VAE", out)
        return AutoencoderKL.from_pretrained(out)
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ckpt_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    vae = build_components(seed, overrides)["vae"]
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, steps, "cosine"))
    g = torch.Generator().manual_seed(seed)
    ck, step, seconds_before = _resume(out, args, "VAE", opt, sched, g, log)
    if ck is not None:
        vae.load_state_dict(ck["vae"])
    log(f"rendering {n} VAE training images ...")
    x_all, detail_all = render_batch_details([vae_mix(i, seed) for i in range(n)], list(range(n)))

    def save_ckpt(step):
        _atomic_torch_save(
            {"args": args, "step": step, "seconds": seconds_before + time.time() - t0, "vae": vae.state_dict(),
             "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": g.get_state()},
            ckpt_path,
        )

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

    step = _step_loop(step, steps, stop_at, one_step, sched, log_path, save_ckpt, lambda: seconds_before + time.time() - t0,
                      ckpt_every, log_every, "vae", progress)
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
    ck = out / "checkpoint.pt"
    if ck.exists():
        ck.unlink()
    return card


# ------------------------------------------------------------------------------------------ UNet + text encoder


def encode_latents(vae, x_uint8, batch_size: int = 256):
    """Posterior means x scaling_factor of uint8 renders (N, latent_channels, 16, 16) float32."""
    import torch

    sf = vae.config.scaling_factor
    out = []
    with torch.no_grad():
        for s in range(0, len(x_uint8), batch_size):
            out.append(vae.encode(to_float(x_uint8[s : s + batch_size])).latent_dist.mean * sf)
    return torch.cat(out)


def vae_checksum(vae) -> float:
    """Sum of all parameters in float64: identifies a VAE's weights (latent caches, readers trained on it)."""
    return float(sum(p.detach().double().sum() for p in vae.parameters()))


def reconstruct_float(vae, x, batch_size: int = 128):
    """Decodes of the posterior means of ``x`` (float images in [-1, 1]), clamped to [-1, 1], no grad, on
    the VAE's device: what a generated image of that content looks like at best."""
    import torch

    with torch.no_grad():
        return torch.cat([vae.decode(vae.encode(x[s : s + batch_size].to(vae.device, vae.dtype)).latent_dist.mean).sample.clamp(-1, 1)
                          for s in range(0, len(x), batch_size)])


def _latent_cache(out: Path, vae, n: int, seed: int, log, reuse_only: bool = False):
    """(latents, token ids) of the first ``n`` pretrain renders; cached in ``OUT/latents.pt`` (``OUT``: the
    training's folder, or the first run's folder for a continuation, which only reuses it:
    ``reuse_only`` refuses a missing or mismatching cache instead of re-encoding into another run's folder)."""
    import torch

    path = out / "latents.pt"
    key = {"n": n, "seed": seed, "scaling_factor": float(vae.config.scaling_factor), "vae_sum": vae_checksum(vae)}
    if path.is_file():
        c = torch.load(path, map_location="cpu", weights_only=True)
        if c["key"] == key:
            return c["latents"], c["ids"]
    if reuse_only:
        raise SpfbenchError(f"{path} is missing or was encoded with another VAE (or n, seed) than the run being continued; "
                            "continue with the VAE, n and seed the first run was trained with")
    log(f"rendering and encoding {n} pretrain images ...")
    attrs = [sample("pretrain", i, seed) for i in range(n)]
    vae.eval()
    lat = []
    for s in range(0, n, 2048):
        lat.append(encode_latents(vae, render_batch(attrs[s : s + 2048], list(range(s, min(n, s + 2048))))))
    latents = torch.cat(lat)
    ids = _tokenize([base_caption(a) for a in attrs])
    _atomic_torch_save({"key": key, "latents": latents, "ids": ids}, path)
    return latents, ids


def _detail_cache(out: Path, n: int, seed: int, latent_size: int, log):
    """float16 (n, 1, latent_size, latent_size): the share of each latent pixel's 64 / latent_size square
    of pixels that lies on :data:`DETAIL_PARTS` (the renderer's part masks), for the first ``n`` pretrain
    renders (the latent cache's); cached in ``OUT/details.pt``."""
    import torch
    import torch.nn.functional as F

    path = out / "details.pt"
    key = {"n": n, "seed": seed, "parts": list(DETAIL_PARTS), "latent_size": latent_size}
    if path.is_file():
        c = torch.load(path, map_location="cpu", weights_only=True)
        if c["key"] == key:
            return c["details"]
    log(f"rendering the detail masks of {n} pretrain images ...")
    attrs = [sample("pretrain", i, seed) for i in range(n)]
    out_ = []
    for s in range(0, n, 2048):
        masks = render_batch_details(attrs[s : s + 2048], list(range(s, min(n, s + 2048))))[1]
        out_.append(F.adaptive_avg_pool2d(masks.float(), latent_size).half())
    details = torch.cat(out_)
    _atomic_torch_save({"key": key, "details": details}, path)
    return details


def detail_weighted_mse(pred, target, share, detail_weight: float):
    """Mean squared error with each latent pixel weighted ``1 + detail_weight x share`` (``share``: its
    :data:`DETAIL_PARTS` share, (B, 1, h, w)), normalised by the batch's mean weight, as the VAE weighs
    its pixels: the loss's scale stays that of the plain MSE, its gradient goes to the faces."""
    w = 1.0 + detail_weight * share.to(pred.dtype)
    return (w * (pred - target) ** 2).mean() / w.mean()


def training_noise(shape, g, noise_offset: float = 0.0):
    """The noise of a training step: standard normal, plus ``noise_offset`` x a standard normal constant
    per image and channel ("offset noise", diffusers' ``--noise_offset``) when ``noise_offset`` > 0.
    Why the world model needs it: docs/world.md, "Terminal SNR"."""
    import torch

    noise = torch.randn(shape, generator=g)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=g)
    return noise


def _load_unet_checkpoint(path: Path, hint: str) -> dict:
    """``train_unet``'s ``checkpoint.pt`` at ``path`` (weights-only load), or a clear error (``hint``: what to do)."""
    import torch

    if not path.is_file():
        raise SpfbenchError(f"{path}: no UNet checkpoint; {hint}")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or "unet" not in ck or "args" not in ck:
        raise SpfbenchError(f"{path} is not a UNet training checkpoint (train_unet's checkpoint.pt); {hint}")
    return ck


def _model_start(folder: Path) -> dict:
    """A saved world model folder as the start of a weights-only continuation (checkpoint-shaped: its UNet
    and text-encoder weights in float32, no EMA, optimizer or random state; ``step``: the UNet steps its
    card records)."""
    if not (folder / CARD).is_file():
        raise SpfbenchError(f"{folder} is neither a UNet checkpoint.pt nor a world model folder (no {CARD}); "
                            "continue a checkpoint file or a folder saved by train/continue")
    card = json.loads((folder / CARD).read_text())
    pipe = load_world_pipeline(folder)
    sd = {k: {n: t.float() for n, t in getattr(pipe, k).state_dict().items()} for k in ("unet", "text_encoder")}
    return {**sd, "ema": None, "rng": None, "step": int(card.get("training", {}).get("unet", {}).get("steps", 0))}


def _first_run(checkpoint: Path) -> Path:
    """The folder of the first run of a chain of continuations ending at ``checkpoint`` (where its latent cache is)."""
    import torch

    while not (checkpoint.parent / "latents.pt").is_file():
        prev = torch.load(checkpoint, map_location="cpu", weights_only=True)["args"].get("init")
        if prev is None or "path" not in prev:  # a first run, or one that started from a model folder
            break
        checkpoint = Path(prev["path"])
    return checkpoint.parent


def _training_device(device: str | None):
    """``device`` as a torch device (None: the CPU), or a clear error when it does not exist here."""
    import torch

    try:
        dev = torch.device(device or "cpu")
    except RuntimeError as e:
        raise SpfbenchError(f"--device {device!r} is not a device torch knows ({e}); give cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpfbenchError(f"--device {device}: no CUDA device on this machine; leave --device out to train on the CPU")
    return dev


def _frozen_text_encoder_spec(te) -> dict:
    """What identifies a frozen text encoder in a run's arguments: its architecture and a checksum of its weights."""
    cfg = te.config
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act", "vocab_size", "max_position_embeddings")
    return {"frozen": True, **{k: getattr(cfg, k) for k in keys},
            "checksum": round(float(sum(p.detach().double().abs().sum() for p in te.parameters())), 3)}


def _caption_states(te, ids, empty_ids, batch_size: int = 512):
    """A frozen encoder's last hidden states of every distinct caption in ``ids`` and of the empty caption
    (last row), and each render's row: ``(states (U + 1, 77, H), row (N,))``."""
    import torch

    uniq, row = torch.unique(ids, dim=0, return_inverse=True)
    uniq = torch.cat([uniq, empty_ids.view(1, -1).to(uniq)])
    with torch.no_grad():
        states = torch.cat([te(uniq[s : s + batch_size].long())[0] for s in range(0, len(uniq), batch_size)])
    return states, row


def load_vae(vae):
    """A world VAE, float32 in eval mode: ``vae`` itself, or loaded from a VAE folder or a model folder (its ``vae/``)."""
    from diffusers import AutoencoderKL

    if isinstance(vae, (str, os.PathLike)):
        if not (Path(vae) / "config.json").is_file() and (Path(vae) / "vae" / "config.json").is_file():
            vae = Path(vae) / "vae"
        if not (Path(vae) / "config.json").is_file():
            raise SpfbenchError(f"no VAE at {vae} (no config.json); the world model's VAE is its folder's vae/ or the training's work/vae")
        return AutoencoderKL.from_pretrained(vae).float().eval()
    return vae.float().eval()


def _check_loss_options(where: str = "", **values: float) -> None:
    """:func:`train_unet`'s ``noise_offset`` and ``detail_weight``: finite and >= 0, else a clear error."""
    for name, value in values.items():
        if not 0 <= value < math.inf:
            raise SpfbenchError(f"{where}{name} must be a finite number >= 0, got {value!r}")


def train_unet(
    out: str | os.PathLike,
    vae,
    n: int = 30000,
    steps: int = 4000,
    batch_size: int = 64,
    lr: float = 5e-4,
    seed: int = 0,
    threads: int = 2,
    caption_dropout: float = 0.1,
    ema_decay: float = 0.999,
    warmup: int = 300,
    lr_schedule: str = "cosine",
    ckpt_every: int = 500,
    log_every: int = 50,
    overrides: dict | None = None,
    init: str | os.PathLike | None = None,
    noise_offset: float = 0.0,
    vzero: bool = False,
    detail_weight: float = 0.0,
    text_encoder=None,
    stop_at: int | None = None,
    device: str | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Train text encoder + UNet jointly from scratch on ``n`` pretrain renders; returns
    ``{"unet", "text_encoder", "step", "done"}`` (EMA weights when ``ema_decay`` > 0 and done).

    ``text_encoder``: a ``CLIPTextModel`` to condition on, *frozen*, instead of training one jointly (as
    SD1.5's UNet trains against a frozen CLIP text tower; the world's is
    :func:`spfbench.world.text_encoder.from_world_clip`). Only the UNet trains and keeps an EMA; the
    captions' hidden states are computed once (per distinct caption) and reused every step; an ``init``'s
    text encoder is replaced by this one. Recorded in the run's arguments (its config and a checksum of
    its weights), so a resume or a continuation with another encoder is refused.

    ``init``: the final ``checkpoint.pt`` of a finished ``train_unet`` run to continue instead of starting
    from scratch: its weights, EMA, optimizer moments and RNG state carry on (its latent cache is reused);
    ``steps``, ``lr``, ``warmup`` and ``lr_schedule`` describe the new schedule, which starts at its own
    step 0. With the same constant LR this equals one longer run (tested). ``init`` may instead be a saved
    world model folder (the shipped one, say): its (EMA) weights are the start, and EMA, AdamW and the
    random stream start afresh (weights only: the folder keeps nothing else); the latent cache is built
    in ``OUT`` with ``vae``, which must be the folder's own.

    ``noise_offset``: offset noise (:func:`training_noise`); recorded in the run's arguments only when
    used, so runs from before the option resume and continue unchanged. ``vzero``: train for
    :func:`scheduler_config` ``(vzero=True)`` (v-prediction target, zero terminal SNR), the same way; a
    continuation that switches it starts its EMA (from the loaded weights, with its warm-up) and AdamW
    moments afresh: the earlier objective's averages say nothing of the new one. ``detail_weight``: the
    loss weighs each latent pixel by its share of face and hair pixels (:func:`detail_weighted_mse`,
    shares cached in ``OUT/details.pt``), the way the VAE's loss does; recorded only when used, too.

    ``vae``: an ``AutoencoderKL`` or its folder. State in ``OUT/``: ``latents.pt`` (cached latents and
    token ids), ``checkpoint.pt`` (atomic, every ``ckpt_every`` steps and at the end: weights, EMA,
    optimizer, LR schedule, RNG state; a rerun with the same arguments continues from it, giving the
    same weights as an uninterrupted run), ``log.jsonl`` (step, loss, lr, seconds).

    ``device`` (default CPU): where the models and the step run. Every random draw (batch indices, caption
    dropout, timesteps, noise) stays on a CPU generator, so a run draws the same batches on any device
    and a checkpoint continues on another one; the returned modules are on the CPU.
    """
    import torch
    import torch.nn.functional as F

    if lr_schedule not in ("cosine", "constant"):
        raise SpfbenchError(f"lr_schedule must be cosine or constant, got {lr_schedule!r}")
    _check_loss_options(noise_offset=noise_offset, detail_weight=detail_weight)
    args = dict(n=n, steps=steps, batch_size=batch_size, lr=lr, seed=seed, caption_dropout=caption_dropout, ema_decay=ema_decay,
                warmup=warmup, lr_schedule=lr_schedule, overrides=overrides or {})
    if noise_offset:  # only when used: runs from before the option keep resuming
        args["noise_offset"] = noise_offset
    if vzero:
        args["vzero"] = True
    if detail_weight:
        args["detail_weight"] = detail_weight
    if text_encoder is not None:
        args["text_encoder"] = _frozen_text_encoder_spec(text_encoder)
    torch.set_num_threads(threads)
    out = Path(out)
    start = None
    from_model = init is not None and Path(init).is_dir()
    if from_model:
        init = Path(init).resolve()
        start = _model_start(init)
        args["init"] = {"model": str(init), "steps_before": start["step"], "objective_changed": True}
    elif init is not None:
        init = Path(init)
        start = _load_unet_checkpoint(init, "train the first stage (its folder's checkpoint.pt) first")
        other = [k for k in ("n", "seed", "overrides", "text_encoder") if start["args"].get(k, {} if k == "overrides" else None) != args.get(k)]
        if other:
            detail = "; ".join(f"{k}: {start['args'].get(k)!r} there, {args.get(k)!r} now" for k in other)
            raise SpfbenchError(f"{init} was trained with other data or architecture ({detail}); continue it with the same ones")
        if start["step"] < start["args"]["steps"]:
            raise SpfbenchError(f"{init} stopped at step {start['step']} of {start['args']['steps']}; finish that run before continuing it")
        before = start["args"].get("init", {})
        args["init"] = {"path": str(init), "steps_before": start["step"] + before.get("steps_before", 0)}
        if start["args"].get("vzero", False) != vzero:  # another loss: its EMA and Adam moments start afresh
            args["init"]["objective_changed"] = True
        else:  # the EMA's age: the steps since the last change of loss (recorded when that is not all of them)
            ema_age = start["step"] + (0 if before.get("objective_changed") else before.get("ema_steps_before", before.get("steps_before", 0)))
            if ema_age != args["init"]["steps_before"]:
                args["init"]["ema_steps_before"] = ema_age
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    vae = load_vae(vae)
    dev = _training_device(device)
    empty_ids = _tokenize([""])[0].to(dev)
    comps = build_components(seed + 10, overrides)
    frozen_te = text_encoder is not None
    unet = comps["unet"].to(dev)
    te = (copy.deepcopy(text_encoder).float().requires_grad_(False).eval() if frozen_te else comps["text_encoder"].train()).to(dev)
    unet.train()
    modules = [unet] if frozen_te else [unet, te]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = _EMA(modules, ema_decay) if ema_decay > 0 else None
    g = torch.Generator().manual_seed(seed)

    def load_weights(c):  # a checkpoint's weights and EMA into this run's modules (a frozen encoder stays as given)
        unet.load_state_dict(c["unet"])
        if not frozen_te:
            te.load_state_dict(c["text_encoder"])
        if ema is not None:
            ema.shadow = [t.to(dev, copy=True) for t in c["ema"]] if c["ema"] is not None else [p.detach().clone() for p in ema.params]

    offset = 0  # steps before this schedule (init's): the EMA's warm-up counts them
    if start is not None:
        try:
            load_weights(start)
        except RuntimeError as e:
            raise SpfbenchError(f"{init} does not hold this architecture's weights (overrides {overrides or {}}): {str(e)[:300]}") from None
        if args["init"].get("objective_changed"):
            if ema is not None:
                ema.shadow = [p.detach().clone() for p in ema.params]
        else:
            opt.load_state_dict(start["opt"])
            offset = args["init"].get("ema_steps_before", args["init"]["steps_before"])
        for group in opt.param_groups:  # the new schedule's LR, not the finished one's
            group["lr"] = lr
            group.pop("initial_lr", None)
        if start["rng"] is not None:
            g.set_state(start["rng"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, steps, lr_schedule))
    from diffusers import DDPMScheduler

    from trainers.base import diffusion_target  # the trainers' epsilon / v-prediction target, one definition

    noise_sched = DDPMScheduler.from_config(scheduler_config(vzero))
    alphas = noise_sched.alphas_cumprod.float().to(dev)
    n_train_t = len(alphas)
    ckpt_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    ck, step, seconds_before = _resume(out, args, "UNet", opt, sched, g, log)
    if ck is not None:
        load_weights(ck)
    # the latents last: a wrong architecture or another run's checkpoint is refused before any encoding
    chained = init is not None and not from_model  # a checkpoint's continuation reuses the first run's cache
    latents, ids = _latent_cache(_first_run(init) if chained else out, vae, n, seed, log, reuse_only=chained)
    latents, ids = latents.to(dev), ids.to(dev)
    hidden = _caption_states(te, ids, empty_ids) if frozen_te else None  # (distinct captions + "", 77, hidden), row index per render
    details = _detail_cache(out, n, seed, latents.shape[-1], log).to(dev) if detail_weight else None

    def save_ckpt(step):
        _atomic_torch_save(
            {"args": args, "step": step, "seconds": seconds_before + time.time() - t0, "unet": unet.state_dict(),
             "text_encoder": te.state_dict(), **({"text_encoder_config": te.config.to_dict()} if frozen_te else {}), "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": g.get_state(),
             "ema": ema.shadow if ema is not None else None},
            ckpt_path,
        )

    def one_step(step):
        idx = torch.randint(0, n, (batch_size,), generator=g).to(dev)
        x0 = latents[idx]
        drop = (torch.rand(batch_size, generator=g) < caption_dropout).to(dev)
        t = torch.randint(0, n_train_t, (batch_size,), generator=g).to(dev)
        noise = training_noise(x0.shape, g, noise_offset).to(dev)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if hidden is None:
            tok = ids[idx].long()
            tok[drop] = empty_ids.long()
            h = te(tok)[0]
        else:
            states, row = hidden
            h = states[torch.where(drop, len(states) - 1, row[idx])]
        pred = unet(xt, t, h).sample
        target = diffusion_target(noise_sched, x0, noise, t)
        mse = F.mse_loss(pred, target)
        loss = mse if details is None else detail_weighted_mse(pred, target, details[idx], detail_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(offset + step)
        # the weighted loss is trained; the plain MSE (logged beside it) compares with other stages
        return {"loss": loss.item(), **({"mse": mse.item()} if details is not None else {})}

    step = _step_loop(step, steps, stop_at, one_step, sched, log_path, save_ckpt, lambda: seconds_before + time.time() - t0,
                      ckpt_every, log_every, "unet", progress)
    done = step >= steps
    if not done:
        log(f"stopped at step {step} of {steps} (checkpoint {ckpt_path}); run again to continue")
    if ema is not None and done:
        ema.copy_to(modules)
    unet.eval().cpu()
    te.eval().cpu()
    return {"unet": unet, "text_encoder": te, "step": step, "done": done, "seconds": seconds_before + time.time() - t0}


# ------------------------------------------------------------------------------------------ pipeline


def make_pipeline(unet, vae, text_encoder, vzero: bool = False):
    """The pipeline of the world's components (``vzero``: a model trained with ``vzero``; its scheduler
    is then DDIM, PNDM cannot rescale to zero terminal SNR)."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    from ..clip_tokenizer import clip_tokenizer

    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=(DDIMScheduler if vzero else PNDMScheduler).from_config(scheduler_config(vzero)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def checkpoint_pipeline(checkpoint: str | os.PathLike, vae):
    """A float32 pipeline of a UNet training checkpoint (``train_unet``'s ``checkpoint.pt``, weights-only
    load): its EMA weights (raw weights when it keeps none) with ``vae`` (the VAE it was trained on, or
    its folder), to evaluate a training in progress."""
    ck = _load_unet_checkpoint(Path(checkpoint), "give train_unet's checkpoint.pt (WORK/unet or WORK/unet-2)")
    comps = build_components(0, ck["args"].get("overrides") or {})
    unet, te = comps["unet"], comps["text_encoder"]
    if "text_encoder_config" in ck:  # a frozen encoder of its own architecture (train_unet's text_encoder)
        from transformers import CLIPTextConfig, CLIPTextModel

        te = CLIPTextModel(CLIPTextConfig.from_dict(ck["text_encoder_config"]))
    unet.load_state_dict(ck["unet"])
    te.load_state_dict(ck["text_encoder"])
    if ck.get("ema") is not None:
        _copy_params([unet] if "text_encoder_config" in ck else [unet, te], ck["ema"])
    pipe = make_pipeline(unet.eval(), load_vae(vae), te.eval(), vzero=ck["args"].get("vzero", False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(out_dir: str | os.PathLike, unet, vae, text_encoder, card: dict | None = None, vzero: bool = False) -> Path:
    """Write the diffusers folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json``,
    fp16 safetensors; the real CLIP tokenizer files are saved too, so the folder loads on its own with
    ``StableDiffusionPipeline.from_pretrained(dir)``) plus ``world_model.json`` (``card``). The folder
    is built next to ``out_dir`` and swapped in, so a crash never leaves a half-written model."""
    import torch

    from ..io import atomic_write_json

    out_dir = Path(out_dir)
    comps = {k: torch.nn.Module.to(copy.deepcopy(m), torch.float16) for k, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    pipe = make_pipeline(**comps, vzero=vzero)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if card is not None:
        atomic_write_json(tmp / CARD, card)
    for f in tmp.rglob("*"):  # shipped in the repo: world-readable (safetensors writes 0600)
        os.chmod(f, 0o755 if f.is_dir() else 0o644)
    old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists():
        shutil.rmtree(old)
    return out_dir


def folder_bytes(path: str | os.PathLike) -> dict:
    """Bytes of the weight files per component and in total."""
    path = Path(path)
    sizes = {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in path.iterdir() if d.is_dir()}
    sizes["total"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return sizes


def load_world_pipeline(path: str | os.PathLike = DEFAULT_OUT, device: str = "cpu"):
    """A saved folder as a float32 ``StableDiffusionPipeline`` (offline)."""
    import torch
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise SpfbenchError(f"no Portrait World model at {path}; train it: python -m spfbench.world.model train --out {path}")
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------ evaluation


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
    res = _reading_report(reader.read(images), [r["base_attributes"] for r in rows])
    ceil = ceiling(pipe.vae, n, seed, reader)
    bar = meets_bar(res, ceil)
    return {"n": n, "seed": seed, "settings": settings.to_dict(), "reader_sha256": reader.card.get("weights_sha256"), **res,
            "ceiling": ceil, "quality_bar": dict(QUALITY_BAR),
            "bar": bar, "passed": all(bar.values()), "seconds": round(time.time() - t0, 1)}


def ceiling(vae, n: int = 200, seed: int = 0, reader=None) -> dict:
    """:func:`evaluate`'s report on the VAE's reconstructions of the renders of the same held-out rows
    (``sample("heldout", i, seed)``, variant i): what the autoencoder and the reader let any generation
    show. A model's generations cannot be read better than this, so its bar is set against it."""
    import torch

    from .reader import load_reader

    t0 = time.time()
    reader = reader or load_reader()
    attrs = [sample("heldout", i, seed) for i in range(n)]
    if isinstance(vae, (str, os.PathLike)):
        vae = load_vae(vae)
    images = [to_pil(im) for im in reconstruct_float(vae, to_float(render_batch(attrs, list(range(n)))), 100)]
    res = _reading_report(reader.read(images), [{c: a[c] for c in CAPTIONED} for a in attrs])
    return {"n": n, "seed": seed, "images": "VAE reconstructions of the held-out renders", **res, "seconds": round(time.time() - t0, 1)}


def to_pil(x):
    """A [-1, 1] (3, H, W) tensor as an RGB PIL image (uint8, rounded)."""
    from PIL import Image

    return Image.fromarray(((x.permute(1, 2, 0).float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().numpy())


def _reading_report(got: list[dict], captioned: list[dict]) -> dict:
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


# ------------------------------------------------------------------------------------------ CLI


def train(
    out: str | os.PathLike = DEFAULT_OUT,
    work: str | os.PathLike = DEFAULT_WORK,
    vae_n: int = 10000,
    vae_steps: int = 2500,
    vae_batch_size: int = 16,
    unet_n: int = 30000,
    unet_steps: int = 4000,
    batch_size: int = 64,
    lr: float = 5e-4,
    seed: int = 0,
    threads: int = 2,
    eval_n: int = 200,
    continuations: list[dict] = (),
    command: str | None = None,
    overrides: dict | None = None,
    device: str | None = None,
    progress: bool = True,
    log=print,
) -> dict | None:
    """Both stages, then the pipeline folder at ``out`` with its card (and evaluation when ``eval_n``).
    ``continuations``: stages that continue the finished UNet run one after the other, each a dict
    ``{"steps", "lr", "noise_offset" (optional, 0), "vzero" (optional, False), "detail_weight" (optional, 0)}`` trained in ``work/unet-2``, ``work/unet-3``, ...
    with a new schedule (100 warm-up steps, cosine from its ``lr`` to 10%), the previous stage's weights,
    EMA, optimizer and RNG carried on (:func:`train_unet` with ``init``). ``device``: where the UNet stages
    train (:func:`train_unet`; the VAE and the evaluation stay on the CPU)."""
    _training_device(device)  # a bad --device fails now, not after the VAE stage
    for c in continuations:  # and so does a bad stage
        _check_loss_options(f"continuation {c}: ", **{k: c[k] for k in ("noise_offset", "detail_weight") if k in c})
    work = Path(work)
    vae = train_vae(work / "vae", vae_n, vae_steps, vae_batch_size, seed, threads, overrides=overrides, progress=progress, log=log)
    if not (work / "vae" / "vae_card.json").is_file():
        return None
    vae_card = json.loads((work / "vae" / "vae_card.json").read_text())
    res = train_unet(work / "unet", vae, unet_n, unet_steps, batch_size, lr, seed, threads, overrides=overrides, device=device,
                     progress=progress, log=log)
    if not res["done"]:
        return None
    stages = [{"steps": unet_steps, "lr": lr, "warmup": 300, "schedule": "cosine to 10%", "noise_offset": 0.0, "vzero": False, "seconds": round(res["seconds"], 1)}]
    prev = work / "unet"
    for i, c in enumerate(continuations, start=2):
        offset, vzero, detail = c.get("noise_offset", 0.0), c.get("vzero", False), c.get("detail_weight", 0.0)
        res = train_unet(work / f"unet-{i}", vae, unet_n, c["steps"], batch_size, c["lr"], seed, threads, warmup=100, overrides=overrides,
                         init=prev / "checkpoint.pt", noise_offset=offset, vzero=vzero, detail_weight=detail, device=device,
                         progress=progress, log=log)
        if not res["done"]:
            return None
        carried = "weights and RNG (EMA and AdamW restarted: another loss)" if vzero != stages[-1]["vzero"] else "weights, EMA, optimizer and RNG"
        stages.append({"steps": c["steps"], "lr": c["lr"], "warmup": 100, "schedule": "cosine to 10%", "noise_offset": offset, "vzero": vzero,
                       **({"detail_weight": detail} if detail else {}), "seconds": round(res["seconds"], 1),
                       "continues": f"{prev.name}: {carried}"})
        prev = work / f"unet-{i}"
    import torch

    card = {
        "format": FORMAT,
        "training": {
            "command": command or f"python -m spfbench.world.model train --out {out} --work {work}",
            "vae": vae_card,
            "unet": {"n": unet_n, "steps": sum(st["steps"] for st in stages), "batch_size": batch_size, "lr": lr, "seed": seed,
                     "threads": threads, "seconds": round(sum(st["seconds"] for st in stages), 1), "stages": stages,
                     "caption_dropout": 0.1, "ema_decay": 0.999, "data": "pretrain renders (seed, variant = index) with base_caption"},
            "torch": torch.__version__,
        },
        "parameters": parameter_counts({"unet": res["unet"], "vae": vae, "text_encoder": res["text_encoder"]}),
    }
    return _save_and_evaluate(out, res, vae, card, stages[-1]["vzero"], eval_n, progress, log)


def continue_model(
    model: str | os.PathLike,
    out: str | os.PathLike,
    work: str | os.PathLike,
    steps: int,
    lr: float = 3e-4,
    batch_size: int = 64,
    n: int = 30000,
    seed: int = 0,
    threads: int = 2,
    vzero: bool | None = None,
    noise_offset: float = 0.0,
    eval_n: int = 200,
    device: str | None = None,
    command: str | None = None,
    overrides: dict | None = None,
    progress: bool = True,
    log=print,
    detail_weight: float = 0.0,
    text_encoder: str | os.PathLike | None = None,
) -> dict | None:
    """Train a saved world model folder further, weights only (:func:`train_unet` with ``init=model``;
    resumable in ``work/unet-continue``), and save it at ``out`` with its card extended by the new stage (and
    evaluated when ``eval_n``). ``vzero`` None keeps the model's own objective. For a GPU that holds the
    shipped model but none of its training state.

    ``text_encoder``: replace the folder's text encoder by the text tower of a world CLIP (``"world-clip"``:
    the shipped one; or the path of a world CLIP ``.safetensors``), frozen while the UNet trains
    (:func:`train_unet`'s ``text_encoder``). None: a folder whose card records a frozen encoder (the
    shipped v3 model) keeps its own frozen; any other folder trains its own jointly, as before."""
    import torch

    _training_device(device)
    model, work = Path(model), Path(work)
    if not (model / CARD).is_file() or not (model / "scheduler" / "scheduler_config.json").is_file():
        raise SpfbenchError(f"no world model folder at {model} (no {CARD} or scheduler/); give a folder saved by train or continue")
    if Path(out).resolve() == model.resolve():
        raise SpfbenchError(f"--out is the folder being continued ({model}); save the continuation in a new folder")
    card = json.loads((model / CARD).read_text())
    if vzero is None:
        vzero = json.loads((model / "scheduler" / "scheduler_config.json").read_text()).get("prediction_type") == "v_prediction"
    if text_encoder is not None:
        frozen = _world_clip_text_encoder(text_encoder)
    elif _frozen_encoder_card(card):  # its UNet trained against a frozen encoder: keep that one, frozen
        frozen = load_world_pipeline(model).text_encoder.float()
    else:
        frozen = None
    vae = load_vae(model / "vae")
    res = train_unet(work / "unet-continue", vae, n, steps, batch_size, lr, seed, threads, warmup=100, overrides=overrides, init=model,
                     noise_offset=noise_offset, vzero=vzero, detail_weight=detail_weight, text_encoder=frozen, device=device,
                     progress=progress, log=log)
    if not res["done"]:
        return None
    card = copy.deepcopy(card)
    card.pop("evaluation", None)
    card.pop("bytes", None)
    unet_card = card.setdefault("training", {}).setdefault("unet", {})
    unet_card.setdefault("stages", []).append({
        "steps": steps, "lr": lr, "batch_size": batch_size, "n": n, "seed": seed, "warmup": 100, "schedule": "cosine to 10%",
        "noise_offset": noise_offset, "vzero": vzero, **({"detail_weight": detail_weight} if detail_weight else {}),
        "seconds": round(res["seconds"], 1),
        "continues": f"{model}: weights only (EMA, AdamW and the random stream restarted; latents re-encoded)"
        + (f"; text encoder replaced by the frozen text tower of {text_encoder}" if text_encoder is not None else "")
        + ("; its own text encoder kept frozen" if frozen is not None and text_encoder is None else ""),
        **({"text_encoder": {"source": str(text_encoder) if text_encoder is not None else "the folder's own", "frozen": True}}
           if frozen is not None else {}),
        "command": command or f"python -m spfbench.world.model continue --model {model} --out {out} --work {work} --steps {steps}",
        "torch": torch.__version__,
    })
    unet_card["steps"] = unet_card.get("steps", 0) + steps
    unet_card["seconds"] = round(unet_card.get("seconds", 0) + res["seconds"], 1)
    card["parameters"] = parameter_counts({"unet": res["unet"], "vae": vae, "text_encoder": res["text_encoder"]})
    return _save_and_evaluate(out, res, vae, card, vzero, eval_n, progress, log)


def _frozen_encoder_card(card: dict) -> bool:
    """Whether a model card records a stage that trained its UNet against a frozen text encoder."""
    return any(st.get("text_encoder", {}).get("frozen") for st in card.get("training", {}).get("unet", {}).get("stages", []))


def _world_clip_text_encoder(source: str | os.PathLike):
    """The frozen text encoder of ``source``: ``"world-clip"`` (the shipped world CLIP) or a world CLIP
    ``.safetensors`` path (:func:`spfbench.world.text_encoder.from_world_clip`)."""
    from .clip import load_world_clip
    from .text_encoder import from_world_clip

    return from_world_clip(load_world_clip(None if str(source) == "world-clip" else source)[0])


def _save_and_evaluate(out, res: dict, vae, card: dict, vzero: bool, eval_n: int, progress: bool, log) -> dict:
    """Save the trained pipeline folder with its card (with its text encoder's target separability),
    evaluate it when ``eval_n``, and write the card."""
    from ..io import atomic_write_json
    from .text_encoder import target_separability

    save_pipeline(out, res["unet"], vae, res["text_encoder"], card, vzero=vzero)
    card["bytes"] = folder_bytes(out)
    saved = load_world_pipeline(out)
    card["text_encoder_separability"] = target_separability(saved.text_encoder, saved.tokenizer)
    if eval_n:
        log(f"evaluating on {eval_n} held-out captions ...")
        card["evaluation"] = evaluate(saved, eval_n, progress=progress)
        log(json.dumps({k: card["evaluation"][k] for k in ("captioned_accuracy", "uncaptioned_tv", "spurious_any", "bar", "passed")}))
    atomic_write_json(Path(out) / CARD, card)
    log(f"saved {out} ({card['bytes']['total'] / 1e6:.1f} MB)")
    return card


# the shipped model's stages after the first (the CLI's default): docs/world.md, "Shipped model"
CONTINUATIONS: list[dict] = [{"steps": 6000, "lr": 3e-4}, {"steps": 3000, "lr": 3e-4, "vzero": True}]


def _continuation(text: str) -> dict:
    """``STEPS:LR[:offset=X][:vzero][:detail=W]`` -> a ``train`` continuation."""
    parts = text.split(":")
    try:
        if len(parts) < 2:
            raise ValueError
        c = {"steps": int(parts[0]), "lr": float(parts[1])}
        for opt in parts[2:]:
            if opt == "vzero" and "vzero" not in c:
                c["vzero"] = True
            elif opt.startswith("offset=") and "noise_offset" not in c:
                c["noise_offset"] = float(opt[len("offset="):])
            elif opt.startswith("detail=") and "detail_weight" not in c:
                c["detail_weight"] = float(opt[len("detail="):])
            else:
                raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give STEPS:LR, then optionally :offset=X, :vzero and :detail=W, e.g. 6000:3e-4 or 2000:1e-4:vzero:detail=10") from None
    if c["steps"] <= 0 or not 0 < c["lr"] < math.inf or not all(0 <= c.get(k, 0.0) < math.inf for k in ("noise_offset", "detail_weight")):
        raise argparse.ArgumentTypeError(f"{text!r}: steps and LR must be positive, the noise offset and detail weight >= 0")
    return c


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number >= 0")
    return value


def _stage_text(c: dict) -> str:
    return (f"{c['steps']}:{c['lr']:g}" + (f":offset={c['noise_offset']:g}" if c.get("noise_offset") else "") + (":vzero" if c.get("vzero") else "")
            + (f":detail={c['detail_weight']:g}" if c.get("detail_weight") else ""))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m spfbench.world.model", description="Portrait World's original model.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train VAE, then text encoder + UNet; save the pipeline folder")
    t.add_argument("--out", default=str(DEFAULT_OUT))
    t.add_argument("--work", default=str(DEFAULT_WORK), help="checkpoints, latent cache, logs (resumable)")
    t.add_argument("--vae-n", type=int, default=10000)
    t.add_argument("--vae-steps", type=int, default=2500)
    t.add_argument("--vae-batch-size", type=int, default=16)
    t.add_argument("--unet-n", type=int, default=30000)
    t.add_argument("--unet-steps", type=int, default=4000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--eval-n", type=int, default=200)
    t.add_argument("--device", default=None, help="where the UNet stages train (default: cpu; e.g. cuda)")
    t.add_argument("--unet-more", type=_continuation, action="append", default=None, metavar="STEPS:LR[:offset=X][:vzero][:detail=W]",
                   help="continue the finished UNet run (repeatable, one stage each, in work/unet-2, unet-3, ...; "
                   f"cosine from LR to 10%%; offset=X: offset noise, vzero: v-prediction at zero terminal SNR, detail=W: latents "
                   f"weighted 1 + W x their share of face and hair pixels in the loss); default: "
                   f"{' '.join(f'--unet-more {_stage_text(c)}' for c in CONTINUATIONS) or 'none'}, the shipped model's")
    c = sub.add_parser("continue", help="train a saved model folder further (weights only), save it elsewhere")
    c.add_argument("--model", default=str(DEFAULT_OUT), help="the folder to continue (default: the shipped model)")
    c.add_argument("--out", required=True)
    c.add_argument("--work", required=True, help="checkpoint, latent cache, log (resumable)")
    c.add_argument("--steps", type=int, required=True)
    c.add_argument("--lr", type=float, default=3e-4)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--unet-n", type=int, default=30000)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--noise-offset", type=_non_negative, default=0.0)
    c.add_argument("--detail-weight", type=_non_negative, default=0.0,
                   help="weigh each latent pixel 1 + W x its share of face and hair pixels in the loss (default 0: plain MSE)")
    c.add_argument("--objective", choices=["model", "epsilon", "vzero"], default="model",
                   help="the loss: the model's own (default), epsilon, or v-prediction at zero terminal SNR")
    c.add_argument("--eval-n", type=int, default=200)
    c.add_argument("--device", default=None, help="where the UNet trains (default: cpu; e.g. cuda)")
    c.add_argument("--text-encoder", default=None, metavar="world-clip|PATH",
                   help="replace the folder's text encoder by a world CLIP's text tower (world-clip: the shipped one; PATH: a world "
                   "CLIP .safetensors), frozen while the UNet trains, as SD1.5's CLIP; default: a folder trained against a frozen "
                   "encoder (the shipped one) keeps it frozen, any other trains its own jointly")
    d = sub.add_parser("decoder", help="fine-tune a saved model folder's VAE decoder (encoder frozen), save it elsewhere")
    d.add_argument("--model", default=str(DEFAULT_OUT), help="the folder whose decoder to fine-tune (default: the shipped model)")
    d.add_argument("--out", required=True)
    d.add_argument("--work", required=True, help="checkpoint and log (resumable)")
    d.add_argument("--steps", type=int, required=True)
    d.add_argument("--lr", type=float, default=2e-4)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--n", type=int, default=10000, help="renders of the VAE mix to train on")
    d.add_argument("--detail-weight", type=_non_negative, default=10.0,
                   help="L1 weight 1 + W on the pixels of faces, hair and targets (as train_vae)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--eval-n", type=int, default=200)
    d.add_argument("--reader", default=None, help="the attribute reader that validates the VAE before and after (default: the shipped one)")
    e = sub.add_parser("evaluate", help="generate for held-out captions and read the images back")
    e.add_argument("--model", default=str(DEFAULT_OUT))
    e.add_argument("--n", type=int, default=200)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--json", help="write the result here too")
    e.add_argument("--checkpoint", help="evaluate this UNet training checkpoint (its EMA weights) instead of --model")
    e.add_argument("--vae", default=str(DEFAULT_WORK / "vae"), help="the VAE the checkpoint was trained on (with --checkpoint)")
    e.add_argument("--card", action="store_true",
                   help="write the result into --model's card as its evaluation (e.g. after the reader was retrained)")
    a = p.parse_args(argv)
    try:
        if a.cmd == "train":
            cmd = "python -m spfbench.world.model " + " ".join(sys.argv[1:] if argv is None else argv)
            train(a.out, a.work, a.vae_n, a.vae_steps, a.vae_batch_size, a.unet_n, a.unet_steps, a.batch_size, a.lr, a.seed,
                  a.threads, a.eval_n, a.unet_more or CONTINUATIONS, command=cmd, device=a.device)
        elif a.cmd == "continue":
            cmd = "python -m spfbench.world.model " + " ".join(sys.argv[1:] if argv is None else argv)
            vzero = {"model": None, "epsilon": False, "vzero": True}[a.objective]
            continue_model(a.model, a.out, a.work, a.steps, a.lr, a.batch_size, a.unet_n, a.seed, a.threads, vzero, a.noise_offset,
                           a.eval_n, a.device, command=cmd, detail_weight=a.detail_weight, text_encoder=a.text_encoder)
        elif a.cmd == "decoder":
            from .vae import finetune_decoder

            cmd = "python -m spfbench.world.model " + " ".join(sys.argv[1:] if argv is None else argv)
            finetune_decoder(a.model, a.out, a.work, a.steps, a.batch_size, a.n, a.lr, a.detail_weight, seed=a.seed, threads=a.threads,
                             eval_n=a.eval_n, reader=a.reader, command=cmd)
        else:
            import torch

            if a.card and a.checkpoint:
                raise SpfbenchError("--card writes a model folder's card; a --checkpoint has none (drop one of them)")
            if a.card and not (Path(a.model) / CARD).is_file():
                raise SpfbenchError(f"no world model card at {Path(a.model) / CARD}; --card needs a folder saved by train, continue or decoder")
            torch.set_num_threads(a.threads)
            pipe = checkpoint_pipeline(a.checkpoint, a.vae) if a.checkpoint else load_world_pipeline(a.model)
            res = evaluate(pipe, a.n, a.seed, progress=True)
            if a.card:
                from ..io import atomic_write_json

                card = json.loads((Path(a.model) / CARD).read_text())
                card["evaluation"] = res
                atomic_write_json(Path(a.model) / CARD, card)
            text = json.dumps(res, indent=2)
            print(text)
            if a.json:
                from ..io import atomic_write_text

                atomic_write_text(a.json, text + "\n")
    except SpfbenchError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
