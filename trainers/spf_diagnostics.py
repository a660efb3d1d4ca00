"""What SPF-Portrait's stage 2 does to the two paths, measured (issue 21; docs/spf.md, "Diagnostics").

The alignment losses falling does not show that the paths align: with ``to_q`` / ``to_k`` trainable,
L_fine can fall while the features entering cross-attention, and the noise prediction, stay apart. These
pure functions measure the things themselves, on tensors the stage-2 step already has:

* :func:`relative_mse` -- per layer, mean((ref - res)^2) / mean(ref^2) of any two paths' tensors (the
  attn2 input features, the noise predictions on the base text): 0 = aligned, 1 = as far apart as the
  reference is from zero;
* :func:`map_summary` -- mean and quantiles of a map (M, M-hat): how much of the image the SFCM takes out
  of the alignment;
* :func:`localisation` -- how well a map locates the target against exact target masks (the world's
  renderer draws them): pixel AUC (torchmetrics' ``binary_auroc``, per sample) and the IoU of the map's
  top-k pixels with the mask, k = the mask's area (a threshold-free IoU: 1 iff the map's highest pixels
  are exactly the target's).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

QUANTILES = (0.1, 0.5, 0.9, 0.99)


def relative_mse(ref: torch.Tensor, res: torch.Tensor) -> float:
    """mean((ref - res)^2) / mean(ref^2), in float32; 0.0 for an all-zero reference and equal tensors."""
    if ref.shape != res.shape:
        raise ValueError(f"shapes differ: {tuple(ref.shape)} vs {tuple(res.shape)}")
    ref, res = ref.detach().float(), res.detach().float()
    num = (ref - res).pow(2).mean()
    den = ref.pow(2).mean()
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / den)


def layer_relative_mse(ref: Sequence[torch.Tensor], res: Sequence[torch.Tensor]) -> list[float]:
    """:func:`relative_mse` of each pair of layers."""
    if len(ref) != len(res):
        raise ValueError(f"{len(ref)} reference layers against {len(res)} response layers")
    return [relative_mse(a, b) for a, b in zip(ref, res)]


def map_summary(m: torch.Tensor, quantiles: Sequence[float] = QUANTILES) -> dict[str, float]:
    """{"mean": .., "q10": .., "q50": .., ...} over every element of ``m`` (e.g. a batch of maps)."""
    x = m.detach().float().flatten()
    q = torch.quantile(x, torch.tensor(list(quantiles), dtype=x.dtype, device=x.device))
    out = {"mean": float(x.mean())}
    out.update({f"q{round(p * 100)}": float(v) for p, v in zip(quantiles, q)})
    return out


def _masks_at(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, R, R) binary masks at a map's size: area average, then >= 0.5 (bilinear when upsampling)."""
    m = masks.float()[:, None]
    if m.shape[-2:] == size:
        return m[:, 0] >= 0.5
    if m.shape[-2] >= size[0] and m.shape[-1] >= size[1]:
        m = F.adaptive_avg_pool2d(m, size)
    else:
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return m[:, 0] >= 0.5


def localisation(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, float | int]:
    """Pixel AUC and top-area IoU of ``maps`` (B, S, S) against ``masks`` (B, R, R) (resized to S x S),
    averaged over the samples whose mask has both target and non-target pixels (``n``: how many)."""
    from torchmetrics.functional.classification import binary_auroc

    if maps.dim() != 3 or masks.dim() != 3 or maps.shape[0] != masks.shape[0]:
        raise ValueError(f"need maps (B, S, S) and masks (B, R, R), got {tuple(maps.shape)} and {tuple(masks.shape)}")
    target = _masks_at(masks, tuple(maps.shape[-2:])).flatten(1)
    score = maps.detach().float().flatten(1)
    aucs, ious = [], []
    for s, t in zip(score, target):
        k = int(t.sum())
        if k == 0 or k == t.numel():
            continue
        aucs.append(float(binary_auroc(s, t.long())))
        top = torch.zeros_like(t)
        top[torch.topk(s, k).indices] = True
        ious.append(float((top & t).sum() / (top | t).sum()))
    if not aucs:
        return {"auc": float("nan"), "iou": float("nan"), "n": 0}
    return {"auc": sum(aucs) / len(aucs), "iou": sum(ious) / len(ious), "n": len(aucs)}
