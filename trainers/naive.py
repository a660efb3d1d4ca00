"""naive: full UNet fine-tuning with the diffusion loss (the paper's "Naive Fine-tuning" row).

Every UNet parameter trains; VAE and text encoder stay frozen; the target is the noise (epsilon) or the
velocity (v-prediction), as the model's scheduler config says. The artifact is the fine-tuned UNet in
diffusers format (safetensors, fp16 unless ``save_precision`` says otherwise: 1.7 GB at SD1.5 size instead
of 3.4 GB, as SD checkpoints are distributed and kohya's ``--save_precision fp16`` saves them), loaded in
place of the base UNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from spfbench.errors import SpfbenchError

from .base import Models, TrainConfig, TrainedMethod

SAVE_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class NaiveConfig(TrainConfig):
    learning_rate: float = 1e-5
    # dtype of the saved UNet (training keeps fp32 master weights whatever this says); fp32 to keep every bit
    save_precision: str = "fp16"

    def validate(self) -> None:
        super().validate()
        if self.save_precision not in SAVE_PRECISIONS:
            raise SpfbenchError(f"save_precision must be one of {', '.join(SAVE_PRECISIONS)}, got {self.save_precision!r}")


def save_unet(unet: torch.nn.Module, folder: Path, precision: str) -> None:
    """``folder`` as ``UNet2DConditionModel.save_pretrained`` writes it (config.json + the safetensors weights),
    the weights cast to ``precision`` tensor by tensor: the live model keeps its fp32 weights (casting the
    model itself and back would round them) and no second UNet is held in memory. A weight that overflows the
    saving dtype is an error, not an ``inf`` on disk."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    dtype = SAVE_PRECISIONS[precision]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in unet.state_dict().items():
        w = v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        if w.is_floating_point() and not bool(torch.isfinite(w).all()) and bool(torch.isfinite(v).all()):
            raise SpfbenchError(f"weight {k} overflows {precision} (|w| up to {v.abs().max().item():.3g}); save with"
                                " save_precision 'bf16' or 'fp32'")
        state[k] = w
    save_file(state, str(folder / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    unet.save_config(folder)


class Naive(TrainedMethod):
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
        save_unet(models.unet, folder / "unet", self.config.save_precision)

    @classmethod
    def apply_artifact(cls, pipe, folder: Path, config: TrainConfig) -> None:
        from diffusers import UNet2DConditionModel

        # loaded in the pipeline's dtype whatever the file's (an fp16 file is upcast exactly to an fp32 pipeline)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True, torch_dtype=pipe.unet.dtype)
        pipe.unet = unet.to(device=pipe.device)
