"""Fine-tune a world model's VAE decoder with its encoder frozen (docs/world.md, "VAE decoder").

SD1.5's own VAE was improved this way: Stability's ``sd-vae-ft-ema`` / ``sd-vae-ft-mse`` trained the
decoder further with the encoder frozen, so the latent space, and with it every UNet trained on it, stays
valid. Here: the latent posteriors of a render mix (:func:`spfbench.world.renders.vae_mix`) are computed
once with the frozen encoder; the decoder (with ``post_quant_conv``) learns to reconstruct the renders
from samples of them, under the same detail-weighted L1 as :func:`spfbench.world.train_vae.train_vae`.
Resumable in ``work/`` (checkpoint, log); the result is a new model folder: the input folder's UNet, text
encoder and encoder with the new decoder, its card extended by the stage and re-evaluated.

``spfbench world finetune-decoder --model M --out OUT --work WORK --steps N``
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
from .attributes import SCHEMA, TARGET_TEXTS
from .components import CARD, parameter_counts
from .pipeline import load_world_pipeline
from .recipe import save_and_evaluate
from .renders import reconstruct_float, render_batch, render_batch_details, to_float, to_pil, vae_checksum, vae_mix


def decoder_parameters(vae) -> list:
    """The parameters a decoder fine-tune trains: ``post_quant_conv`` (when the VAE has one) and ``decoder``."""
    mods = [vae.decoder] + ([vae.post_quant_conv] if getattr(vae, "post_quant_conv", None) is not None else [])
    return [p for m in mods for p in m.parameters()]


def _decoder_state(vae) -> dict:
    return {k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}


def posteriors(vae, x_uint8, batch_size: int = 256):
    """(means, stds) of the encoder's latent posterior for uint8 renders, float32, no grad."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for s in range(0, len(x_uint8), batch_size):
            post = vae.encode(to_float(x_uint8[s : s + batch_size])).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def reconstruct(vae, x_uint8, batch_size: int = 256):
    """uint8 (N, 3, H, W) decodes of the posterior means of uint8 renders (rounded as saved images are)."""
    import torch

    return torch.cat([((reconstruct_float(vae, to_float(x_uint8[s : s + batch_size]), batch_size) + 1) * 127.5).round()
                      .clamp(0, 255).to(torch.uint8).cpu() for s in range(0, len(x_uint8), batch_size)])


def reconstruction_report(vae, n: int = 512, seed: int = 1000, reader=None) -> dict:
    """Validation of a VAE on ``n`` renders of the VAE mix (``seed``; variants offset as in train_vae's card):
    L1 and PSNR of the posterior-mean reconstructions, the reader's accuracy on them per attribute, and per
    target text the rate at which the reader finds the target on the reconstructions of renders showing it."""
    from .reader import load_reader

    reader = reader or load_reader()
    attrs = [vae_mix(i, seed) for i in range(n)]
    x = to_float(render_batch(attrs, [i + 7_000_001 for i in range(n)]))
    recs = reconstruct_float(vae, x)
    mse = ((recs - x) / 2).pow(2).mean().item()
    got = reader.read([to_pil(r) for r in recs])
    targets = {}
    for text, (attr, value) in TARGET_TEXTS.items():
        rows = [i for i, a in enumerate(attrs) if a[attr] == value]
        targets[text] = {"n": len(rows), "read": round(sum(got[i][attr] == value for i in rows) / max(1, len(rows)), 4)}
    return {
        "n": n, "seed": seed, "reader_sha256": reader.card.get("weights_sha256"),
        "l1": round((recs - x).abs().mean().item(), 5),
        "psnr": round(10 * math.log10(1.0 / max(mse, 1e-12)), 3),
        "reader_accuracy": {a: round(sum(g[a] == t[a] for g, t in zip(got, attrs)) / n, 4) for a in SCHEMA},
        "targets_read": targets,
    }


