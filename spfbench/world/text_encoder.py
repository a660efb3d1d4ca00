"""The world original model's frozen text encoder: the world CLIP's text tower as a ``CLIPTextModel``.

Stable Diffusion 1.5 conditions its UNet on the last hidden state of a *frozen* CLIP ViT-L/14 text
tower, trained contrastively on far more captions than the UNet ever sees: it knows "hat" and
"freckles" before any fine-tuning, and fine-tuning changes only the UNet's response to them. Portrait
World mirrors that: the world CLIP (``spfbench/world/clip.py``) was trained contrastively on captions
of every render, targets included; its text tower, converted here to transformers' ``CLIPTextModel``
(the class SD's pipeline holds), is the original model's text encoder, frozen while the UNet trains on
``pretrain`` renders, which never show a target. docs/world.md, "Text encoder", says why.

* :func:`from_world_clip`: the conversion (open_clip's ``nn.MultiheadAttention`` in-projection split into
  q/k/v; the same layer norms, GELU and causal mask), exact to float32 rounding (tested);
* :func:`target_separability`: does a frozen encoder tell the targets apart? Per base caption and
  target text, the *target-part feature* (the last hidden state of ``join_caption(base, target)``
  averaged over the target's tokens and the end token); a leave-one-base-caption-out nearest-centroid
  classifier names the target; plus the features' pairwise cosines.
"""

from __future__ import annotations

import itertools

from ..captions import join_caption
from ..errors import SpfbenchError
from .attributes import TARGET_TEXTS

# Bar for the original model's text encoder (issue 20): leave-one-base-caption-out nearest-centroid
# accuracy over 20 base captions of the world's vocabulary
SEPARABILITY_BAR = 0.90
N_BASES = 20
# words the world never uses (their features are reported beside the targets', not classified)
UNUSED_TEXTS = ("a scarf", "a dog")


