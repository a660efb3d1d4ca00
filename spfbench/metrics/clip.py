"""CLIP-I and CLIP-T (docs/metrics.md), raw cosine as in SPF-Portrait's Table 1.

* CLIP-I (preservation): cos(E_I(original), E_I(customized)); the paper's values are 0.60-0.88.
* CLIP-T (responsiveness): cos(E_I(customized), E_T(target text)); the paper's values are 0.17-0.30.
  The text is the *target text* alone (the attribute asked for), not the complete caption.

Both use one shared CLIP: open_clip ``ViT-L-14`` with OpenAI's weights (QuickGELU forced: OpenAI
trained with it, and open_clip 3.3 only warns when the config disagrees), OpenAI preprocessing
(resize shortest side to 224 bicubic, centre crop, OpenAI mean/std) on the PIL image, features
L2-normalised. ``ViT-B-32`` is selectable. No 100x or 2.5x rescaling, no clamping at 0.

Preset ``full-random``: the same open_clip model (QuickGELU) and preprocessing, ``pretrained=None``, its
own initialisation under a fixed seed (:func:`full_random_clip`).
"""

from __future__ import annotations

import torch

from .base import Backbones, Batch, PairwiseMetric, PerSampleMetric, module_sha256, seeded

# backbone key -> (open_clip model name, hub repo holding OpenAI's weights in open_clip format)
CLIP_MODELS = {
    "vit-l-14": ("ViT-L-14", "timm/vit_large_patch14_clip_224.openai"),
    "vit-b-32": ("ViT-B-32", "timm/vit_base_patch32_clip_224.openai"),
}
FULL_RANDOM_SEED = 0


class ClipBackbone:
    """An open_clip model with its eval preprocessing; encodes PIL images and texts to unit vectors."""

    def __init__(self, model, preprocess, tokenizer, device, dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.preprocess, self.tokenizer, self.device, self.dtype = preprocess, tokenizer, device, dtype

    def fingerprint(self) -> str:
        """The model's tensors and the preprocessing (both decide the features)."""
        return module_sha256(self.model) + "|" + repr(self.preprocess)

    @torch.inference_mode()
    def encode_images(self, images) -> torch.Tensor:
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device, self.dtype)
        return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        t = self.tokenizer(texts).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(t).float(), dim=-1)


def _load_clip(bb: Backbones, key: str) -> ClipBackbone:
    import open_clip

    name, _ = CLIP_MODELS[key]
    given = bb.weight_path(f"clip-{key}")
    if not bb.full_size:  # tiny; a given file: a tiny CLIP's state dict (safetensors), e.g. another seed's
        model, preprocess, tokenizer = tiny_clip(seed=0)
        if given:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(given), strict=True)
        return ClipBackbone(model, preprocess, tokenizer, bb.device, bb.dtype)
    if bb.random_weights:
        return ClipBackbone(*full_random_clip(key, device=bb.init_device), bb.device, bb.dtype)
    # a local checkpoint (--weights clip-KEY=PATH) in open_clip's format, else OpenAI's from the hub cache
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=given or "openai", force_quick_gelu=True)
    return ClipBackbone(model, preprocess, open_clip.get_tokenizer(name), bb.device, bb.dtype)


def full_random_clip(key: str, seed: int = FULL_RANDOM_SEED, device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) of the published CLIP ``key`` (open_clip, QuickGELU) with open_clip's
    own random initialisation under ``seed``. The preprocessing is the one open_clip builds for OpenAI's
    weights (same configuration: 224 px, bicubic, shortest side, centre crop, OpenAI mean/std).
    ``device="meta"``: shapes only, no memory."""
    import open_clip

    name, _ = CLIP_MODELS[key]
    with seeded(seed):
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, force_quick_gelu=True, device=device)
    return model, preprocess, open_clip.get_tokenizer(name)


def tiny_clip(seed: int = 0, quick_gelu: bool = True, resize_mode: str = "shortest"):
    """A small random-weight CLIP of open_clip's own class (real BPE tokenizer, 32 px).

    Same module tree (parameter names) as every open_clip ViT CLIP, ViT-L-14 and ViT-H-14 included.
    """
    import open_clip
    from open_clip.transform import image_transform

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(
            embed_dim=32,
            vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
            text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
            quick_gelu=quick_gelu,
        )
    preprocess = image_transform(
        32, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD, resize_mode=resize_mode
    )
    return model, preprocess, open_clip.get_tokenizer("ViT-B-32")


for _key in CLIP_MODELS:
    Backbones.register(f"clip-{_key}")(lambda bb, k=_key: _load_clip(bb, k))


class ClipI(PairwiseMetric):
    """The original's side: its unit image embedding (``embedding``, float32)."""

    id, column, higher_is_better, backbone = "clip-i@vit-l-14", "CLIP-I", True, "vit-l-14"

    def feature_backbones(self) -> tuple[str, ...]:
        return (f"clip-{self.backbone}",)

    def original_features(self, ids: list[str], images: list) -> dict[str, dict[str, torch.Tensor]]:
        e = self.backbones.get(f"clip-{self.backbone}").encode_images(images).cpu()
        return {tid: {"embedding": e[i].clone()} for i, tid in enumerate(ids)}

    def score_pairs(self, batch: Batch, features: list[dict[str, torch.Tensor]]) -> list[float]:
        clip = self.backbones.get(f"clip-{self.backbone}")
        b = clip.encode_images(batch.customized)
        a = torch.stack([f["embedding"] for f in features]).to(b.device)
        return (a * b).sum(-1).tolist()


class ClipT(PerSampleMetric):
    id, column, higher_is_better, backbone = "clip-t@vit-l-14", "CLIP-T", True, "vit-l-14"

    def score(self, batch: Batch) -> list[float]:
        clip = self.backbones.get(f"clip-{self.backbone}")
        a, t = clip.encode_images(batch.customized), clip.encode_texts(batch.target_texts)
        return (a * t).sum(-1).tolist()


class ClipIB32(ClipI):
    id, backbone = "clip-i@vit-b-32", "vit-b-32"


class ClipTB32(ClipT):
    id, backbone = "clip-t@vit-b-32", "vit-b-32"


def weight_rows() -> list[dict]:
    from huggingface_hub import try_to_load_from_cache

    rows = []
    for key, (name, repo) in CLIP_MODELS.items():
        hits = [try_to_load_from_cache(repo, f) for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")]
        path = next((h for h in hits if isinstance(h, str)), None)
        rows.append({"group": "metric", "name": f"clip-{key}", "what": f"CLIP {name} OpenAI (CLIP-I, CLIP-T)",
                     "source": f"hf://{repo}", "size": "1.71 GB" if key == "vit-l-14" else "605 MB",
                     "present": path is not None, "path": path})
    return rows
