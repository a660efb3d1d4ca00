"""FID between the set of originals and the set of customized images (lower = more consistent).

SPF-Portrait uses FID pairwise: "real" = the original model's portraits, "fake" = a method's customized
images of the same triples. Features: torch-fidelity's Inception-v3 (2048-d pool features, the file
``weights-inception-2015-12-05-6726825d.pth``) through torchmetrics' ``NoTrainInceptionV3``, on uint8
images (resized to 299 inside, bilinear, no antialias, as the torch-fidelity reference). State: per
side n, sum of features and sum of outer products in float64, so shards and resumed runs add up.
Value: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` with unbiased covariances, clamped at 0.
Below ~2048 images per side the 2048-d estimate is biased upward: always read it with its N.

Preset ``full-random``: the same ``NoTrainInceptionV3`` (torch-fidelity's architecture, 2048-d pool
features, resize inside), loaded the same way from a file, but the file holds seeded random tensors of
the published shapes (:func:`random_inception_path`: written once under the temp dir, no download).
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import MissingWeightsError, SpfbenchError
from .base import Backbones, Batch, Metric, seeded

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def inception_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


class TinyFeatures(torch.nn.Module):
    """A small random CNN standing in for Inception in tests: uint8 (B, 3, H, W) -> (B, 32)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2),
            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255.0)


@Backbones.register("inception-fid")
def _load_inception(bb: Backbones):
    if not bb.full_size:
        with seeded(0):
            return TinyFeatures().to(bb.device).eval()
    if bb.random_weights:
        return inception_net(random_inception_path()).to(bb.device).eval()
    if not inception_path().is_file():
        raise MissingWeightsError(
            f"missing weights: FID Inception {inception_path()} (torch-fidelity, 91 MB); download {INCEPTION_URL}"
            f" into {inception_path().parent} (or set TORCH_HOME)"
        )
    return inception_net(inception_path()).to(bb.device).eval()


