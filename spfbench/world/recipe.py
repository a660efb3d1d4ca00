"""Portrait World's original model, the whole recipe: both stages, their continuations, the saved folder
and its card (docs/world.md, "Original model" and "Shipped model").

* :func:`train` (``spfbench world train-model``): the VAE (:func:`.train_vae.train_vae`), then text
  encoder + UNet (:func:`.train_unet.train_unet`) and the continuation stages, then the pipeline folder
  with its card, evaluated (:func:`.evaluate.evaluate`).
* :func:`continue_model` (``spfbench world continue-model``): a saved folder trained further, weights only.
* :func:`parse_stage` / :func:`stage_text`: a continuation stage as ``STEPS:LR[:offset=X][:vzero][:detail=W]``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

from ..errors import SpfbenchError
from .components import CARD, DEFAULT_OUT, DEFAULT_WORK, FORMAT, parameter_counts
from .pipeline import folder_bytes, load_world_pipeline, save_pipeline
from .renders import load_vae
from .train_unet import check_loss_options, train_unet, training_device
from .train_vae import train_vae

# the shipped model's stages after the first (train-model's default): docs/world.md, "Shipped model"
CONTINUATIONS: list[dict] = [{"steps": 6000, "lr": 3e-4}, {"steps": 3000, "lr": 3e-4, "vzero": True}]


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
    training_device(device)  # a bad --device fails now, not after the VAE stage
    for c in continuations:  # and so does a bad stage
        check_loss_options(f"continuation {c}: ", **{k: c[k] for k in ("noise_offset", "detail_weight") if k in c})
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
            "command": command or f"spfbench world train-model --out {out} --work {work}",
            "vae": vae_card,
            "unet": {"n": unet_n, "steps": sum(st["steps"] for st in stages), "batch_size": batch_size, "lr": lr, "seed": seed,
                     "threads": threads, "seconds": round(sum(st["seconds"] for st in stages), 1), "stages": stages,
                     "caption_dropout": 0.1, "ema_decay": 0.999, "data": "pretrain renders (seed, variant = index) with base_caption"},
            "torch": torch.__version__,
        },
        "parameters": parameter_counts({"unet": res["unet"], "vae": vae, "text_encoder": res["text_encoder"]}),
    }
    return save_and_evaluate(out, res, vae, card, stages[-1]["vzero"], eval_n, progress, log)


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

    training_device(device)
    model, work = Path(model), Path(work)
    if not (model / CARD).is_file() or not (model / "scheduler" / "scheduler_config.json").is_file():
        raise SpfbenchError(f"no world model folder at {model} (no {CARD} or scheduler/); give a folder saved by train or continue")
    if Path(out).resolve() == model.resolve():
        raise SpfbenchError(f"--out is the folder being continued ({model}); save the continuation in a new folder")
    card = json.loads((model / CARD).read_text())
    if vzero is None:
        vzero = json.loads((model / "scheduler" / "scheduler_config.json").read_text()).get("prediction_type") == "v_prediction"
    if text_encoder is not None:
        frozen = world_clip_text_encoder(text_encoder)
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
        "command": command or f"spfbench world continue-model --model {model} --out {out} --work {work} --steps {steps}",
        "torch": torch.__version__,
    })
    unet_card["steps"] = unet_card.get("steps", 0) + steps
    unet_card["seconds"] = round(unet_card.get("seconds", 0) + res["seconds"], 1)
    card["parameters"] = parameter_counts({"unet": res["unet"], "vae": vae, "text_encoder": res["text_encoder"]})
    return save_and_evaluate(out, res, vae, card, vzero, eval_n, progress, log)


def _frozen_encoder_card(card: dict) -> bool:
    """Whether a model card records a stage that trained its UNet against a frozen text encoder."""
    return any(st.get("text_encoder", {}).get("frozen") for st in card.get("training", {}).get("unet", {}).get("stages", []))


def world_clip_text_encoder(source: str | os.PathLike):
    """The frozen text encoder of ``source``: ``"world-clip"`` (the shipped world CLIP) or a world CLIP
    ``.safetensors`` path (:func:`spfbench.world.text_encoder.from_world_clip`)."""
    from .clip import load_world_clip
    from .text_encoder import from_world_clip

    return from_world_clip(load_world_clip(None if str(source) == "world-clip" else source)[0])


def save_and_evaluate(out, res: dict, vae, card: dict, vzero: bool, eval_n: int, progress: bool, log) -> dict:
    """Save the trained pipeline folder with its card (with its text encoder's target separability),
    evaluate it when ``eval_n``, and write the card."""
    from ..io import atomic_write_json
    from .evaluate import evaluate
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


def parse_stage(text: str) -> dict:
    """``STEPS:LR[:offset=X][:vzero][:detail=W]`` -> a :func:`train` continuation (a clear error for anything else)."""
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
        raise SpfbenchError(f"--unet-more {text!r}: give STEPS:LR, then optionally :offset=X, :vzero and :detail=W, e.g. 6000:3e-4 or 2000:1e-4:vzero:detail=10") from None
    if c["steps"] <= 0 or not 0 < c["lr"] < math.inf or not all(0 <= c.get(k, 0.0) < math.inf for k in ("noise_offset", "detail_weight")):
        raise SpfbenchError(f"--unet-more {text!r}: steps and LR must be positive, the noise offset and detail weight >= 0")
    return c


def stage_text(c: dict) -> str:
    """A continuation stage as :func:`parse_stage` reads it."""
    return (f"{c['steps']}:{c['lr']:g}" + (f":offset={c['noise_offset']:g}" if c.get("noise_offset") else "") + (":vzero" if c.get("vzero") else "")
            + (f":detail={c['detail_weight']:g}" if c.get("detail_weight") else ""))

