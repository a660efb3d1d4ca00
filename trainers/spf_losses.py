"""SPF-Portrait's losses and its Semantic-Aware Fine-controllable Map (paper section 3, eq. 3-12).

Pure, batched tensor functions: no model is loaded here. The caller runs the two paths, captures the
cross-attention tensors of every cross-attention layer j (queries ``Q^j`` (B, heads, N_img, d), keys
``K^j`` (B, heads, N_txt, d), probabilities ``A^j`` (B, heads, N_img, N_txt)), decodes x0-hat and
encodes images and texts with CLIP, then calls these functions. Every decision the paper leaves open is
written, with its reason, in ``docs/spf.md``; the short version is in each docstring.

Notation (the paper's): ``ref`` is the reference path (the original model, frozen, fed E_base), ``res``
the response path (trainable cross-attention, fed [E_base, E_tar]). Reference-path inputs, the map
M-hat, the phrase weights gamma and every CLIP target are treated as constants (detached): gradients
reach the response-path inputs only.

* ``text_consistent_loss``   eq. 3 (eq. 8's L_M-text when ``m_hat`` is given)
* ``fine_grained_loss``      eq. 4 (eq. 8's L_M-fine when ``m_hat`` is given)
* ``noise_difference_map``   eq. 5, M
* ``phrase_attention_maps``  eq. 6, A_base[i]
* ``sfcm``                   eq. 7, M-hat
* ``phrase_gamma``           eq. 7, gamma(i) = cos_CLIP(phrase i, target text)
* ``predict_x0``             eq. 9, x0-hat (epsilon, v or sample prediction)
* ``enhanced_loss``          eq. 9-10, 1 - cos(Delta(x0-hat, E_tar), Delta(x0, E_tar))
* ``spf_loss``               eq. 12
* caption helpers (the phrases themselves: spfbench.captions.split_base_phrases): ``phrase_token_positions``, ``base_token_positions``,
  ``base_token_batch``, ``phrase_token_batch``, ``phrase_token_matrix``; ``clip_preprocess``
  (differentiable CLIP image preprocessing of a decoded image).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from spfbench.captions import base_text, phrase_spans, split_base_phrases

MAP_SIZE = 64  # "All attention maps and score maps are upsampled at a resolution of 64 x 64" (sec. 4.1)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Layers = torch.Tensor | Sequence[torch.Tensor]


# ----------------------------------------------------------------------------------------------
# small helpers


def _as_layers(x: Layers, name: str) -> list[torch.Tensor]:
    layers = [x] if isinstance(x, torch.Tensor) else list(x)
    if not layers:
        raise ValueError(f"{name}: no cross-attention layer given")
    return layers


def _fp(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in fp32 (fp64 kept as is), whatever the autocast/half precision of inputs."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _layer_hw(n: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of a UNet feature map with ``n`` positions.

    Square when ``latent_hw`` is None; otherwise the latent's (H, W) halved (ceil, as SD's stride-2
    convolutions with padding 1 do) until the product is ``n``.
    """
    if latent_hw is None:
        r = math.isqrt(n)
        if r * r != n:
            raise ValueError(f"{n} spatial positions is not a square feature map; pass latent_hw=(H, W)")
        return r, r
    h, w = int(latent_hw[0]), int(latent_hw[1])
    while h * w > n:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != n:
        raise ValueError(f"{n} spatial positions is no downsampling of a {latent_hw} latent")
    return h, w


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (B, C, h, w): area averaging when shrinking, bilinear when enlarging."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if size[0] <= x.shape[-2] and size[1] <= x.shape[-1]:
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _normalize_map(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Normalise each map (the last two dims) to [0, 1]: ``minmax`` (x - min) / (max - min),
    ``max`` x / max (x >= 0), ``none``. A constant map becomes zeros under ``minmax``."""
    if mode == "none":
        return x
    flat = x.flatten(-2)
    hi = flat.amax(-1)[..., None, None]
    if mode == "max":
        return x / hi.clamp_min(1e-12)
    if mode == "minmax":
        lo = flat.amin(-1)[..., None, None]
        return (x - lo) / (hi - lo).clamp_min(1e-12)
    raise ValueError(f"unknown normalisation {mode!r} (minmax, max, none)")


def spatial_weight(m_hat: torch.Tensor | None, n_img: int, latent_hw: tuple[int, int] | None = None):
    """The alignment weight (1 - M-hat) at one layer's resolution: (B, N_img), or None without a map.

    M-hat (B, S, S) is detached (a stop-gradient guide, see ``sfcm``) and resized to the layer's (h, w)
    by area averaging (each feature position gets the mean weight of the 64x64 cells it covers).
    """
    if m_hat is None:
        return None
    w = 1.0 - _fp(m_hat.detach())
    if w.dim() == 2:
        w = w[None]
    hw = _layer_hw(n_img, latent_hw)
    return _resize(w[:, None], hw).flatten(1)


NORMS = ("mse", "l2", "l2sq")


def split_heads(h: torch.Tensor, heads: int) -> torch.Tensor:
    """Features (B, N, C) as (B, heads, N, C / heads), the layout of a captured Q: a layer's input
    features used in Q's place by the ``features="hidden"`` reading (docs/spf.md)."""
    b, n, c = h.shape
    if c % heads:
        raise ValueError(f"{c} feature channels do not split into {heads} heads")
    return h.reshape(b, n, heads, c // heads).transpose(1, 2)


def _reduce_layer(diff: torch.Tensor, norm: str, count: torch.Tensor | float | None = None) -> torch.Tensor:
    """One layer's loss from its (already masked) difference (B, ...): ``mse`` sum(diff^2)/count
    (count defaults to diff.numel()), ``l2`` the per-sample Frobenius norm averaged over the batch, or
    ``l2sq`` the per-sample squared Frobenius norm (sum of squares) averaged over the batch."""
    if norm == "mse":
        return diff.pow(2).sum() / (diff.numel() if count is None else count)
    if norm == "l2":
        return torch.linalg.vector_norm(diff.flatten(1), dim=1).mean()
    if norm == "l2sq":
        return diff.flatten(1).pow(2).sum(1).mean()
    raise ValueError(f"unknown norm {norm!r} ({', '.join(NORMS)})")


def _reduce_layers(per_layer: list[torch.Tensor], layer_reduction: str) -> torch.Tensor:
    total = torch.stack(per_layer)
    if layer_reduction == "mean":
        return total.mean()
    if layer_reduction == "sum":
        return total.sum()
    raise ValueError(f"unknown layer reduction {layer_reduction!r} (mean, sum)")


# ----------------------------------------------------------------------------------------------
# eq. 3: L_text-consistent


def _select_tokens(k: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Keys (B, H, T, d) at token positions ``idx`` ((N,) for the whole batch or (B, N) per sample)."""
    if idx is None:
        return k
    idx = idx.to(k.device)
    if idx.dim() == 1:
        return k[:, :, idx]
    b, h, _, d = k.shape
    return k.gather(2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))


def attention_features(
    q: torch.Tensor, k: torch.Tensor, weight: torch.Tensor | None = None, mask_mode: str = "pool",
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """F = Softmax(K Q^T / sqrt(d)) Q, "Attention(K, Q, Q)" of eq. 3: (B, H, N_tok, d).

    ``values`` (B, H, N_img, d_v), e.g. the layer's input features split into heads, replaces the
    pooled Q (the softmax still comes from K and Q): F = Softmax(K Q^T / sqrt(d)) values.

    Each text token's key attends over the image positions (softmax over N_img) and pools the queries.
    ``weight`` (B, N_img), the spatial (1 - M-hat), applies inside that pooling:

    * ``pool`` (default): F^M = sum_n softmax_n * w_n * Q_n, i.e. the Hadamard product of eq. 8 is taken
      on the spatial summands of F before they are summed; the softmax still sees every position, so
      w = 1 gives eq. 3 exactly and w = 0 removes a position's contribution.
    * ``renorm``: the pooling weights softmax_n * w_n are renormalised to sum to one over the kept
      positions (F is then a mean of Q over the non-target region only; all-zero w gives F = 0).
    """
    q, k = _fp(q), _fp(k)
    v = q if values is None else _fp(values)
    p = torch.softmax(torch.matmul(k, q.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)  # (B, H, T, N)
    if weight is None:
        return torch.matmul(p, v)
    w = weight.to(p.dtype)
    if mask_mode == "pool":
        return torch.matmul(p, v * w[:, None, :, None])
    if mask_mode == "renorm":
        p = p * w[:, None, None, :]
        return torch.matmul(p / p.sum(-1, keepdim=True).clamp_min(1e-12), v)
    raise ValueError(f"unknown mask_mode {mask_mode!r} (pool, renorm)")


def text_consistent_loss(
    q_ref: Layers,
    k_ref: Layers,
    q_res: Layers,
    k_res: Layers,
    *,
    ref_token_idx: torch.Tensor | None = None,
    res_token_idx: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    m_hat: torch.Tensor | None = None,
    mask_mode: str = "pool",
    norm: str = "mse",
    layer_reduction: str = "mean",
    latent_hw: tuple[int, int] | None = None,
    v_ref: Layers | None = None,
    v_res: Layers | None = None,
) -> torch.Tensor:
    """L_text-consistent (eq. 3), or L_M-text (eq. 8) when ``m_hat`` is given.

    Per cross-attention layer j: F^j_ref = Softmax(K_ref(E_base) Q_ref^T / sqrt(d)) Q_ref and
    F^j_res = Softmax(K^s_res(E_base) Q_res^T / sqrt(d)) Q_res, with K^s_res(E_base) the response path's
    keys of [E_base, E_tar] selected at the base-text positions; per head, d the head dimension.

    Args:
        q_ref, k_ref, q_res, k_res: one tensor or a list over layers; Q (B, H, N_img, d), K (B, H, N_txt, d).
        ref_token_idx, res_token_idx: base-text token positions in each path's keys, (N,) or (B, N);
            None takes every key of that path. Both selections must have the same length N.
        token_mask: (B, N) bool/float, which selected tokens count (base captions differ in length).
        m_hat: the SFCM (B, S, S); the loss is weighted by (1 - M-hat) inside F's spatial pooling
            (see ``attention_features``). None: vanilla alignment (eq. 3).
        norm: ``mse`` (default) sum over valid entries of (F_ref - F_res)^2 / (their count), or ``l2``
            (the paper's ||.||_2, the per-sample Frobenius norm, batch mean).
        layer_reduction: ``mean`` over layers (default) or ``sum`` (the paper's sum_j).
        v_ref, v_res: what F pools instead of Q (same layers; (B, H, N_img, d_v)), e.g. the layers' input
            features (``split_heads``); None: Q, as eq. 3 writes it.
    Gradients reach q_res, k_res and v_res only.
    """
    q_ref, k_ref = _as_layers(q_ref, "q_ref"), _as_layers(k_ref, "k_ref")
    q_res, k_res = _as_layers(q_res, "q_res"), _as_layers(k_res, "k_res")
    if not len(q_ref) == len(k_ref) == len(q_res) == len(k_res):
        raise ValueError("q_ref, k_ref, q_res and k_res must cover the same layers")
    if (v_ref is None) != (v_res is None):
        raise ValueError("give both v_ref and v_res, or neither")
    v_ref = [None] * len(q_ref) if v_ref is None else _as_layers(v_ref, "v_ref")
    v_res = [None] * len(q_res) if v_res is None else _as_layers(v_res, "v_res")
    if not len(v_ref) == len(v_res) == len(q_ref):
        raise ValueError("v_ref and v_res must cover the same layers as q")
    per_layer = []
    for qr, kr, qs, ks, vr, vs in zip(q_ref, k_ref, q_res, k_res, v_ref, v_res):
        if qr.shape != qs.shape:
            raise ValueError(f"query shapes differ between paths: {tuple(qr.shape)} vs {tuple(qs.shape)}")
        kr = _select_tokens(kr.detach(), ref_token_idx)
        ks = _select_tokens(ks, res_token_idx)
        if kr.shape != ks.shape:
            raise ValueError(f"selected base-text keys differ: {tuple(kr.shape)} vs {tuple(ks.shape)}")
        w = spatial_weight(m_hat, qs.shape[2], latent_hw)
        vr = None if vr is None else vr.detach()
        diff = attention_features(qr.detach(), kr, w, mask_mode, vr) - attention_features(qs, ks, w, mask_mode, vs)
        count = None
        if token_mask is not None:
            tm = token_mask.to(device=diff.device, dtype=diff.dtype)
            diff = diff * tm[:, None, :, None]
            count = tm.sum().clamp_min(1) * diff.shape[1] * diff.shape[3]
        per_layer.append(_reduce_layer(diff, norm, count))
    return _reduce_layers(per_layer, layer_reduction)


# ----------------------------------------------------------------------------------------------
# eq. 4: L_fine-grained


def fine_grained_loss(
    q_ref: Layers,
    q_res: Layers,
    *,
    m_hat: torch.Tensor | None = None,
    norm: str = "mse",
    layer_reduction: str = "mean",
    latent_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    """L_fine-grained (eq. 4), or L_M-fine (eq. 8) when ``m_hat`` is given: per layer
    ||(Q^j_ref - Q^j_res) * (1 - M-hat)||, the map resized to the layer's resolution and broadcast over
    heads and channels. ``mse``: mean over every element (masked positions count in the denominator, so
    the loss shrinks with the aligned area instead of being renormalised). ``l2``: per-sample Frobenius
    norm, batch mean. Gradients reach q_res only."""
    q_ref, q_res = _as_layers(q_ref, "q_ref"), _as_layers(q_res, "q_res")
    if len(q_ref) != len(q_res):
        raise ValueError("q_ref and q_res must cover the same layers")
    per_layer = []
    for qr, qs in zip(q_ref, q_res):
        if qr.shape != qs.shape:
            raise ValueError(f"query shapes differ between paths: {tuple(qr.shape)} vs {tuple(qs.shape)}")
        diff = _fp(qr.detach()) - _fp(qs)
        w = spatial_weight(m_hat, qs.shape[2], latent_hw)
        if w is not None:
            diff = diff * w.to(diff.dtype)[:, None, :, None]
        per_layer.append(_reduce_layer(diff, norm))
    return _reduce_layers(per_layer, layer_reduction)


# ----------------------------------------------------------------------------------------------
# eq. 5-7: the SFCM


@torch.no_grad()
def noise_difference_map(
    eps_ref: torch.Tensor,
    eps_res: torch.Tensor,
    *,
    size: int | tuple[int, int] = MAP_SIZE,
    channel_reduce: str = "mean",
    normalize: str = "minmax",
) -> torch.Tensor:
    """M (eq. 5) = |eps_theta(x_t, t, E_base) - eps_theta'(x_t, t, [E_base, E_tar])|: (B, S, S) in [0, 1].

    The latent channels are reduced (``mean`` of |.|, or ``l2`` norm over channels), the map is resized
    to S x S (bilinear up, area down) and normalised per sample (``minmax`` default, ``max``, ``none``).
    For a v-prediction model the two outputs' difference is the epsilon difference / sqrt(alpha_bar_t)
    (same x_t), i.e. proportional per sample: after per-sample normalisation M is the same.
    """
    d = (_fp(eps_ref) - _fp(eps_res)).abs()
    if channel_reduce == "mean":
        d = d.mean(1, keepdim=True)
    elif channel_reduce == "l2":
        d = torch.linalg.vector_norm(d, dim=1, keepdim=True)
    else:
        raise ValueError(f"unknown channel_reduce {channel_reduce!r} (mean, l2)")
    return _normalize_map(_resize(d, _size2(size))[:, 0], normalize)


@torch.no_grad()
def phrase_attention_maps(
    probs: Layers,
    phrase_weights: torch.Tensor,
    *,
    size: int | tuple[int, int] = MAP_SIZE,
    latent_hw: tuple[int, int] | None = None,
    normalize: str = "minmax",
) -> torch.Tensor:
    """A_base[i] (eq. 6): each base phrase's cross-attention map averaged over layers, (B, P, S, S).

    Per layer j: the probabilities (B, H, N_img, N_txt) are averaged over heads, then over the phrase's
    tokens (``phrase_weights`` (B, P, N_txt) or (P, N_txt), rows from ``phrase_token_matrix``: 1/|T_i| on
    phrase i's tokens, zero rows for padding phrases; shorter than N_txt means zeros beyond), reshaped to
    the layer's (h, w) and upsampled (bilinear) to S x S. The layer mean (1/L sum_j) is then normalised per
    (sample, phrase) to [0, 1] (``minmax`` default), so that it is on M's scale in eq. 7.
    """
    probs = _as_layers(probs, "probs")
    size = _size2(size)
    acc = None
    for p in probs:
        p = _fp(p).mean(1)  # (B, N_img, T)
        w = phrase_weights.to(device=p.device, dtype=p.dtype)
        if w.shape[-1] < p.shape[-1]:
            w = F.pad(w, (0, p.shape[-1] - w.shape[-1]))
        elif w.shape[-1] > p.shape[-1]:
            raise ValueError(f"phrase weights cover {w.shape[-1]} tokens, the attention only {p.shape[-1]}")
        if w.dim() == 2:
            w = w.expand(p.shape[0], *w.shape)
        a = torch.einsum("bnt,bpt->bpn", p, w)
        h, wd = _layer_hw(p.shape[1], latent_hw)
        a = _resize(a.reshape(a.shape[0], a.shape[1], h, wd), size)
        acc = a if acc is None else acc + a
    return _normalize_map(acc / len(probs), normalize)


class SFCMMaps(NamedTuple):
    m_hat: torch.Tensor  # (B, S, S), the SFCM of eq. 7
    m: torch.Tensor  # (B, S, S), the normalised noise difference of eq. 5
    exclusion: torch.Tensor  # (B, S, S), sum_i A_base[i] (1 - gamma(i))


@torch.no_grad()
def sfcm(
    eps_ref: torch.Tensor,
    eps_resp: torch.Tensor,
    phrase_maps: torch.Tensor | None,
    gamma: torch.Tensor | None,
    *,
    phrase_mask: torch.Tensor | None = None,
    size: int | tuple[int, int] = MAP_SIZE,
    channel_reduce: str = "mean",
    normalize: str = "minmax",
    return_parts: bool = False,
):
    """The Semantic-Aware Fine-controllable Map (eq. 7): M-hat = clamp(M - sum_i A_base[i] (1 - gamma(i)), 0, 1).

    Args:
        eps_ref, eps_resp: the two paths' model outputs for the same x_t, t (B, C, h, w).
        phrase_maps: A_base (B, P, S, S) from ``phrase_attention_maps`` (None: M-hat = M).
        gamma: (B, P) or (P,) CLIP cosines of ``phrase_gamma``; clamped to [0, 1] so each phrase's
            exclusion weight 1 - gamma is in [0, 1].
        phrase_mask: (B, P), which phrases exist (padding phrases get weight 0).
    M is normalised to [0, 1] per sample, the subtraction can only lower it, and the result is clamped
    to [0, 1] without renormalising (a renormalisation would re-inflate the regions the phrases removed).
    Everything here is a stop-gradient guide: computed without gradients.
    Returns M-hat (B, S, S), or ``SFCMMaps(m_hat, m, exclusion)`` with ``return_parts``.
    """
    m = noise_difference_map(eps_ref, eps_resp, size=size, channel_reduce=channel_reduce, normalize=normalize)
    exclusion = torch.zeros_like(m)
    if phrase_maps is not None and gamma is not None:
        a = _fp(phrase_maps).to(m.device)
        if tuple(a.shape[-2:]) != tuple(m.shape[-2:]):
            a = _resize(a, tuple(m.shape[-2:]))
        g = _fp(gamma).to(device=m.device, dtype=m.dtype)
        if g.dim() == 1:
            g = g.expand(a.shape[0], -1)
        weight = 1.0 - g.clamp(0.0, 1.0)
        if phrase_mask is not None:
            weight = weight * phrase_mask.to(device=m.device, dtype=m.dtype)
        exclusion = torch.einsum("bp,bpxy->bxy", weight, a.to(m.dtype))
    m_hat = (m - exclusion).clamp(0.0, 1.0)
    return SFCMMaps(m_hat, m, exclusion) if return_parts else m_hat


def phrase_gamma_from_embeddings(
    phrase_emb: torch.Tensor, target_emb: torch.Tensor, phrase_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """gamma(i) = cosine(phrase embedding i, target-text embedding): (..., P) from (..., P, D) and (..., D).
    Padding phrases (``phrase_mask`` False) get gamma = 1 (no exclusion). No gradient."""
    pe = F.normalize(_fp(phrase_emb.detach()), dim=-1)
    te = F.normalize(_fp(target_emb.detach()), dim=-1)
    g = (pe * te.unsqueeze(-2)).sum(-1)
    if phrase_mask is not None:
        g = torch.where(phrase_mask.to(g.device).bool(), g, torch.ones_like(g))
    return g


@torch.no_grad()
def phrase_gamma(
    encode_text: Callable[[list[str]], torch.Tensor],
    phrases: Sequence[str] | Sequence[Sequence[str]],
    target_text: str | Sequence[str],
) -> torch.Tensor:
    """gamma(i) = D_CLIP(E_base[i], E_tar) of eq. 7, each phrase and the target encoded alone.

    ``encode_text`` maps a list of strings to CLIP text embeddings (n, D) in the joint image-text
    space, e.g. ``ClipBackbone.encode_texts`` of ``spfbench.metrics.clip`` (open_clip ViT-L/14).
    ``phrases`` (a list of strings) with one ``target_text`` gives (P,); a batch (list of lists) with a
    list of targets gives (B, P_max), padding phrases set to 1.
    """
    single = isinstance(target_text, str)
    batch = [list(phrases)] if single else [list(p) for p in phrases]
    targets = [target_text] if single else list(target_text)
    if len(batch) != len(targets):
        raise ValueError(f"{len(batch)} phrase lists for {len(targets)} target texts")
    texts = list(dict.fromkeys([t for p in batch for t in p] + targets))
    emb = encode_text(texts)
    row = {t: i for i, t in enumerate(texts)}
    p_max = max(len(p) for p in batch)
    if p_max == 0:
        raise ValueError("no base phrase to weigh")
    idx = torch.tensor([[row[t] for t in p] + [0] * (p_max - len(p)) for p in batch])
    mask = torch.tensor([[True] * len(p) + [False] * (p_max - len(p)) for p in batch])
    tgt = torch.tensor([row[t] for t in targets])
    g = phrase_gamma_from_embeddings(emb[idx.to(emb.device)], emb[tgt.to(emb.device)], mask)
    return g[0] if single else g


# ----------------------------------------------------------------------------------------------
# captions: phrases and token positions


@functools.lru_cache(maxsize=1)
def _default_tokenizer():
    from spfbench.clip_tokenizer import clip_tokenizer

    return clip_tokenizer()


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)


def phrase_token_positions(base_caption: str, tokenizer=None, max_length: int = 77) -> list[list[int]]:
    """Token positions of each phrase in the tokenized base caption (and, identically, in the complete
    caption ``join_caption(base, target)``): the start token is position 0, so positions start at 1;
    the separating commas belong to no phrase; positions past the last one that survives truncation
    (max_length - 2) are dropped (a phrase can come back empty)."""
    tok = tokenizer or _default_tokenizer()
    text = base_text(base_caption)
    full = _ids(tok, text)
    out = []
    for s, e in phrase_spans(base_caption):
        a, b = len(_ids(tok, text[:s])), len(_ids(tok, text[:e]))
        if full[a:b] != _ids(tok, text[s:e]):
            raise ValueError(f"phrase {text[s:e]!r} does not tokenize the same inside {text!r}")
        out.append([1 + i for i in range(a, b) if 1 + i <= max_length - 2])
    return out


def base_token_positions(
    base_caption: str, tokenizer=None, include_start: bool = False, max_length: int = 77
) -> list[int]:
    """Positions of the base text's tokens, the same in the base caption's and in the complete caption's
    tokenization (CLIP's BPE works word by word, so the complete caption's first tokens are the base
    caption's; a final "." is dropped as ``join_caption`` does). Position 0 is the start token, included
    only with ``include_start``; end and padding tokens never are."""
    tok = tokenizer or _default_tokenizer()
    n = min(len(_ids(tok, base_text(base_caption))), max_length - 2)
    return ([0] if include_start else []) + list(range(1, n + 1))


def base_token_batch(
    base_captions: Sequence[str], tokenizer=None, include_start: bool = False, max_length: int = 77
) -> tuple[torch.Tensor, torch.Tensor]:
    """``base_token_positions`` of a batch, padded: (idx (B, N) long, token_mask (B, N) bool); the
    arguments ``ref_token_idx``/``res_token_idx`` and ``token_mask`` of ``text_consistent_loss``."""
    pos = [base_token_positions(c, tokenizer, include_start, max_length) for c in base_captions]
    n = max(1, max(len(p) for p in pos))
    idx = torch.tensor([p + [0] * (n - len(p)) for p in pos], dtype=torch.long)
    mask = torch.tensor([[True] * len(p) + [False] * (n - len(p)) for p in pos])
    return idx, mask


def phrase_token_matrix(positions: Sequence[Sequence[Sequence[int]]], n_txt: int = 77, p_max: int | None = None):
    """Rows averaging each phrase's tokens: (B, P_max, n_txt) with 1/|T_i| at phrase i's positions, and
    the phrase mask (B, P_max) (False for padding phrases and for phrases left with no token)."""
    p_max = p_max or max(1, max(len(p) for p in positions))
    w = torch.zeros(len(positions), p_max, n_txt)
    mask = torch.zeros(len(positions), p_max, dtype=torch.bool)
    for b, phrases in enumerate(positions):
        for i, toks in enumerate(phrases[:p_max]):
            toks = [t for t in toks if t < n_txt]
            if toks:
                w[b, i, toks] = 1.0 / len(toks)
                mask[b, i] = True
    return w, mask


def phrase_token_batch(base_captions: Sequence[str], tokenizer=None, n_txt: int = 77):
    """(phrase_weights (B, P_max, n_txt), phrase_mask (B, P_max), phrases list[list[str]]) of a batch
    of base captions, ready for ``phrase_attention_maps``, ``phrase_gamma`` and ``sfcm``."""
    phrases = [split_base_phrases(c) for c in base_captions]
    positions = [phrase_token_positions(c, tokenizer) for c in base_captions]
    w, mask = phrase_token_matrix(positions, n_txt)
    return w, mask, phrases


# ----------------------------------------------------------------------------------------------
# eq. 9-10: x0-hat and L_enhanced


def predict_x0(
    noisy_latents: torch.Tensor,
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    prediction_type: str | None = None,
) -> torch.Tensor:
    """The one-step prediction x0-hat (eq. 9) from x_t and the model output, with the scheduler's
    alphas_cumprod: epsilon x0 = (x_t - sqrt(1 - a) eps) / sqrt(a); v_prediction x0 = sqrt(a) x_t -
    sqrt(1 - a) v; sample x0 = output. ``prediction_type`` defaults to ``scheduler.config``'s. Computed in
    fp32 (fp64 kept), differentiable in model_output; the inverse of ``scheduler.add_noise``."""
    ptype = prediction_type or scheduler.config.prediction_type
    x = _fp(noisy_latents)
    out = model_output.to(x.dtype) if model_output.dtype != torch.float64 else model_output
    if ptype == "sample":
        return out
    a = scheduler.alphas_cumprod.to(device=x.device, dtype=x.dtype)[timesteps.to(x.device).long()]
    a = a.reshape(-1, *([1] * (x.dim() - 1)))
    sa, s1a = a**0.5, (1 - a) ** 0.5
    if ptype == "epsilon":
        return (x - s1a * out) / sa
    if ptype == "v_prediction":
        return sa * x - s1a * out
    raise ValueError(f"unknown prediction type {ptype!r}")


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    input_range: tuple[float, float] = (-1.0, 1.0),
) -> torch.Tensor:
    """Differentiable CLIP preprocessing of decoded images (B, 3, H, W) in ``input_range`` (the VAE's
    [-1, 1]): to [0, 1] clamped (as the pipeline's image output), shortest side resized to ``size``
    (bicubic, antialiased), centre crop, OpenAI mean/std (as the CLIP metric's PIL preprocessing)."""
    lo, hi = input_range
    x = ((images - lo) / (hi - lo)).clamp(0, 1)
    h, w = x.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, device=x.device, dtype=x.dtype)[:, None, None]
    sd = torch.tensor(std, device=x.device, dtype=x.dtype)[:, None, None]
    return (x - m) / sd


def difference_vector(image_emb: torch.Tensor, text_emb: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Delta(x, E_tar) = E_I(x) - E_T(E_tar) (eq. 9), each embedding L2-normalised first by default."""
    if normalize:
        image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    return image_emb - text_emb


def enhanced_loss(
    image_emb_pred: torch.Tensor,
    image_emb_gt: torch.Tensor,
    text_emb_tar: torch.Tensor,
    *,
    normalize: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """L_enhanced (eq. 10) = 1 - cos(Delta(x0-hat, E_tar), Delta(x0, E_tar)).

    Args:
        image_emb_pred: E_I(x0-hat) (B, D), the CLIP image embedding of the decoded one-step
            prediction (with gradients).
        image_emb_gt: E_I(x0) (B, D), of the ground-truth image (constant).
        text_emb_tar: E_T(E_tar) (B, D) or (D,), of the target text alone (constant).
        normalize: L2-normalise each CLIP embedding before the difference (default; CLIP's image and
            text embeddings have very different norms, and CLIP compares directions).
        reduction: ``mean`` over the batch, ``none`` per sample.
    """
    pred = _fp(image_emb_pred)
    gt = _fp(image_emb_gt.detach()).to(pred.dtype)
    txt = _fp(text_emb_tar.detach()).to(pred.dtype)
    if txt.dim() == 1:
        txt = txt.expand_as(pred)
    d_pred = difference_vector(pred, txt, normalize)
    d_gt = difference_vector(gt, txt, normalize)
    loss = 1.0 - F.cosine_similarity(d_pred, d_gt, dim=-1, eps=1e-8)
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r} (mean, none)")


# ----------------------------------------------------------------------------------------------
# eq. 12


def spf_loss(
    l_diff: torch.Tensor,
    l_enh: torch.Tensor | None = None,
    l_text: torch.Tensor | None = None,
    l_fine: torch.Tensor | None = None,
    lambda1: float = 0.6,
    lambda2: float = 0.2,
    lambda3: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_SPF (eq. 12) = L_diff + lambda1 L_enhanced + lambda2 L_M-text + lambda3 L_M-fine.

    A term whose part is None or whose lambda is 0 is left out (not multiplied by zero, so a non-finite
    switched-off part cannot leak in): with every lambda 0 the total *is* l_diff. Returns the total and
    the detached parts present ("diff", "enhanced", "text", "fine", "total") for logging.
    """
    total = l_diff
    parts = {"diff": l_diff.detach()}
    for name, value, lam in (("enhanced", l_enh, lambda1), ("text", l_text, lambda2), ("fine", l_fine, lambda3)):
        if value is None:
            continue
        parts[name] = value.detach()
        if lam != 0:
            total = total + lam * value
    parts["total"] = total.detach()
    return total, parts