def from_world_clip(clip=None):
    """The text tower of ``clip`` (an ``open_clip.CLIP`` such as :func:`spfbench.world.clip.load_world_clip`'s;
    default: the shipped world CLIP) as a transformers ``CLIPTextModel`` (float32, eval mode, frozen).

    ``last_hidden_state`` equals open_clip's ``ln_final(transformer(token_embedding + positional_embedding))``
    at every position; the pooled output is the end token's (``eos_token_id`` 49407), as open_clip's
    ``argmax`` pooling picks it. The projection is not part of a ``CLIPTextModel`` (SD conditions on the
    hidden states)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    if clip is None:
        from .clip import load_world_clip

        clip = load_world_clip()[0]
    blocks = clip.transformer.resblocks
    width, heads = clip.token_embedding.weight.shape[1], blocks[0].attn.num_heads
    gelu = type(blocks[0].mlp.gelu).__name__
    if gelu not in ("GELU", "QuickGELU"):
        raise SpfbenchError(f"the CLIP's text MLP uses {gelu}; only GELU and QuickGELU have a CLIPTextModel equivalent")
    cfg = CLIPTextConfig(
        vocab_size=clip.token_embedding.weight.shape[0],
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=heads,
        max_position_embeddings=clip.positional_embedding.shape[0],
        hidden_act="gelu" if gelu == "GELU" else "quick_gelu",
        layer_norm_eps=blocks[0].ln_1.eps,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=width,
    )
    sd = {
        "embeddings.token_embedding.weight": clip.token_embedding.weight,
        "embeddings.position_embedding.weight": clip.positional_embedding,
        "final_layer_norm.weight": clip.ln_final.weight,
        "final_layer_norm.bias": clip.ln_final.bias,
    }
    for i, blk in enumerate(blocks):
        p = f"encoder.layers.{i}."
        w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
        for j, name in enumerate("qkv"):
            sd[p + f"self_attn.{name}_proj.weight"] = w[j * width : (j + 1) * width]
            sd[p + f"self_attn.{name}_proj.bias"] = b[j * width : (j + 1) * width]
        sd |= {
            p + "self_attn.out_proj.weight": blk.attn.out_proj.weight,
            p + "self_attn.out_proj.bias": blk.attn.out_proj.bias,
            p + "layer_norm1.weight": blk.ln_1.weight,
            p + "layer_norm1.bias": blk.ln_1.bias,
            p + "layer_norm2.weight": blk.ln_2.weight,
            p + "layer_norm2.bias": blk.ln_2.bias,
            p + "mlp.fc1.weight": blk.mlp.c_fc.weight,
            p + "mlp.fc1.bias": blk.mlp.c_fc.bias,
            p + "mlp.fc2.weight": blk.mlp.c_proj.weight,
            p + "mlp.fc2.bias": blk.mlp.c_proj.bias,
        }
    te = CLIPTextModel(cfg)
    own = te.state_dict()
    prefix = "text_model." if next(iter(own)).startswith("text_model.") else ""  # transformers 4 vs 5 key names
    te.load_state_dict({prefix + k: v.detach().float().clone() for k, v in sd.items()}, strict=True)
    te.requires_grad_(False)
    return te.eval()


def target_span(tokenizer, base: str, target: str) -> tuple[list[int], int, int]:
    """Token ids of ``join_caption(base, target)`` and the [start, end] positions of the target's tokens
    up to and including the end token."""
    text = join_caption(base, target)
    ids = tokenizer(text).input_ids
    if len(ids) > tokenizer.model_max_length:
        raise SpfbenchError(f"{text!r} has {len(ids)} tokens, more than the encoder's {tokenizer.model_max_length}: its target would be cut")
    prefix = tokenizer(text[: -len(target.strip())].rstrip()).input_ids[:-1]  # BOS .. "," (no end token)
    if ids[: len(prefix)] != prefix or ids[-1] != tokenizer.eos_token_id or len(ids) <= len(prefix) + 1:
        raise SpfbenchError(f"cannot locate the target {target!r} in the tokens of {text!r}")
    return ids, len(prefix), len(ids) - 1


def target_features(text_encoder, tokenizer, base: str, targets) -> "torch.Tensor":  # noqa: F821
    """(T, hidden) target-part features: for each target, the last hidden state of
    ``join_caption(base, target)`` (padded to the tokenizer's 77 positions, as the pipeline encodes it)
    averaged over the target's tokens and the end token."""
    import torch

    spans = [target_span(tokenizer, base, t) for t in targets]
    pad = tokenizer.pad_token_id
    length = tokenizer.model_max_length
    ids = torch.tensor([s[0] + [pad] * (length - len(s[0])) for s in spans])
    device = next(text_encoder.parameters()).device
    with torch.no_grad():
        h = text_encoder(ids.to(device))[0].float().cpu()
    return torch.stack([h[i, a : b + 1].mean(0) for i, (_, a, b) in enumerate(spans)])


def target_separability(text_encoder, tokenizer, bases=None, targets=None, unused=UNUSED_TEXTS) -> dict:
    """How well a frozen text encoder tells the target texts apart after a base caption.

    ``bases``: base captions (default: the first :data:`N_BASES` rows of ``world_captions(N_BASES, 0)``);
    ``targets``: the texts to classify (default: the world's five). For every base caption b, each
    target's feature is assigned to the nearest (cosine) of the targets' centroids computed from the
    *other* base captions (leave-one-base-caption-out). Returns ``accuracy`` (over len(bases) x
    len(targets)), ``per_target`` accuracy, ``cosine`` (pair "a | b" -> the pair's feature cosine
    averaged over the base captions, targets and ``unused`` words), ``max_target_cosine``, ``passed``
    (accuracy >= :data:`SEPARABILITY_BAR`), ``n_bases``."""
    import torch
    import torch.nn.functional as F

    if bases is None:
        from .datasets import world_captions

        bases = [r["base_caption"] for r in world_captions(N_BASES, 0)]
    targets = list(targets or TARGET_TEXTS)
    if len(bases) < 2 or len(targets) < 2:
        raise SpfbenchError("target_separability needs at least 2 base captions and 2 targets")
    texts = targets + [u for u in unused if u not in targets]
    feats = torch.stack([target_features(text_encoder, tokenizer, b, texts) for b in bases])  # (B, T', H)
    unit = F.normalize(feats, dim=-1)
    tf = unit[:, : len(targets)]
    hits = torch.zeros(len(bases), len(targets), dtype=torch.bool)
    for i in range(len(bases)):
        others = torch.cat([tf[:i], tf[i + 1 :]])
        centroids = F.normalize(others.mean(0), dim=-1)  # (T, H)
        hits[i] = (tf[i] @ centroids.T).argmax(1) == torch.arange(len(targets))
    cos = torch.einsum("bih,bjh->ij", unit, unit) / len(bases)
    pairs = {f"{texts[i]} | {texts[j]}": round(float(cos[i, j]), 4) for i, j in itertools.combinations(range(len(texts)), 2)}
    target_pairs = [float(cos[i, j]) for i, j in itertools.combinations(range(len(targets)), 2)]
    acc = float(hits.float().mean())
    return {
        "accuracy": round(acc, 4),
        "per_target": {t: round(float(hits[:, k].float().mean()), 4) for k, t in enumerate(targets)},
        "cosine": pairs,
        "max_target_cosine": round(max(target_pairs), 4),
        "min_target_cosine": round(min(target_pairs), 4),
        "n_bases": len(bases),
        "bar": SEPARABILITY_BAR,
        "passed": acc >= SEPARABILITY_BAR,
        "definition": "leave-one-base-caption-out nearest-centroid accuracy of the target-part features "
        "(last hidden state of join_caption(base, target), mean over the target's tokens and the end token)",
    }
