"""HPSv2.1 (overall quality, higher is better): Human Preference Score v2.1 (Wu et al., 2023).

Per triple: ``cos(E_I(customized), E_T(prompt))`` with both features L2-normalised, where the prompt is
the complete caption the customized image was generated from (base text + target text), and the model
is the HPS v2.1 fine-tune of open_clip ``ViT-H-14`` (checkpoint ``HPS_v2.1_compressed.pt`` from hub
``xswu/HPSv2``; its ``state_dict`` keys equal stock open_clip ``ViT-H-14``'s one to one, so it loads
strictly into the stock model and the broken ``hpsv2`` wheel is not needed). Preprocessing is the HPS
one: resize the longest side to 224 (bicubic), pad to 224 x 224 with black, OpenAI mean/std. GELU (not
QuickGELU: the base is a LAION ViT-H). Raw cosine, typically 0.2-0.35; no logit scale. Scores of v2.0
and v2.1 are not comparable, hence the id ``hpsv2@v2.1``.

Preset ``full-random``: the stock ``ViT-H-14`` the real loader builds (``pretrained=None``), left with
open_clip's own initialisation under a fixed seed instead of the checkpoint (:func:`full_random_hps`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MissingWeightsError, SpfbenchError
from .base import Backbones, Batch, PerSampleMetric, seeded
from .clip import ClipBackbone, tiny_clip

HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
HPS_ARCH = "ViT-H-14"
FULL_RANDOM_SEED = 1


def hps_checkpoint(bb: Backbones | None = None) -> str | None:
    """The local HPS v2.1 file: ``--weights hpsv2=PATH`` first, then the offline Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    given = bb.weight_path("hpsv2") if bb else None
    if given:
        return given
    hit = try_to_load_from_cache(HPS_REPO, HPS_FILE)
    return hit if isinstance(hit, str) else None


def load_hps_state(model: torch.nn.Module, path: str | Path) -> None:
    """Load an HPS checkpoint (``{'state_dict': ...}`` or a bare state dict) strictly, without unpickling code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file, or a pickle holding code
        raise SpfbenchError(f"cannot read HPS checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    apply_hps_state(model, ckpt, source=str(path))


def apply_hps_state(model: torch.nn.Module, ckpt, source: str = "checkpoint") -> None:
    """Strict load of an HPS checkpoint's tensors: ``{'state_dict': ...}`` or bare, ``module.`` prefixes removed."""
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise SpfbenchError(f"{source} holds no state dict (expected {{'state_dict': ...}} as in {HPS_FILE})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise SpfbenchError(
            f"{source} does not match open_clip {HPS_ARCH}: {len(result.missing_keys)} missing keys"
            f" (e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )


def hps_preprocess(model):
    """HPS's eval transform: longest side to the model's size (bicubic), centred black padding, OpenAI mean/std."""
    from open_clip.transform import image_transform

    return image_transform(model.visual.image_size, is_train=False, resize_mode="longest", fill_color=0)


@Backbones.register("hpsv2")
def _load_hps(bb: Backbones) -> ClipBackbone:
    import open_clip

    if not bb.full_size:
        model, _, tokenizer = tiny_clip(seed=1, quick_gelu=False)
        return ClipBackbone(model, hps_preprocess(model), tokenizer, bb.device, bb.dtype)
    if bb.random_weights:
        model = full_random_hps(device=bb.init_device)
        return ClipBackbone(model, hps_preprocess(model), open_clip.get_tokenizer(HPS_ARCH), bb.device, bb.dtype)
    path = hps_checkpoint(bb)
    if path is None or not Path(path).is_file():
        raise MissingWeightsError(
            f"missing weights: HPSv2.1 {HPS_FILE} (about 2 GB) from hf://{HPS_REPO}; `huggingface-cli download {HPS_REPO}"
            f" {HPS_FILE}` on a connected machine, or pass --weights hpsv2=/path/to/{HPS_FILE}"
        )
    model = open_clip.create_model(HPS_ARCH, pretrained=None)
    load_hps_state(model, path)
    return ClipBackbone(model, hps_preprocess(model), open_clip.get_tokenizer(HPS_ARCH), bb.device, bb.dtype)


def full_random_hps(seed: int = FULL_RANDOM_SEED, device: str | torch.device = "cpu"):
    """Stock open_clip ``ViT-H-14`` (GELU), as :func:`_load_hps` builds it before loading the checkpoint, with
    open_clip's random initialisation under ``seed``. ``device="meta"``: shapes only."""
    import open_clip

    with seeded(seed):
        return open_clip.create_model(HPS_ARCH, pretrained=None, device=device)


class HpsV2(PerSampleMetric):
    id, column, higher_is_better = "hpsv2@v2.1", "HPSv2", True

    def score(self, batch: Batch) -> list[float]:
        if batch.prompts is None:
            raise SpfbenchError("HPSv2 scores an image against the prompt it was generated from: the batch has no prompts")
        hps = self.backbones.get("hpsv2")
        a, t = hps.encode_images(batch.customized), hps.encode_texts(batch.prompts)
        return (a * t).sum(-1).tolist()


def weight_rows() -> list[dict]:
    path = hps_checkpoint()
    return [{"group": "metric", "name": "hpsv2", "what": "HPS v2.1 (open_clip ViT-H-14 fine-tune)",
             "source": f"hf://{HPS_REPO}/{HPS_FILE}", "size": "~2 GB", "present": path is not None, "path": path}]
