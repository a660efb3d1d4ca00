"""Portrait World's original model: its components, configs and where it lives.

A real diffusers ``StableDiffusionPipeline`` (``UNet2DConditionModel`` with cross-attention blocks,
``AutoencoderKL``, transformers ``CLIPTextModel``, the real CLIP BPE tokenizer, SD1.5's scheduler
config) at 64 x 64 px, pretrained on ``pretrain`` renders with their base captions only: the novel
target attributes (hat, glasses, sunglasses, freckles, pencil drawing) were never shown to the UNet.
Configs: ``spfbench/configs/world/``. Definitions and numbers: docs/world.md, "Original model".
Training: :mod:`.train_vae`, :mod:`.train_unet`, :mod:`.recipe` (``spfbench world train-model``).
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "world"
DEFAULT_OUT = Path(__file__).parent / "weights" / "model"
DEFAULT_WORK = Path("runs") / "world-model"
CARD = "world_model.json"
FORMAT = "spfbench-world-model/1"
RESOLUTION = 64


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
    """Component name -> number of parameters (for the components that have parameters)."""
    return {k: sum(p.numel() for p in m.parameters()) for k, m in comps.items() if hasattr(m, "parameters")}


def scheduler_config(vzero: bool = False) -> dict:
    """SD1.5's scheduler config (``spfbench/configs/world/scheduler``); ``vzero``: with v-prediction, betas
    rescaled to zero terminal SNR and trailing timesteps (Lin et al. 2024; docs/world.md, "Terminal SNR")."""
    cfg = json.loads((CONFIG / "scheduler" / "scheduler_config.json").read_text())
    if vzero:
        cfg.update(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return cfg
