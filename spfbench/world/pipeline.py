"""Portrait World's original model as a diffusers pipeline: build, save, load (docs/world.md, "Original model").

:func:`save_pipeline` writes the diffusers folder (fp16 safetensors, tokenizer included) with its card;
:func:`load_world_pipeline` loads one (offline); :func:`checkpoint_pipeline` makes one of a UNet training
checkpoint (its EMA weights), to evaluate a training in progress.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

from ..engine import copy_params
from ..errors import SpfbenchError
from .components import CARD, DEFAULT_OUT, build_components, scheduler_config
from .renders import load_vae


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


def load_unet_checkpoint(path: Path, hint: str) -> dict:
    """``train_unet``'s ``checkpoint.pt`` at ``path`` (weights-only load), or a clear error (``hint``: what to do)."""
    import torch

    if not path.is_file():
        raise SpfbenchError(f"{path}: no UNet checkpoint; {hint}")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or "unet" not in ck or "args" not in ck:
        raise SpfbenchError(f"{path} is not a UNet training checkpoint (train_unet's checkpoint.pt); {hint}")
    return ck


def checkpoint_pipeline(checkpoint: str | os.PathLike, vae):
    """A float32 pipeline of a UNet training checkpoint (``train_unet``'s ``checkpoint.pt``, weights-only
    load): its EMA weights (raw weights when it keeps none) with ``vae`` (the VAE it was trained on, or
    its folder), to evaluate a training in progress."""
    ck = load_unet_checkpoint(Path(checkpoint), "give train_unet's checkpoint.pt (WORK/unet or WORK/unet-2)")
    comps = build_components(0, ck["args"].get("overrides") or {})
    unet, te = comps["unet"], comps["text_encoder"]
    if "text_encoder_config" in ck:  # a frozen encoder of its own architecture (train_unet's text_encoder)
        from transformers import CLIPTextConfig, CLIPTextModel

        te = CLIPTextModel(CLIPTextConfig.from_dict(ck["text_encoder_config"]))
    unet.load_state_dict(ck["unet"])
    te.load_state_dict(ck["text_encoder"])
    if ck.get("ema") is not None:
        copy_params([unet] if "text_encoder_config" in ck else [unet, te], ck["ema"])
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
        raise SpfbenchError(f"no Portrait World model at {path}; train it: spfbench world train-model --out {path}")
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
