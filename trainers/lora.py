"""lora: peft LoRA on the UNet's attention projections (Table 1's "LoRA (Best Rank)" row, with
:func:`trainers.sweep.lora_rank_sweep` picking the rank).

As diffusers' ``examples/text_to_image/train_text_to_image_lora.py``: the UNet is frozen, a peft
``LoraConfig(r, lora_alpha, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v",
"to_out.0"])`` is added with ``unet.add_adapter``, only the LoRA matrices train (kept in fp32), the
loss is the plain diffusion loss, and the artifact is ``pytorch_lora_weights.safetensors`` written by
``StableDiffusionPipeline.save_lora_weights`` in the diffusers format.

Deviation from the example (a fix, not a change of method): the adapter's peft config is saved as
LoRA adapter metadata inside the safetensors file. Without it ``load_lora_weights`` assumes
``lora_alpha == r`` and silently loads a LoRA trained with ``alpha != rank`` at the wrong scale
``alpha / r``. With the default ``alpha = rank`` both give the same model.

The artifact is loaded with ``pipe.load_lora_weights(folder)`` and left unfused (the pipeline computes
exactly what training computed; ``pipe.fuse_lora()`` remains available to callers who want speed).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spfbench.errors import SpfbenchError

from .base import Models, TrainConfig, TrainedMethod

ADAPTER = "default"  # the adapter name diffusers' add_adapter uses
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
INITS = ("gaussian", "default")  # peft init_lora_weights: "gaussian" (diffusers example), "default" = True (kaiming A)


@dataclass
class LoraConfig(TrainConfig):
    learning_rate: float = 1e-4  # diffusers' text_to_image LoRA example
    rank: int = 4  # diffusers' example default (--rank 4); the sweep trains several
    alpha: float | None = None  # None: alpha = rank (scale 1), as the example
    init: str = "gaussian"  # the example's init_lora_weights
    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise SpfbenchError(f"rank must be a positive integer, got {self.rank!r} (a sweep over ranks: trainers.sweep / --rank 4,8,16,32)")
        if self.alpha is not None and not self.alpha > 0:
            raise SpfbenchError(f"alpha must be positive (or null for alpha = rank), got {self.alpha!r}")
        if self.init not in INITS:
            raise SpfbenchError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise SpfbenchError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")


def peft_lora_config(cfg: LoraConfig):
    import peft

    alpha = cfg.lora_alpha
    return peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        init_lora_weights=True if cfg.init == "default" else cfg.init,
        target_modules=list(cfg.target_modules),
    )


@contextlib.contextmanager
def adapter_init_rng(seed: int, device: torch.device | None = None):
    """Seed the random initialisation of an adapter from the config's seed (peft draws it from torch's global
    generators), leaving the global generators as they were: the same config gives the same initial adapter
    in every run, resumed or not, whatever ran before."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_init_seed(seed))
        yield


def _init_seed(seed: int) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}|adapter-init".encode()).digest()[:8], "little") >> 1


def lora_parameters(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]


class Lora(TrainedMethod):
    name = "lora"
    description = "peft LoRA on the UNet attention projections (to_q, to_k, to_v, to_out.0)"
    Config = LoraConfig

    @classmethod
    def fit(cls, config: dict, data, out: Path, *, progress: bool = True, source: str = "config", **trainer_kwargs) -> Path:
        """``"ranks": [4, 8, 16, 32]`` (with ``"val_data"``: a held-out portrait set) in the config runs the
        rank sweep of Table 1's "LoRA (Best Rank)" into ``out`` and returns the chosen rank's artifact."""
        config = dict(config)
        ranks, val_data = config.pop("ranks", None), config.pop("val_data", None)
        if ranks is None:
            if val_data is not None:
                raise SpfbenchError(f"{source}: val_data is the rank sweep's held-out set; give ranks too")
            return super().fit(config, data, out, progress=progress, source=source, **trainer_kwargs)
        from .sweep import lora_rank_sweep

        kw = dict(trainer_kwargs)
        seed = kw.pop("weights_seed", 0)
        return lora_rank_sweep(ranks, data, out, val_data=val_data, config=config, progress=progress, weights_seed=seed, **kw).best_artifact

    def setup(self, models: Models) -> list[torch.nn.Parameter]:
        unet = models.unet
        unet.requires_grad_(False)
        with adapter_init_rng(self.config.seed, models.device):
            unet.add_adapter(peft_lora_config(self.config))
        params = []
        for _, p in lora_parameters(unet):
            p.data = p.data.float()  # diffusers' cast_training_params: trainable LoRA weights in fp32
            p.requires_grad_(True)
            params.append(p)
        if not params:
            raise SpfbenchError(f"lora: no module of the UNet matches target_modules {self.config.target_modules}")
        unet.train()
        return params

    def trainable_state(self, models: Models) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(models.unet, adapter_name=ADAPTER).items()}

    def load_trainable_state(self, models: Models, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        expected = set(get_peft_model_state_dict(models.unet, adapter_name=ADAPTER))
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise SpfbenchError(f"lora: checkpoint does not match the adapter (missing {missing[:3]}, unexpected {extra[:3]})")
        set_peft_model_state_dict(models.unet, state, adapter_name=ADAPTER)

    def save_artifact(self, models: Models, folder: Path) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        unet = models.unet
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=layers,
            weight_name=WEIGHT_NAME,
            safe_serialization=True,
            # lora_alpha (and r, targets) travel with the weights: load_lora_weights applies alpha / r
            unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
        )

    @classmethod
    def apply_artifact(cls, pipe, folder: Path, config: TrainConfig) -> None:
        folder = Path(folder)
        if not (folder / WEIGHT_NAME).is_file():
            raise SpfbenchError(f"{folder} holds no {WEIGHT_NAME} (not a lora artifact)")
        pipe.load_lora_weights(folder, weight_name=WEIGHT_NAME, adapter_name=cls.name)
        lora_alpha = pipe.unet.peft_config[cls.name].lora_alpha
        if isinstance(config, LoraConfig) and abs(float(lora_alpha) - config.lora_alpha) > 1e-6:
            raise SpfbenchError(f"{folder}: loaded lora_alpha {lora_alpha} differs from the trained {config.lora_alpha} (metadata lost?)")
