"""tokencompose: naive full-UNet fine-tuning plus TokenCompose's grounding losses (CVPR 2024).

The official code is mlpc-ucsd/TokenCompose (``train/src/loss_utils.py``, ``train_token_compose.py``).
Per training sample, every noun phrase with a mask (the data's ``attn_list`` column: ``[[phrase,
mask_path | null], ...]``, mask paths relative to the dataset root) is mapped to its token indices in the
caption through the CLIP tokenizer (first occurrence), and two losses are computed on the
cross-attention probabilities of the mid and up blocks, grouped by resolution (mid 8, up 16/32/64 at
512 px):

* token loss (:func:`token_loss`): per phrase token k, ``(1 - mean_heads(sum_u(A_k * M) / sum_u A_k))^2``,
  averaged over the phrase's tokens and the phrases, summed over the layers of a group;
* pixel loss (:func:`pixel_loss`): maps averaged over heads and the group's layers, the phrase's token
  maps summed, BCE against the binary mask, averaged over phrases.

Both are summed over the groups and averaged over the samples of the batch that have at least one
grounded phrase; the total is ``L_mse + token_loss_weight * L_token + pixel_loss_weight * L_pixel``.
Attention is recorded with the project's one capture mechanism (:mod:`trainers.attention`), cross
attention only. The artifact is the fine-tuned UNet, exactly as :class:`trainers.naive.Naive`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from spfbench.errors import SpfbenchError

from .attention import AttentionStore, install_capture
from .base import Models, diffusion_loss, encode_batch
from .naive import Naive, NaiveConfig

log = logging.getLogger(__name__)

_ATTN_LIST = "attn_list"
_BLOCK_PREFIX = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}


@dataclass
class TokenComposeConfig(NaiveConfig):
    # official recipe (train/scripts/train.sh): lr 5e-6 constant, batch 1 x accumulation 4, fp32
    learning_rate: float = 5e-6
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 4
    token_loss_weight: float = 1e-3
    pixel_loss_weight: float = 5e-5
    # which UNet blocks' cross-attention layers are grounded, grouped by resolution: "mid,up" gives the
    # official mid 8 / up 16 / up 32 / up 64 at 512 px (and the scaled groups at other sizes)
    groups: str = "mid,up"

    def validate(self) -> None:
        super().validate()
        parts = [p.strip() for p in self.groups.split(",") if p.strip()]
        if not parts or any(p not in _BLOCK_PREFIX for p in parts):
            raise SpfbenchError(f"groups must be a comma-separated subset of down, mid, up; got {self.groups!r}")
        for name in ("token_loss_weight", "pixel_loss_weight"):
            if getattr(self, name) < 0:
                raise SpfbenchError(f"{name} must be >= 0, got {getattr(self, name)}")

    def layer_filter(self):
        prefixes = tuple(_BLOCK_PREFIX[p.strip()] for p in self.groups.split(",") if p.strip())
        return lambda name: name.startswith(prefixes)


# -- pure pieces (testable on hand-made tensors) -----------------------------------------------------


def phrase_token_indices(tokenizer, caption: str, phrase: str, where: str = "sample") -> list[int]:
    """Positions of ``phrase``'s tokens in the tokenized ``caption`` (index 0 is the start token): the
    first occurrence of the phrase's token sequence. Raises SpfbenchError naming ``where`` when absent
    (also when it falls beyond the 77-token window)."""
    ids = tokenizer(caption, max_length=tokenizer.model_max_length, truncation=True).input_ids
    sub = tokenizer(phrase, add_special_tokens=False).input_ids
    if not sub:
        raise SpfbenchError(f"{where}: attn_list phrase {phrase!r} is empty")
    n = len(sub)
    for i in range(1, len(ids) - n + 1):
        if ids[i : i + n] == sub:
            return list(range(i, i + n))
    raise SpfbenchError(f"{where}: attn_list phrase {phrase!r} is not in the caption {caption!r} (as CLIP tokens)")


def _check(layer_maps, masks, token_idx):
    if len(layer_maps) == 0:
        raise ValueError("no attention layer in the group")
    if masks.shape[0] != len(token_idx) or not token_idx:
        raise ValueError(f"{masks.shape[0]} masks for {len(token_idx)} phrases (need >= 1, one mask each)")


def token_loss(layer_maps, masks: torch.Tensor, token_idx: list[list[int]]) -> torch.Tensor:
    """TokenCompose's token loss of one sample and one group.

    layer_maps: the group's layers, each (heads, N, T) attention probabilities (N = h * w pixels);
    masks: (P, N) binary masks of the P phrases at the group's resolution; token_idx: per phrase its
    token positions. Sum over layers of mean over phrases of mean over the phrase's tokens of
    ``(1 - mean_heads(sum_u A_k M / sum_u A_k))^2`` (official ``get_grounding_loss_by_layer``)."""
    _check(layer_maps, masks, token_idx)
    total = 0.0
    for a in layer_maps:
        per_phrase = []
        for mask, idx in zip(masks, token_idx):
            ak = a[:, :, idx].float()  # (heads, N, K)
            inside = (ak * mask.to(ak)[None, :, None]).sum(1) / ak.sum(1)  # (heads, K)
            per_phrase.append(((1.0 - inside.mean(0)) ** 2).mean())
        total = total + torch.stack(per_phrase).mean()
    return total


def pixel_loss(layer_maps, masks: torch.Tensor, token_idx: list[list[int]]) -> torch.Tensor:
    """TokenCompose's pixel loss of one sample and one group: maps averaged over heads and layers, the
    phrase's token maps summed (clamped to [0, 1], see docs), BCE against its binary mask, mean over
    phrases."""
    _check(layer_maps, masks, token_idx)
    avg = torch.stack([a.float().mean(0) for a in layer_maps]).mean(0)  # (N, T)
    losses = []
    for mask, idx in zip(masks, token_idx):
        p = avg[:, idx].sum(-1).clamp(0.0, 1.0)
        losses.append(F.binary_cross_entropy(p, mask.to(p)))
    return torch.stack(losses).mean()


def load_mask(path: Path, resolution: int, center_crop: bool = True, flip: bool = False) -> torch.Tensor:
    """A mask image -> (R, R) float {0, 1}, with the geometry the image gets in
    :func:`spfbench.data.preprocess` (shorter side to R then centre crop, or a plain resize) but with
    nearest-neighbour resampling; pixels > 127 (grey level) are inside."""
    from PIL import Image

    with Image.open(path) as im:
        img = im.convert("L")
    w, h = img.size
    R = int(resolution)
    if center_crop:
        nw, nh = (R, int(R * h / w)) if w <= h else (int(R * w / h), R)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.NEAREST)
        top, left = int(round((nh - R) / 2.0)), int(round((nw - R) / 2.0))
        if (nw, nh) != (R, R):
            img = img.crop((left, top, left + R, top + R))
    elif (w, h) != (R, R):
        img = img.resize((R, R), Image.NEAREST)
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(R, R)
    m = (t > 127).float()
    return torch.flip(m, dims=[-1]) if flip else m


def mask_at(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(..., R, R) binary masks -> (..., h*w) binary at a group's resolution: area average, then > 0
    (a cell touched by the mask is inside, as the official bilinear resize followed by ``> 0``)."""
    lead = mask.shape[:-2]
    m = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(), size=tuple(hw), mode="area")
    return (m > 0).float().reshape(*lead, hw[0] * hw[1])


