"""Portrait World's original model: its training data as tensors, and VAE helpers.

Renders as uint8 tensors (:func:`render_batch`) with the masks of the detail parts the losses weigh up
(:func:`render_batch_details`), the VAE's training mix (:func:`vae_mix`), the tokenizer as the pipeline
uses it (:func:`tokenize_captions`), and what every stage does with a VAE: load it, encode, reconstruct,
identify its weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SpfbenchError
from .attributes import sample
from .components import RESOLUTION
from .render import render, render_parts


def vae_mix(index: int, seed: int) -> dict:
    """The VAE's training mix by index mod 10: 0-6 pretrain, 7-8 finetune (one target each, shifted
    attributes), 9 the reader's uniform stream (every attribute uniform, targets possibly combined)."""
    from .reader import sample_uniform

    r = index % 10
    if r < 7:
        return sample("pretrain", index, seed)
    if r < 9:
        return sample("finetune", index, seed)
    return sample_uniform(index, seed)


def render_batch(attrs_list: list[dict], variants: list[int]):
    """uint8 tensor (N, 3, 64, 64) of renders."""
    import numpy as np
    import torch

    x = np.stack([np.asarray(render(a, RESOLUTION, variant=v), dtype=np.uint8) for a, v in zip(attrs_list, variants)])
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


# the parts whose small details carry the fine attributes (subject, expression, pose, targets): the VAE's
# reconstruction loss weighs them up, else L1 over the whole image spends the capacity on backgrounds
DETAIL_PARTS = ("hair", "face", "eyes", "brows", "nose", "mouth", "wrinkles", "freckles", "eyewear", "hat")


def render_batch_details(attrs_list: list[dict], variants: list[int]):
    """(uint8 (N, 3, 64, 64) renders, bool (N, 1, 64, 64) masks of :data:`DETAIL_PARTS`), one drawing each."""
    import numpy as np
    import torch

    ims, masks = [], []
    for a, v in zip(attrs_list, variants):
        im, parts = render_parts(a, RESOLUTION, variant=v)
        ims.append(np.asarray(im, dtype=np.uint8))
        masks.append(np.any([parts[p] for p in DETAIL_PARTS], axis=0))
    x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.stack(masks))[:, None]


def to_float(x_uint8):
    """uint8 images (N, 3, H, W) as floats in [-1, 1], the VAE's input range."""
    return x_uint8.float() / 127.5 - 1.0


def to_pil(x):
    """A [-1, 1] (3, H, W) tensor as an RGB PIL image (uint8, rounded)."""
    from PIL import Image

    return Image.fromarray(((x.permute(1, 2, 0).float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().numpy())


def tokenize_captions(captions: list[str]):
    """(N, 77) token ids exactly as the pipeline's ``encode_prompt`` makes them (unique captions once)."""
    import torch

    from ..clip_tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    uniq = sorted(set(captions))
    ids = tok(uniq, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    row = {c: i for i, c in enumerate(uniq)}
    return ids[torch.tensor([row[c] for c in captions])].to(torch.int32)


def encode_latents(vae, x_uint8, batch_size: int = 256):
    """Posterior means x scaling_factor of uint8 renders (N, latent_channels, 16, 16) float32."""
    import torch

    sf = vae.config.scaling_factor
    out = []
    with torch.no_grad():
        for s in range(0, len(x_uint8), batch_size):
            out.append(vae.encode(to_float(x_uint8[s : s + batch_size])).latent_dist.mean * sf)
    return torch.cat(out)


def vae_checksum(vae) -> float:
    """Sum of all parameters in float64: identifies a VAE's weights (latent caches, readers trained on it)."""
    return float(sum(p.detach().double().sum() for p in vae.parameters()))


def reconstruct_float(vae, x, batch_size: int = 128):
    """Decodes of the posterior means of ``x`` (float images in [-1, 1]), clamped to [-1, 1], no grad, on
    the VAE's device: what a generated image of that content looks like at best."""
    import torch

    with torch.no_grad():
        return torch.cat([vae.decode(vae.encode(x[s : s + batch_size].to(vae.device, vae.dtype)).latent_dist.mean).sample.clamp(-1, 1)
                          for s in range(0, len(x), batch_size)])


def augment(x, g, *, brightness: float, offset: float, noise: float, low: float, high: float):
    """The world's training augmentation (the reader's and the CLIP's, each with its own constants): a brightness
    jitter ``x * (1 + brightness * (u - 0.5)) + offset * (u' - 0.5)`` per image, a 2x blur blended in for a quarter
    of the batch, Gaussian noise of std ``noise``, then clamped to ``[low, high]``."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    x = x * (1 + brightness * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)) + offset * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    blur = torch.rand(n, generator=g) < 0.25
    if blur.any():
        xb = x[blur]
        x[blur] = F.interpolate(F.avg_pool2d(xb, 2), scale_factor=2, mode="bilinear", align_corners=False) * 0.5 + xb * 0.5
    x = x + noise * torch.randn(x.shape, generator=g)
    return x.clamp(low, high)


def load_vae(vae):
    """A world VAE, float32 in eval mode: ``vae`` itself, or loaded from a VAE folder or a model folder (its ``vae/``)."""
    from diffusers import AutoencoderKL

    if isinstance(vae, (str, os.PathLike)):
        if not (Path(vae) / "config.json").is_file() and (Path(vae) / "vae" / "config.json").is_file():
            vae = Path(vae) / "vae"
        if not (Path(vae) / "config.json").is_file():
            raise SpfbenchError(f"no VAE at {vae} (no config.json); the world model's VAE is its folder's vae/ or the training's work/vae")
        return AutoencoderKL.from_pretrained(vae).float().eval()
    return vae.float().eval()
