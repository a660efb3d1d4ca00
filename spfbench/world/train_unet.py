"""Portrait World's original model, second stage: text encoder + UNet (docs/world.md, "Original model").

:func:`train_unet`: text encoder + UNet jointly from scratch (or the UNet against a frozen text encoder)
on cached latents of ``pretrain`` renders with ``base_caption`` (empty caption with probability
``caption_dropout``, for CFG); epsilon loss with the scheduler config's DDPM noise schedule (or,
``vzero``, v-prediction at zero terminal SNR); AdamW, warmup + cosine LR, EMA; periodic atomic
checkpoints (a killed run continues where its last checkpoint left it); a run may continue a finished
one (``init``). The shared machinery is :mod:`spfbench.engine`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

from .. import engine
from ..errors import SpfbenchError
from .attributes import base_caption, sample
from .components import CARD, build_components, scheduler_config
from .pipeline import load_unet_checkpoint, load_world_pipeline
from .renders import DETAIL_PARTS, encode_latents, load_vae, render_batch, render_batch_details, tokenize_captions, vae_checksum


def latent_cache(out: Path, vae, n: int, seed: int, log, reuse_only: bool = False):
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
    ids = tokenize_captions([base_caption(a) for a in attrs])
    engine.atomic_torch_save({"key": key, "latents": latents, "ids": ids}, path)
    return latents, ids


def detail_cache(out: Path, n: int, seed: int, latent_size: int, log):
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
    engine.atomic_torch_save({"key": key, "details": details}, path)
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


def training_device(device: str | None):
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


def caption_states(te, ids, empty_ids, batch_size: int = 512):
    """A frozen encoder's last hidden states of every distinct caption in ``ids`` and of the empty caption
    (last row), and each render's row: ``(states (U + 1, 77, H), row (N,))``."""
    import torch

    uniq, row = torch.unique(ids, dim=0, return_inverse=True)
    uniq = torch.cat([uniq, empty_ids.view(1, -1).to(uniq)])
    with torch.no_grad():
        states = torch.cat([te(uniq[s : s + batch_size].long())[0] for s in range(0, len(uniq), batch_size)])
    return states, row


def check_loss_options(where: str = "", **values: float) -> None:
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
    check_loss_options(noise_offset=noise_offset, detail_weight=detail_weight)
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
        start = load_unet_checkpoint(init, "train the first stage (its folder's checkpoint.pt) first")
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
    dev = training_device(device)
    empty_ids = tokenize_captions([""])[0].to(dev)
    comps = build_components(seed + 10, overrides)
    frozen_te = text_encoder is not None
    unet = comps["unet"].to(dev)
    te = (copy.deepcopy(text_encoder).float().requires_grad_(False).eval() if frozen_te else comps["text_encoder"].train()).to(dev)
    unet.train()
    modules = [unet] if frozen_te else [unet, te]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = engine.EMA(modules, ema_decay) if ema_decay > 0 else None
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, engine.warmup_cosine(warmup, steps, lr_schedule))
    from diffusers import DDPMScheduler

    from trainers.base import diffusion_target  # the trainers' epsilon / v-prediction target, one definition

    noise_sched = DDPMScheduler.from_config(scheduler_config(vzero))
    alphas = noise_sched.alphas_cumprod.float().to(dev)
    n_train_t = len(alphas)
    ckpt_path = out / engine.CHECKPOINT
    ck, step, seconds_before = engine.resume(out, args, "UNet", opt, sched, g, log)
    if ck is not None:
        load_weights(ck)
    # the latents last: a wrong architecture or another run's checkpoint is refused before any encoding
    chained = init is not None and not from_model  # a checkpoint's continuation reuses the first run's cache
    latents, ids = latent_cache(_first_run(init) if chained else out, vae, n, seed, log, reuse_only=chained)
    latents, ids = latents.to(dev), ids.to(dev)
    hidden = caption_states(te, ids, empty_ids) if frozen_te else None  # (distinct captions + "", 77, hidden), row index per render
    details = detail_cache(out, n, seed, latents.shape[-1], log).to(dev) if detail_weight else None

    def save_ckpt(step):
        state = {"unet": unet.state_dict(), "text_encoder": te.state_dict(),
                 **({"text_encoder_config": te.config.to_dict()} if frozen_te else {}), "ema": ema.shadow if ema is not None else None}
        engine.atomic_torch_save(engine.checkpoint(args, step, seconds_before + time.time() - t0, opt, sched, g, **state), ckpt_path)

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

    step = engine.run_steps(one_step, step, steps, sched=sched, stop_at=stop_at, log_every=log_every, log_path=out / engine.LOG,
                            save=save_ckpt, ckpt_every=ckpt_every, elapsed=lambda: seconds_before + time.time() - t0, desc="unet",
                            progress=progress)
    done = step >= steps
    if not done:
        log(f"stopped at step {step} of {steps} (checkpoint {ckpt_path}); run again to continue")
    if ema is not None and done:
        ema.copy_to(modules)
    unet.eval().cpu()
    te.eval().cpu()
    return {"unet": unet, "text_encoder": te, "step": step, "done": done, "seconds": seconds_before + time.time() - t0}