def inception_net(path: str | Path):
    """torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's FID Inception), weights from ``path``."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path),
                              antialias=False)


def inception_template() -> dict[str, torch.Tensor]:
    """The state dict ``NoTrainInceptionV3`` loads, as the module initialises it (names, shapes, dtypes, the
    BatchNorm defaults). Its constructor always reads a weights file: handed an empty one, with loading
    skipped, it builds the layers only (no download, no published tensor)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    class LayersOnly(NoTrainInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # the constructor's load: skipped
            return None

    with tempfile.TemporaryDirectory(prefix="spfbench-inception-") as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        net = LayersOnly(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(empty))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random tensors of the FID Inception's exact names and shapes: convolutions He-normal
    (``std = sqrt(2 / fan_in)``, so activations stay of order one through the ~50 ReLU layers instead of
    vanishing or turning denormal, which would change CPU cost), BatchNorm at its defaults (scale 1, shift 0,
    running mean 0, variance 1), the 2048 -> 1008 logits layer ``N(0, 1 / fan_in)`` (unused by the 2048-d
    features)."""
    state = inception_template()
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(state):
        t = state[name]
        if name.endswith("conv.weight"):
            fan_in = t[0].numel()
            state[name] = torch.randn(t.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif name == "fc.weight":
            state[name] = torch.randn(t.shape, generator=gen) * (1.0 / t.shape[1]) ** 0.5
        elif name == "fc.bias":
            state[name] = torch.zeros_like(t)
    return state


def random_inception_path(seed: int = 0) -> Path:
    """:func:`random_inception_state` saved once as ``$TMPDIR/spfbench-full-random/inception-seed<seed>-<sha12>.pth``
    (named by the content's sha256, written atomically, reused when present): a torch-fidelity-format
    weights file for ``NoTrainInceptionV3`` and for torchmetrics' ``FrechetInceptionDistance``."""
    buf = io.BytesIO()
    torch.save(random_inception_state(seed), buf)
    from ..io import write_once

    return write_once(buf.getvalue(), Path(tempfile.gettempdir()) / "spfbench-full-random", f"inception-seed{seed}", ".pth")


def to_uint8(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), via the eigenvalues of S1 S2 (float64)."""
    diff = mu1 - mu2
    eig = torch.linalg.eigvals(sigma1 @ sigma2)
    tr_sqrt = eig.sqrt().real.sum()
    return float(max(diff.dot(diff) + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt, 0.0))


class Fid(Metric):
    """Set-level FID. Each side ("real" = originals, "fake" = customized) keeps its own triple ids, so
    the reference side can be preloaded from a cache (:meth:`set_reference`) and is then not recomputed,
    and a triple never counts twice on a side."""

    id, column, higher_is_better, per_sample = "fid@inception-2048", "FID", False, False
    has_reference = True  # statistics of the originals alone, cacheable per test set

    def reset(self) -> None:
        self.stats: dict[str, dict] = {}
        self.ids: dict[str, set[str]] = {"real": set(), "fake": set()}
        self.reasons: dict[str, str] = {}

    def features(self, images) -> torch.Tensor:
        """(N, 2048) float64 features in the order of ``images``. The network resizes every image to 299
        itself, so a batch may mix sizes: each size is one forward pass (a stack needs equal shapes)."""
        net = self.backbones.get("inception-fid")
        x = [to_uint8(im) for im in images]
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(x):
            groups.setdefault(tuple(t.shape), []).append(i)
        out: list = [None] * len(x)
        with torch.inference_mode():
            for idx in groups.values():
                f = net(torch.stack([x[i] for i in idx]).to(self.backbones.device)).reshape(len(idx), -1).double().cpu()
                for j, i in enumerate(idx):
                    out[i] = f[j]
        return torch.stack(out)

    def _add(self, side: str, ids: list[str], images: list) -> None:
        new = [i for i, t in enumerate(ids) if t not in self.ids[side]]
        if not new:
            return
        feats = self.features([images[i] for i in new])
        s = self.stats.setdefault(side, {"n": 0, "sum": 0.0, "outer": 0.0})
        s["n"] += feats.shape[0]
        s["sum"] = s["sum"] + feats.sum(0)
        s["outer"] = s["outer"] + feats.T @ feats
        self.ids[side].update(ids[i] for i in new)

    def update(self, batch: Batch) -> None:
        self._add("real", batch.ids, batch.originals)
        self._add("fake", batch.ids, batch.customized)

    def update_reference(self, ids: list[str], originals: list) -> None:
        self._add("real", ids, originals)

    def record_failure(self, tid: str, reason: str) -> None:
        self.reasons[tid] = reason

    def reference_state(self) -> dict:
        return {"ids": sorted(self.ids["real"]), "stats": self.stats.get("real")}

    def set_reference(self, state: dict) -> None:
        self.ids["real"] = set(state["ids"])
        self.stats["real"] = state["stats"]

    def state(self) -> dict:
        return {"ids": {k: sorted(v) for k, v in self.ids.items()}, "stats": self.stats, "reasons": dict(self.reasons)}

    def merge(self, state: dict) -> None:
        for side, s in state["stats"].items():
            theirs = set(state["ids"][side])
            if theirs == self.ids[side]:  # e.g. both shards loaded the same cached reference
                continue
            if self.ids[side] & theirs:
                raise SpfbenchError(f"FID states overlap on the {side} side (a triple would count twice); merge disjoint shards")
            mine = self.stats.setdefault(side, {"n": 0, "sum": 0.0, "outer": 0.0})
            mine["n"] += s["n"]
            mine["sum"] = mine["sum"] + s["sum"]
            mine["outer"] = mine["outer"] + s["outer"]
            self.ids[side] |= theirs
        self.reasons.update(state.get("reasons", {}))

    @staticmethod
    def _moments(s: dict):
        n = s["n"]
        mu = s["sum"] / n
        cov = (s["outer"] - n * torch.outer(mu, mu)) / (n - 1)
        return mu, cov

    def compute(self) -> dict:
        n_real, n_fake = (self.stats.get(side, {}).get("n", 0) for side in ("real", "fake"))
        result = {"id": self.id, "column": self.column, "higher_is_better": False, "n": n_fake, "n_real": n_real,
                  "failures": len(self.reasons)}
        if min(n_real, n_fake) < 2:
            return {**result, "value": None, "error": f"FID needs at least 2 images per side, got {n_real} originals and {n_fake} customized"}
        return {**result, "value": frechet_distance(*self._moments(self.stats["real"]), *self._moments(self.stats["fake"]))}


def weight_rows() -> list[dict]:
    return [{"group": "metric", "name": "fid-inception", "what": "FID Inception-v3 (torch-fidelity)", "source": INCEPTION_URL,
             "size": "91 MB", "present": inception_path().is_file(), "path": str(inception_path())}]
