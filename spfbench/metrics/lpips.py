"""LPIPS (preservation, lower is better): the ``lpips`` package, AlexNet trunk, linear heads v0.1.

Per triple: ``LPIPS(original, customized)`` with both images as float tensors in [-1, 1] (the
package's ``normalize=False`` convention) at their stored resolution; mean over triples. Pairs of
different sizes are recorded as failures (resizing would change the value), never resized silently.
The package's forward is run in its two halves (each image's normalised trunk features, then the
distance of two feature sets) so the originals' features can be cached; the value is the package's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import MissingWeightsError
from .base import Backbones, Batch, PairwiseMetric

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"


def alexnet_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def heads_file() -> Path:
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"


@Backbones.register("lpips-alex")
def _load_lpips(bb: Backbones):
    import lpips

    if bb.random_weights:  # random AlexNet trunk, the real linear heads
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
    else:
        if not alexnet_path().is_file():
            raise MissingWeightsError(
                f"missing weights: LPIPS AlexNet trunk {alexnet_path()} (torchvision {ALEXNET_FILE}, 233 MB); download"
                f" {ALEXNET_URL} into {alexnet_path().parent} (or set TORCH_HOME)"
            )
        model = lpips.LPIPS(net="alex", version="0.1", verbose=False)
    # lpips loads its heads with strict=False: make sure every head weight really arrived.
    heads = torch.load(heads_file(), map_location="cpu", weights_only=True)
    have = model.state_dict()
    if not all(k in have and torch.equal(have[k], v) for k, v in heads.items()):
        raise RuntimeError(f"LPIPS linear heads from {heads_file()} did not load into the model")
    return model.to(bb.device).eval()


def to_signed(image) -> torch.Tensor:
    """PIL RGB -> float32 (3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    return x / 127.5 - 1.0


def lpips_features(net, x: torch.Tensor) -> list[torch.Tensor]:
    """The unit-normalised trunk features of images ``x`` ((B, 3, H, W) in [-1, 1]), one per layer: the
    first half of ``lpips.LPIPS.forward`` (version 0.1: scaling layer, trunk, ``normalize_tensor``)."""
    import lpips

    with torch.inference_mode():
        return [lpips.normalize_tensor(o) for o in net.net.forward(net.scaling_layer(x))]


def lpips_distance(net, feats0: list[torch.Tensor], feats1: list[torch.Tensor]) -> torch.Tensor:
    """(B,) distances from two images' features: the second half of ``lpips.LPIPS.forward`` (squared
    differences, linear heads, spatial mean, summed over layers; ``lpips=True``, ``spatial=False``)."""
    import lpips

    with torch.inference_mode():
        val = 0
        for kk in range(net.L):
            val += lpips.spatial_average(net.lins[kk]((feats0[kk] - feats1[kk]) ** 2), keepdim=True)
        return val.flatten()


class Lpips(PairwiseMetric):
    """The original's side: its normalised AlexNet features (one tensor per layer, ``layer0``..``layer4``)."""

    id, column, higher_is_better = "lpips@alex-v0.1", "LPIPS", False

    def feature_backbones(self) -> tuple[str, ...]:
        return ("lpips-alex",)

    def original_features(self, ids: list[str], images: list) -> dict[str, dict[str, torch.Tensor]]:
        net = self.backbones.get("lpips-alex")
        out = {}
        for idx in _by_size(images).values():
            feats = lpips_features(net, torch.stack([to_signed(images[i]) for i in idx]).to(self.backbones.device))
            for j, i in enumerate(idx):
                out[ids[i]] = {f"layer{k}": f[j].cpu().clone() for k, f in enumerate(feats)}
        return out

    def score_pairs(self, batch: Batch, features: list[dict[str, torch.Tensor]]) -> list[float | None]:
        net = self.backbones.get("lpips-alex")
        out: list[float | None] = [None] * len(batch)
        ok = []
        for i, (a, b) in enumerate(zip(batch.originals, batch.customized)):
            if a.size != b.size:
                self.reasons[batch.ids[i]] = f"sizes differ: original {a.size}, customized {b.size}"
            else:
                ok.append(i)
        dev = self.backbones.device
        for idx in _by_size([batch.customized[i] for i in ok]).values():
            idx = [ok[j] for j in idx]
            f1 = lpips_features(net, torch.stack([to_signed(batch.customized[i]) for i in idx]).to(dev))
            f0 = [torch.stack([features[i][f"layer{k}"] for i in idx]).to(dev) for k in range(len(f1))]
            for i, v in zip(idx, lpips_distance(net, f0, f1).tolist()):
                out[i] = v
        return out


def _by_size(images: list) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.size, []).append(i)
    return groups


def weight_rows() -> list[dict]:
    return [
        {"group": "metric", "name": "lpips-alexnet", "what": "LPIPS AlexNet trunk (torchvision)", "source": ALEXNET_URL,
         "size": "233 MB", "present": alexnet_path().is_file(), "path": str(alexnet_path())},
        {"group": "metric", "name": "lpips-heads-v0.1", "what": "LPIPS linear heads v0.1 (in the lpips wheel)",
         "source": "pip: lpips==0.1.4", "size": "6 kB", "present": heads_file().is_file(), "path": str(heads_file())},
    ]
