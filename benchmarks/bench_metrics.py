"""The Table 1 metrics over the same N pairs: spfbench's batched way vs the naive per-image way.

"spfbench": each metric's ``update`` on batches of ``--batch-size`` pairs, backbones loaded once and
shared (one CLIP for CLIP-I and CLIP-T).
"naive": how the reference tools are commonly called, one image per call:
  * HPSv2: the checkpoint reloaded for every call, as the ``hpsv2`` package's ``score()`` does;
  * ID: insightface ``FaceAnalysis.get`` on each image (every model of the pack), largest face's
    ``normed_embedding``;
  * FID: torchmetrics ``FrechetInceptionDistance.update`` one image at a time;
  * the others (CLIP-I, CLIP-T, LPIPS, Seg-Cons, MPS): the same loaded model, one pair per call.
Runs alternate (naive, spfbench, spfbench, naive, ...) per metric; each figure is the median over
repeats. A second figure compares FID feature extraction with torchmetrics' FID alone at the same batch
size (target: ratio >= 1).

    python benchmarks/bench_metrics.py --preset tiny            # CPU, random small models
    python benchmarks/bench_metrics.py --preset real --n 256    # GPU with the real weights present

Target at real sizes on a GPU: all eight together >= 5x faster than the naive way.
"""

from __future__ import annotations

import argparse
import warnings
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import sync, write_result  # noqa: E402

from spfbench.metrics import Backbones, Batch, create  # noqa: E402
from spfbench.scoring import DEFAULT_METRICS  # noqa: E402



