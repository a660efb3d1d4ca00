"""naive: full UNet fine-tuning with the diffusion loss (the paper's "Naive Fine-tuning" row).

Every UNet parameter trains; VAE and text encoder stay frozen; the target is the noise (epsilon) or the
velocity (v-prediction), as the model's scheduler config says. The artifact is the fine-tuned UNet in
diffusers format (safetensors), loaded in place of the base UNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .base import Method, Models, TrainConfig


@dataclass
class NaiveConfig(TrainConfig):
    learning_rate: float = 1e-5


class Naive(Method):
    name = "naive"
    description = "full UNet fine-tuning with the diffusion loss"
    Config = NaiveConfig

    def setup(self, models: Models) -> list[torch.nn.Parameter]:
        models.unet.requires_grad_(True)
        models.unet.train()
        return [p for p in models.unet.parameters() if p.requires_grad]

    def trainable_state(self, models: Models) -> dict[str, torch.Tensor]:
        return models.unet.state_dict()

    def load_trainable_state(self, models: Models, state: dict[str, torch.Tensor]) -> None:
        models.unet.load_state_dict(state, strict=True)

    def save_artifact(self, models: Models, folder: Path) -> None:
        models.unet.save_pretrained(folder / "unet", safe_serialization=True)

    @classmethod
    def apply_artifact(cls, pipe, folder: Path, config: TrainConfig) -> None:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
        pipe.unet = unet.to(device=pipe.device, dtype=pipe.unet.dtype)