# -- the method -----------------------------------------------------------------------------------------


class TokenCompose(Naive):
    name = "tokencompose"
    description = "full UNet fine-tuning + TokenCompose token/pixel grounding losses on cross-attention"
    Config = TokenComposeConfig

    def __init__(self, config: TokenComposeConfig | None = None):
        super().__init__(config)
        self.dataset = None
        self.store: AttentionStore | None = None
        self.handle = None
        self._masks: dict[tuple[int, str], torch.Tensor] = {}
        self._tokens: dict[tuple[int, str], list[int]] = {}
        self._notes: list[str] = []

    def training_notes(self) -> list[str]:
        return list(self._notes)

    def bind_dataset(self, dataset) -> None:
        """The training set (a :class:`spfbench.data.PortraitDataset`): mask paths are resolved against
        its root and cropped like its images."""
        self.dataset = dataset

    def setup(self, models: Models) -> list[torch.nn.Parameter]:
        params = super().setup(models)
        n_masks = 0
        if self.dataset is not None:
            n_masks = sum(1 for r in self.dataset.records for p in (r.extras.get(_ATTN_LIST) or []) if p[1] is not None)
        if n_masks == 0:
            note = "no attn_list masks in the training data: no grounding loss applied (naive fine-tuning in effect; `spfbench masks` makes them)"
            log.warning(f"tokencompose: {note}")
            self._notes.append(note)
            return params
        if self.dataset.random_flip and self.config.cache_encodings:
            raise SpfbenchError("tokencompose: random_flip with cache_encodings cannot follow the flips for the masks; turn one off")
        self.store = AttentionStore(probs=True, keep_grad=True)
        self.handle = install_capture(models.unet, self.store, layers=self.config.layer_filter(), explicit=True)
        return params

    def _sample_grounding(self, models: Models, caption: str, index: int, extras: dict):
        """(token index lists, (P, R, R) masks) of one sample's phrases with masks, or None."""
        pairs = [(ph, mp) for ph, mp in (extras.get(_ATTN_LIST) or []) if mp is not None]
        if not pairs:
            return None
        where = self.dataset.records[index].where if self.dataset is not None else f"sample {index}"
        flip = self.dataset.flipped(index) if self.dataset.random_flip else False
        idx, masks = [], []
        for phrase, mp in pairs:
            key = (index, phrase)
            if key not in self._tokens:
                self._tokens[key] = phrase_token_indices(models.tokenizer, caption, phrase, where)
            mkey = (index, mp)
            if mkey not in self._masks:
                self._masks[mkey] = load_mask(self.dataset.resolve(mp), self.dataset.resolution, self.dataset.center_crop)
            m = self._masks[mkey]
            idx.append(self._tokens[key])
            masks.append(torch.flip(m, dims=[-1]) if flip else m)
        return idx, torch.stack(masks)

    def loss(self, models: Models, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        latents, text = encode_batch(models, batch, generator)
        grounding = [None] * latents.shape[0]
        if self.handle is not None:
            extras = batch.get("extras") or [{}] * latents.shape[0]
            for i in range(latents.shape[0]):
                # phrases of a sample without a mask are still checked against the caption
                for phrase, _ in extras[i].get(_ATTN_LIST) or []:
                    key = (int(batch["index"][i]), phrase)
                    if key not in self._tokens:
                        where = self.dataset.records[key[0]].where
                        self._tokens[key] = phrase_token_indices(models.tokenizer, batch["caption"][i], phrase, where)
                grounding[i] = self._sample_grounding(models, batch["caption"][i], int(batch["index"][i]), extras[i])
        if self.handle is None or all(g is None for g in grounding):
            ctx = self.handle.using(None) if self.handle is not None else _null()
            with ctx:
                mse = diffusion_loss(models, latents, text, generator)
            return mse, {"loss_diffusion": mse.detach().item(), "grounded_phrases": 0}

        mse = diffusion_loss(models, latents, text, generator)  # the forward records the maps
        groups = self.store.group_by_resolution()
        probs = {n: self.store[n].probs for names in groups.values() for n in names}  # (B, heads, N, T)
        l_tok, l_pix, n_samples, n_phrases = 0.0, 0.0, 0, 0
        for i, g in enumerate(grounding):
            if g is None:
                continue
            idx, masks = g
            for hw, names in groups.items():
                m = mask_at(masks, hw).to(latents.device)
                maps = [probs[n][i] for n in names]
                l_tok = l_tok + token_loss(maps, m, idx)
                l_pix = l_pix + pixel_loss(maps, m, idx)
            n_samples += 1
            n_phrases += len(idx)
        l_tok, l_pix = l_tok / n_samples, l_pix / n_samples
        self.store.reset()  # drop the graph-attached maps
        total = mse + self.config.token_loss_weight * l_tok + self.config.pixel_loss_weight * l_pix
        return total, {
            "loss_diffusion": mse.detach().item(),
            "loss_token": float(l_tok.detach()),
            "loss_pixel": float(l_pix.detach()),
            "grounded_phrases": n_phrases,
        }


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
