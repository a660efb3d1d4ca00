"""The MPS network (Kwai-Kolors/MPS, CVPR 2024), rebuilt so its ``state_dict()`` equals the published one.

The published ``MPS_overall_checkpoint.pth`` is a whole pickled module of the authors' class
``trainer.models.clip_model.CLIPModel``; its state-dict keys are that module tree's attribute paths:

* ``model.``: a Hugging Face ``CLIPModel`` (their subclass ``XCLIPModel`` adds no weights) with the
  LAION ViT-H-14 configuration (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: text width 1024, 24 layers;
  vision width 1280, 32 layers, patch 14, 224 px; projection 1024; GELU, not QuickGELU);
* ``cross_model.``: ``Cross_model(dim=1024, layer_num=4, heads=16)`` (dim_head 64, ff_mult 4), a stack of
  ``layers.{i}.0.fn`` = cross-attention (image tokens attend to the prompt's tokens; multi-query: one
  64-d key/value head shared by 16 query heads; a parallel SwiGLU feed-forward on the normed queries)
  and ``layers.{i}.1.fn`` = a PaLM-style parallel block (self-attention with rotary embeddings, multi-
  query, fused q/k/v/ff projection, SwiGLU). ``fn`` comes from their ``Residual`` wrapper. Their
  LayerNorm has a learned weight and a fixed zero bias registered as a (persistent) buffer, and the
  rotary ``inv_freq`` is a persistent buffer too: both are in the checkpoint, so both are buffers here.

This is our own implementation of that definition (no code of theirs), with the same module tree so the
checkpoint loads strictly. ``features`` and ``score`` follow the official inference: token-level text
features ``text_projection(last_hidden_state)``, the EOS feature ``text_projection(pooler_output)``,
patch-level image features ``visual_projection(last_hidden_state)`` (encoder output, no post-LayerNorm),
a condition mask on the prompt tokens, then ``logit_scale.exp() * cos(EOS, cross_model(...)[:, 0])``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Published configuration of the cross model (their CLIPModel.__init__: Cross_model(dim=1024, layer_num=4,
# heads=16), the class defaults dim_head=64, ff_mult=4).
CROSS_FULL = {"dim": 1024, "layer_num": 4, "heads": 16, "dim_head": 64, "ff_mult": 4}


class BiasFreeLayerNorm(nn.Module):
    """LayerNorm with a learned gain and a constant zero bias kept as a buffer (as in the checkpoint)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))  # persistent: the published file holds it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class Residual(nn.Module):
    """``x + fn(x, ...)``; the attribute is named ``fn`` because the checkpoint's keys say so."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args):
        return self.fn(x, *args) + x


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, n: int, device) -> torch.Tensor:
        """Angles (n, dim): position x frequency, the half-size table repeated twice."""
        # in float32 whatever the model dtype: positions x frequencies lose precision in fp16
        t = torch.arange(n, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.float())
        return torch.cat((freqs, freqs), dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rotary(angles: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x * angles.cos() + rotate_half(x) * angles.sin()


class SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class CrossAttention(nn.Module):
    """Queries from ``x`` (16 heads), one shared key/value head from the context; parallel SwiGLU FF.

    ``mask`` is additive, broadcastable to (batch, query, context): 0 keeps a context token, -inf drops it.
    """

    def __init__(self, dim: int, dim_head: int, heads: int, ff_mult: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        inner, ff_inner = heads * dim_head, ff_mult * dim
        self.norm = BiasFreeLayerNorm(dim)
        self.context_norm = nn.Identity()  # norm_context=False in the published model: no weights
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, ff_inner * 2, bias=False), SwiGLU(), nn.Linear(ff_inner, dim, bias=False))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        context = self.context_norm(context)
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2) * self.scale  # (b, h, n, d)
        k, v = self.to_kv(context).chunk(2, dim=-1)  # (b, m, d) each, one head shared by all
        sim = q @ k.unsqueeze(1).transpose(-1, -2)  # (b, h, n, m)
        sim = sim + mask.unsqueeze(1)  # mask (b, n|1, m) -> every head
        attn = sim.softmax(dim=-1)
        out = (attn @ v.unsqueeze(1)).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out) + self.ff(x)


class ParallelTransformerBlock(nn.Module):
    """Pre-norm block: rotary multi-query self-attention and a SwiGLU FF in parallel, one fused projection."""

    def __init__(self, dim: int, dim_head: int, heads: int, ff_mult: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        inner, ff_inner = heads * dim_head, ff_mult * dim
        self.fused_dims = (inner, dim_head, dim_head, ff_inner * 2)
        self.norm = BiasFreeLayerNorm(dim)
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(inner, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(ff_inner, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)
        q = q.view(b, n, self.heads, -1).transpose(1, 2)  # (b, h, n, d)
        angles = self.rotary_emb(n, x.device).to(x.dtype)
        q, k = apply_rotary(angles, q) * self.scale, apply_rotary(angles, k)
        attn = (q @ k.unsqueeze(1).transpose(-1, -2)).softmax(dim=-1)  # (b, h, n, n)
        out = (attn @ v.unsqueeze(1)).transpose(1, 2).reshape(b, n, -1)
        return self.attn_out(out) + self.ff_out(ff)


class CrossModel(nn.Module):
    def __init__(self, dim: int, layer_num: int, heads: int, dim_head: int = 64, ff_mult: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([
                Residual(CrossAttention(dim, dim_head, heads, ff_mult)),
                Residual(ParallelTransformerBlock(dim, dim_head, heads, ff_mult)),
            ])
            for _ in range(layer_num)
        )

    def forward(self, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for cross, block in self.layers:
            query = block(cross(query, context, mask))
        return query


def clip_config(full: bool = True):
    """The LAION ViT-H-14 ``CLIPConfig`` of MPS (``full``), or a tiny one of the same kind for tests.

    Set explicitly: ``hidden_act="gelu"`` (transformers' CLIP default is QuickGELU, LAION's models use
    GELU) and ``eos_token_id=2``: the legacy value of the published config, which makes transformers
    pool the text at the position of the highest token id (the first ``<|endoftext|>``), as when MPS was
    trained (the same as the ``text_model.eos_token_id = 2`` fix that unpickled models need).
    """
    from transformers import CLIPConfig

    if full:
        text = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24)
        vision = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                      patch_size=14, image_size=224)
        proj = 1024
    else:
        text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
        vision = dict(hidden_size=48, intermediate_size=96, num_attention_heads=2, num_hidden_layers=2,
                      patch_size=8, image_size=32)
        proj = 32
    common = dict(hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=proj)
    text.update(common, vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision.update(common)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj, logit_scale_init_value=2.6592)


CROSS_TINY = {"dim": 32, "layer_num": 2, "heads": 2, "dim_head": 16, "ff_mult": 4}


class MpsModel(nn.Module):
    """``model`` (HF CLIPModel) + ``cross_model``: the published module tree, our code."""

    def __init__(self, config=None, cross: dict | None = None):
        super().__init__()
        from transformers import CLIPModel

        config = config if config is not None else clip_config(full=True)
        cross = dict(cross if cross is not None else CROSS_FULL)
        if cross["dim"] != config.projection_dim:
            raise ValueError(f"cross model dim {cross['dim']} != CLIP projection dim {config.projection_dim}")
        self.model = CLIPModel(config)
        self.cross_model = CrossModel(**cross)
        self.cross_config = cross

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def text_features(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features (B, 77, D) and the EOS feature (B, D), both through ``text_projection``."""
        out = self.model.text_model(input_ids=input_ids)
        proj = self.model.text_projection
        return proj(out.last_hidden_state), proj(out.pooler_output)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch-level features (B, 1 + patches, D): ``visual_projection`` of the encoder output."""
        out = self.model.vision_model(pixel_values=pixel_values)
        return self.model.visual_projection(out.last_hidden_state)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, condition_tokens: torch.Tensor,
                threshold: float) -> torch.Tensor:
        """Scores (B,) of images against their prompts, given the condition's token features (1|B, L, D)."""
        text_tokens, text_eos = self.text_features(input_ids)
        image_tokens = self.image_features(pixel_values)
        mask = condition_mask(text_tokens, condition_tokens, threshold).to(image_tokens.dtype)
        fused = self.cross_model(image_tokens, text_tokens, mask[:, None, :])[:, 0]
        cos = F.cosine_similarity(text_eos.float(), fused.float(), dim=-1)
        return self.logit_scale.float().exp() * cos


def condition_mask(text_tokens: torch.Tensor, condition_tokens: torch.Tensor, threshold: float) -> torch.Tensor:
    """Additive mask (B, L) on the prompt tokens: 0 where kept, -inf where dropped.

    For each prompt token: the highest dot product with any token of the condition string (unnormalised
    projected features), divided by the highest such value of the same prompt; kept when ``> threshold``.
    The official inference normalises by the maximum over its (one-prompt) batch; per prompt here, so a
    score never depends on what else is in the batch.
    """
    sim = torch.einsum("bid,bjd->bij", text_tokens.float(), condition_tokens.float().expand(text_tokens.shape[0], -1, -1))
    best = sim.amax(dim=-1)  # (B, L): best condition token for each prompt token
    rel = best / best.amax(dim=-1, keepdim=True)
    return torch.zeros_like(rel).masked_fill(~(rel > threshold), float("-inf"))