def make_pairs(n: int, size: int, seed: int = 0) -> Batch:
    """Portrait-like synthetic pairs: a smooth random background with a face-coloured ellipse, and a
    perturbed copy (so CLIP-I/LPIPS/Seg-Cons have real work: non-identical, non-uniform images)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    originals, customized = [], []
    for i in range(n):
        base = rng.uniform(0, 255, 3) * (0.5 + 0.5 * np.sin(6 * xx + i))[..., None]
        face = ((xx - 0.5) / 0.22) ** 2 + ((yy - 0.45) / 0.3) ** 2 < 1
        img = base.copy()
        img[face] = [224, 172, 140]
        noisy = np.clip(img + rng.normal(0, 12, img.shape), 0, 255)
        originals.append(Image.fromarray(img.astype(np.uint8)))
        customized.append(Image.fromarray(noisy.astype(np.uint8)))
    texts = ["a hat", "freckles", "pencil drawing style", "blond hair"]
    return Batch([f"p{i:05d}" for i in range(n)], originals, customized,
                 [texts[i % 4] for i in range(n)], [f"A woman, reading, {texts[i % 4]}" for i in range(n)])


def sub(b: Batch, i: int, j: int) -> Batch:
    return Batch(b.ids[i:j], b.originals[i:j], b.customized[i:j], b.target_texts[i:j], b.prompts[i:j])


class Ours:
    def __init__(self, bb: Backbones, bb_id: Backbones, batch_size: int):
        self.bb, self.bb_id, self.batch_size = bb, bb_id, batch_size

    def run(self, metric_id: str, pairs: Batch) -> None:
        m = create(metric_id, self.bb_id if metric_id.startswith("id@") else self.bb)
        for i in range(0, len(pairs), self.batch_size):
            m.update(sub(pairs, i, i + self.batch_size))
        m.compute()


class Naive:
    def __init__(self, bb: Backbones, bb_id: Backbones):
        self.bb, self.bb_id = bb, bb_id
        self._face_app = None

    def run(self, metric_id: str, pairs: Batch) -> None:
        if metric_id.startswith("id@"):
            return self._id(pairs)
        if metric_id.startswith("fid@"):
            return self._fid(pairs, batch_size=1)
        m = create(metric_id, self.bb)
        for i in range(len(pairs)):
            if metric_id.startswith("hpsv2@"):
                self.bb._cache.pop("hpsv2", None)  # the hpsv2 package reloads its checkpoint on every call
            m.update(sub(pairs, i, i + 1))
        m.compute()

    def face_app(self):
        if self._face_app is None:
            from insightface.app import FaceAnalysis

            from spfbench.metrics.id import PACK, _providers, insightface_root

            providers, ctx = _providers(self.bb_id)
            app = FaceAnalysis(name=PACK, root=str(insightface_root()), providers=providers)
            app.prepare(ctx_id=ctx, det_size=(640, 640))
            self._face_app = app
        return self._face_app

    def _id(self, pairs: Batch) -> None:
        from spfbench.metrics.id import to_bgr

        app = self.face_app()
        for a, b in zip(pairs.originals, pairs.customized):
            fa, fb = app.get(to_bgr(a)), app.get(to_bgr(b))
            if fa and fb:
                big = lambda fs: max(fs, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))  # noqa: E731
                float(np.dot(big(fa).normed_embedding, big(fb).normed_embedding))

    def _fid(self, pairs: Batch, batch_size: int) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        from spfbench.metrics.fid import inception_path, to_uint8

        if self.bb.preset == "tiny":
            fid = FrechetInceptionDistance(feature=self.bb.get("inception-fid"))
        else:
            fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(inception_path()), antialias=False)
        fid = fid.to(self.bb.device)
        for i in range(0, len(pairs), batch_size):
            for real, images in ((True, pairs.originals[i:i + batch_size]), (False, pairs.customized[i:i + batch_size])):
                fid.update(torch.stack([to_uint8(im) for im in images]).to(self.bb.device), real=real)
        fid.compute()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # scikit-image chatter inside insightface
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "real"])
    p.add_argument("--n", type=int, default=24, help="pairs")
    p.add_argument("--size", type=int, default=None, help="image side (default 64 tiny, 512 real)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--metric", action="append", help="metric id (repeatable; default: the eight of Table 1)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()

    metrics = args.metric or DEFAULT_METRICS
    size = args.size or (64 if args.preset == "tiny" else 512)
    bb = Backbones(args.preset, args.device)
    if args.preset == "tiny":
        # ID on both sides through the real loading path (insightface's SCRFD + ArcFaceONNX on files),
        # with random buffalo_l-shaped stand-ins of the two files: the same models for both ways.
        from spfbench.metrics.id import ROOT_ENV, write_tiny_pack

        os.environ[ROOT_ENV] = tempfile.mkdtemp(prefix="spfbench-bench-insightface-")
        write_tiny_pack(os.environ[ROOT_ENV])
    bb_id = Backbones("real", args.device)
    pairs = make_pairs(args.n, size)
    ours, naive = Ours(bb, bb_id, args.batch_size), Naive(bb, bb_id)

    # warm up: load every backbone once and run each path on a couple of pairs (not timed)
    warm = sub(pairs, 0, 2)
    for mid in metrics:
        ours.run(mid, warm)
        naive.run(mid, warm)

    rows = {}
    for mid in metrics:
        t_ours, t_naive = [], []
        for r in range(args.repeats):
            order = [("naive", naive), ("ours", ours)] if r % 2 == 0 else [("ours", ours), ("naive", naive)]
            for name, runner in order:
                (t_ours if name == "ours" else t_naive).append(timed(lambda: runner.run(mid, pairs), bb.device))
        to, tn = statistics.median(t_ours), statistics.median(t_naive)
        rows[mid] = {"ours_pairs_per_s": args.n / to, "naive_pairs_per_s": args.n / tn, "speedup": tn / to,
                     "ours_s": to, "naive_s": tn}
        print(f"{mid:<24} spfbench {args.n / to:9.2f} pairs/s   naive {args.n / tn:9.2f} pairs/s   x{tn / to:6.2f}", flush=True)
    total_ours = sum(r["ours_s"] for r in rows.values())
    total_naive = sum(r["naive_s"] for r in rows.values())
    print(f"{'all ' + str(len(rows)):<24} spfbench {args.n / total_ours:9.2f} pairs/s   naive {args.n / total_naive:9.2f} pairs/s"
          f"   x{total_naive / total_ours:6.2f}")

    fid_ratio = None
    fid_id = next((m for m in metrics if m.startswith("fid@")), None)
    if fid_id:
        ratios = []
        for r in range(args.repeats):
            a = timed(lambda: naive._fid(pairs, args.batch_size), bb.device)
            b = timed(lambda: ours.run(fid_id, pairs), bb.device)
            ratios.append(a / b)
        fid_ratio = statistics.median(ratios)
        print(f"FID features at batch {args.batch_size}: spfbench / torchmetrics FID alone speed ratio {fid_ratio:.3f} (target >= 1)")

    result = {
        "command": "python benchmarks/bench_metrics.py " + " ".join(sys.argv[1:]),
        "preset": args.preset, "device": str(bb.device),
        "device_name": torch.cuda.get_device_name(bb.device) if bb.device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(), "n": args.n, "size": size, "batch_size": args.batch_size,
        "repeats": args.repeats, "metrics": rows,
        "all": {"ours_s": total_ours, "naive_s": total_naive, "speedup": total_naive / total_ours},
        "fid_features_vs_torchmetrics": fid_ratio,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