def finetune_decoder(
    model: str | os.PathLike,
    out: str | os.PathLike,
    work: str | os.PathLike,
    steps: int = 3000,
    batch_size: int = 16,
    n: int = 10000,
    lr: float = 2e-4,
    detail_weight: float = 10.0,
    warmup: int = 100,
    seed: int = 0,
    threads: int = 2,
    eval_n: int = 200,
    val_n: int = 512,
    reader: str | os.PathLike | None = None,
    ckpt_every: int = 250,
    log_every: int = 25,
    stop_at: int | None = None,
    command: str | None = None,
    progress: bool = True,
    log=print,
) -> dict | None:
    """Train the decoder of ``model``'s VAE ``steps`` more steps (encoder frozen) and save ``out``: the model
    folder with the new VAE and its card (the stage under ``training.vae.decoder_finetunes``, validation
    before and after on ``val_n`` renders, read by ``reader``, default the shipped one; evaluated when ``eval_n``). ``stop_at`` stops after that step with a checkpoint, as
    if killed; the next call continues. Returns the card, or None when stopped early."""
    import torch

    from .reader import load_reader

    model, out, work = Path(model), Path(out), Path(work)
    if not (model / CARD).is_file() or not (model / "vae" / "config.json").is_file():
        raise SpfbenchError(f"no world model folder at {model} (no {CARD} or vae/); give a folder saved by train or continue")
    if out.resolve() == model.resolve():
        raise SpfbenchError(f"--out is the folder being fine-tuned ({model}); save the result in a new folder")
    if steps <= 0 or batch_size <= 0 or n <= 0 or not 0 < lr < math.inf or not 0 <= detail_weight < math.inf:
        raise SpfbenchError("steps, batch size and n must be positive, the learning rate positive and the detail weight >= 0")
    torch.set_num_threads(threads)
    read = load_reader(reader)
    pipe = load_world_pipeline(model)
    vae = pipe.vae.float()
    src_sum = vae_checksum(vae)
    args = dict(model=str(model), model_vae_sum=src_sum, steps=steps, batch_size=batch_size, n=n, lr=lr, detail_weight=detail_weight,
                warmup=warmup, seed=seed)
    work.mkdir(parents=True, exist_ok=True)
    for p in vae.parameters():
        p.requires_grad_(False)
    params = decoder_parameters(vae)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, engine.warmup_cosine(warmup, steps))
    g = torch.Generator().manual_seed(seed)
    before = None
    ck, step, seconds_before = engine.resume(work, args, "VAE decoder", opt, sched, g, log)
    if ck is not None:
        vae.load_state_dict({**vae.state_dict(), **ck["decoder"]})
        before = ck["before"]
    vae.eval()  # no dropout or batch norm in the AutoencoderKL; eval keeps the encoder's behaviour fixed
    if before is None:
        log("validating the VAE as it is ...")
        before = reconstruction_report(vae, val_n, reader=read)
    t0 = time.time()
    log(f"rendering {n} images and encoding them with the frozen encoder ...")
    x_all, detail_all = render_batch_details([vae_mix(i, seed) for i in range(n)], list(range(n)))
    mean_all, std_all = posteriors(vae, x_all)
    ckpt_path = work / engine.CHECKPOINT

    def save_ckpt(step):
        engine.atomic_torch_save(engine.checkpoint(args, step, seconds_before + time.time() - t0, opt, sched, g, decoder=_decoder_state(vae),
                                                   before=before), ckpt_path)

    def one_step(step):
        idx = torch.randint(0, n, (batch_size,), generator=g)
        x = to_float(x_all[idx])
        w = 1.0 + detail_weight * detail_all[idx].float()
        z = mean_all[idx] + std_all[idx] * torch.randn(mean_all[idx].shape, generator=g)
        err = (vae.decode(z).sample - x).abs()
        loss = (w * err).mean() / w.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return {"l1": err.mean().item()}

    step = engine.run_steps(one_step, step, steps, sched=sched, stop_at=stop_at, log_every=log_every, log_path=work / engine.LOG,
                            save=save_ckpt, ckpt_every=ckpt_every, elapsed=lambda: seconds_before + time.time() - t0,
                            desc="vae decoder", progress=progress)
    if step < steps:
        log(f"stopped at step {step} of {steps} (checkpoint {ckpt_path}); run again to continue")
        return None
    for p in params:
        p.requires_grad_(False)
    seconds = seconds_before + time.time() - t0
    after = reconstruction_report(vae, val_n, reader=read)
    card = copy.deepcopy(json.loads((model / CARD).read_text()))
    card.pop("evaluation", None)
    card.pop("bytes", None)
    vae_card = card.setdefault("training", {}).setdefault("vae", {})
    vae_card.setdefault("decoder_finetunes", []).append({
        "steps": steps, "batch_size": batch_size, "n": n, "lr": lr, "warmup": warmup, "schedule": "cosine to 10%",
        "detail_weight": detail_weight, "seed": seed, "seconds": round(seconds, 1), "threads": threads,
        "frozen": "encoder and quant_conv (the latent space and scaling_factor unchanged)",
        "data": "the VAE mix (index mod 10: 0-6 pretrain, 7-8 finetune, 9 uniform), variant = index",
        "validation_before": before, "validation_after": after,
        "command": command or f"spfbench world finetune-decoder --model {model} --out {out} --work {work} --steps {steps}",
        "torch": torch.__version__,
    })
    vzero = pipe.scheduler.config.get("prediction_type") == "v_prediction"
    card["parameters"] = parameter_counts({"unet": pipe.unet, "vae": vae, "text_encoder": pipe.text_encoder})
    log(json.dumps({"before": {k: before[k] for k in ("psnr", "targets_read")}, "after": {k: after[k] for k in ("psnr", "targets_read")}}))
    res = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    card = save_and_evaluate(out, res, vae, card, vzero, eval_n, progress, log)
    if ckpt_path.exists():
        ckpt_path.unlink()
    return card
