"""The Table 1 metrics over the same N pairs: spfbench's batched way vs the naive per-image way.

"spfbench": each metric's ``update`` on batches of ``--batch-size`` pairs, backbones loaded once and
shared (one CLIP for CLIP-I and CLIP-T).
"naive": how the reference tools are commonly called, one image per call (batch size 1, no originals' cache):
  * HPSv2: the checkpoint reloaded for every call, as the ``hpsv2`` package's ``score()`` does (``torch.load`` +
    ``load_state_dict`` of the file; on ``tiny``, a rebuild of the tiny model);
  * ID: insightface ``FaceAnalysis.get`` on each image (every model of the pack), largest face's
    ``normed_embedding``;
  * FID: torchmetrics ``FrechetInceptionDistance.update`` one image at a time;
  * the others (CLIP-I, CLIP-T, LPIPS, Seg-Cons, MPS): the same loaded model, one pair per call.
Runs alternate (naive, spfbench, spfbench, naive, ...) per metric; each figure is the median over
repeats. A second figure compares FID feature extraction with torchmetrics' FID alone at the same batch
size (target: ratio >= 1).

    python benchmarks/bench_metrics.py --preset tiny            # CPU, random small models
    python benchmarks/bench_metrics.py --preset full-random --n 64 --batch-size 16   # GPU: real sizes, random weights
    python benchmarks/bench_metrics.py --preset real --n 256    # GPU with the real weights present

``full-random`` (docs/metrics.md): every backbone at its published size with seeded random weights. ID runs on
both sides through insightface on a buffalo_l-shaped folder holding the full-size random IResNet-50 recognizer
and the tiny random SCRFD stand-in (detection cost NOT at real size), HPSv2's naive reload reads a saved random
ViT-H-14 state dict (3.9 GB, under the temp dir), FID's naive side is torchmetrics' FID on the random Inception
file. ``--n-for`` / ``--repeats-for`` shrink the slow metrics (SAM ViT-H on a CPU). Each metric's backbones are
loaded before its timings (a warm-up run of both ways on ``--warm-pairs`` pairs) and dropped after them.

Target at real sizes on a GPU: all eight together >= 5x faster than the naive way.
"""

from __future__ import annotations

import argparse
import gc
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

from spfbench.metrics import Backbones, Batch, PairwiseMetric, create  # noqa: E402
from spfbench.metrics import DEFAULT_METRICS  # noqa: E402



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
        self.last: dict | None = None  # the last run's compute()

    def run(self, metric_id: str, pairs: Batch) -> None:
        m = create(metric_id, self.bb_id if metric_id.startswith("id@") else self.bb)
        for i in range(0, len(pairs), self.batch_size):
            m.update(sub(pairs, i, i + self.batch_size))
        self.last = m.compute()
        reasons = getattr(m, "reasons", {})
        if reasons:  # why pairs failed (e.g. Seg-Cons on random SAM weights: no mask passes SAM's filters)
            self.last["failure_reasons"] = {r: list(reasons.values()).count(r) for r in sorted(set(reasons.values()))}


class Naive:
    def __init__(self, bb: Backbones, bb_id: Backbones):
        self.bb, self.bb_id = bb, bb_id
        self._face_app = None
        self._hps_file: Path | None = None

    def hps_file(self) -> Path:
        """The HPS checkpoint the hpsv2 package would reload per call: the real file, or (full-random) the
        random model's state dict saved once as ``{'state_dict': ...}``, as HPS_v2.1_compressed.pt holds it."""
        if self._hps_file is None:
            from spfbench.metrics.hpsv2 import hps_checkpoint

            if self.bb.random_weights:
                self._hps_file = Path(tempfile.mkdtemp(prefix="spfbench-bench-hps-")) / "hps-random.pt"
                torch.save({"state_dict": self.bb.get("hpsv2").model.state_dict()}, self._hps_file)
            else:
                self._hps_file = Path(hps_checkpoint(self.bb))
        return self._hps_file

    def _hps_reload(self) -> None:
        if not self.bb.full_size:  # tiny: rebuild the tiny model
            self.bb._cache.pop("hpsv2", None)
            return
        from spfbench.metrics.hpsv2 import load_hps_state

        load_hps_state(self.bb.get("hpsv2").model, self.hps_file())  # hpsv2.score(): torch.load + load_state_dict per call

    def drop(self) -> None:
        self._face_app = None
        if self._hps_file is not None and self.bb.random_weights:
            self._hps_file.unlink(missing_ok=True)
            self._hps_file.parent.rmdir()
        self._hps_file = None

    def run(self, metric_id: str, pairs: Batch) -> None:
        if metric_id.startswith("id@"):
            return self._id(pairs)
        if metric_id.startswith("fid@"):
            return self._fid(pairs, batch_size=1)
        m = create(metric_id, self.bb)
        for i in range(len(pairs)):
            if metric_id.startswith("hpsv2@"):
                self._hps_reload()  # the hpsv2 package reloads its checkpoint on every call
            m.update(sub(pairs, i, i + 1))
        m.compute()

    def face_app(self):
        if self._face_app is None:
            from insightface.app import FaceAnalysis

            from spfbench.metrics.id import PACK, execution_providers, insightface_root

            providers, ctx = execution_providers(self.bb_id)
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

        from spfbench.metrics.fid import inception_path, random_inception_path, to_uint8

        if not self.bb.full_size:
            fid = FrechetInceptionDistance(feature=self.bb.get("inception-fid"))
        else:  # torch-fidelity's Inception through torchmetrics, from the real or the random weights file
            path = random_inception_path() if self.bb.random_weights else inception_path()
            fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path), antialias=False)
        fid = fid.to(self.bb.device)
        for i in range(0, len(pairs), batch_size):
            for real, images in ((True, pairs.originals[i:i + batch_size]), (False, pairs.customized[i:i + batch_size])):
                fid.update(torch.stack([to_uint8(im) for im in images]).to(self.bb.device), real=real)
        fid.compute()


CLOCK = "wall"  # set by --clock: "wall" (perf_counter) or "process" (CPU time of this process, all its threads)
TIMES: list[tuple[float, float]] = []  # every timing as (wall s, process CPU s)


def timed(fn, device) -> float:
    """Seconds ``fn`` took on the chosen clock. ``process`` is for CPU runs on a shared machine: a niced,
    single-threaded benchmark is descheduled for minutes by other jobs, which wall time counts and CPU time
    does not (CPU time also counts spinning ONNX Runtime threads)."""
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    TIMES.append((wall, cpu))
    return wall if CLOCK == "wall" else cpu


# images each way runs through the metric's network per pair (the others: both images of the pair)
IMAGES_PER_PAIR = {"clip-t": 1, "hpsv2": 1, "mps": 1}


def images_per_pair(metric_id: str) -> int:
    return IMAGES_PER_PAIR.get(metric_id.split("@")[0], 2)


def per_metric(values: list[str] | None, what: str, minimum: int = 1) -> dict[str, int]:
    """``METRIC=INT`` options -> {metric id: int}."""
    out = {}
    for v in values or []:
        mid, sep, num = v.partition("=")
        if not sep or not num.isdigit() or int(num) < minimum:
            raise SystemExit(f"{what} takes METRIC=N with N >= {minimum}, got {v!r}")
        out[mid] = int(num)
    return out


def write_full_random_pack(root: str) -> None:
    """A buffalo_l-shaped folder: the full-size random IResNet-50 recognizer and the tiny SCRFD stand-in (insightface
    loads both through its model router, so the naive FaceAnalysis way and the metric share them)."""
    import onnx

    from spfbench.metrics.id import DET_FILE, PACK, REC_FILE, iresnet_recognizer_path, tiny_scrfd_model

    folder = Path(root) / "models" / PACK
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_scrfd_model(0), str(folder / DET_FILE))
    os.symlink(iresnet_recognizer_path(), folder / REC_FILE)


def drop_backbones(*bbs: Backbones) -> None:
    for b in bbs:
        b._cache.clear()
        b._fingerprints.clear()
    gc.collect()


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # scikit-image chatter inside insightface
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="the metrics' environment (spfbench environments): tiny, full-random, real")
    p.add_argument("--n", type=int, default=24, help="pairs")
    p.add_argument("--n-for", action="append", metavar="METRIC=N", help="pairs for one metric (repeatable)")
    p.add_argument("--size", type=int, default=None, help="image side (default 64 tiny, 512 otherwise)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repeats-for", action="append", metavar="METRIC=R", help="repeats for one metric (repeatable)")
    p.add_argument("--warm-pairs", type=int, default=2, help="pairs of the untimed warm-up run of each way (FID: at least 2)")
    p.add_argument("--warm-for", action="append", metavar="METRIC=N", help="warm-up pairs for one metric (0: load only)")
    p.add_argument("--device", default=None)
    p.add_argument("--clock", choices=["auto", "wall", "process"], default="auto",
                   help="what a timing measures: wall time, or this process's CPU time (auto: process on a CPU device, else wall)")
    p.add_argument("--metric", action="append", help="metric id (repeatable; default: the eight of Table 1)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()

    metrics = args.metric or DEFAULT_METRICS
    n_for, repeats_for = per_metric(args.n_for, "--n-for"), per_metric(args.repeats_for, "--repeats-for")
    warm_for = per_metric(args.warm_for, "--warm-for", minimum=0)
    bb = Backbones(args.preset, args.device)
    size = args.size or (512 if bb.full_size else 64)
    global CLOCK
    CLOCK = args.clock if args.clock != "auto" else ("process" if bb.device.type == "cpu" else "wall")
    if bb.random_weights:
        # ID on both sides through the real loading path (insightface's SCRFD + ArcFaceONNX on files), with
        # random buffalo_l-shaped files: the same models for both ways (full-random: full-size recognizer).
        from spfbench.metrics.id import ROOT_ENV, write_tiny_pack

        os.environ[ROOT_ENV] = tempfile.mkdtemp(prefix="spfbench-bench-insightface-")
        (write_full_random_pack if bb.full_size else write_tiny_pack)(os.environ[ROOT_ENV])
    bb_id = Backbones("real", args.device)
    n_max = max([args.n, *n_for.values()])
    all_pairs = make_pairs(n_max, size)
    ours, naive = Ours(bb, bb_id, args.batch_size), Naive(bb, bb_id)

    rows = {}
    fid_ratio = None
    header = {
        "command": "python benchmarks/bench_metrics.py " + " ".join(sys.argv[1:]),
        "preset": args.preset, "device": str(bb.device),
        "device_name": torch.cuda.get_device_name(bb.device) if bb.device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(), "clock": CLOCK, "n": args.n, "size": size, "batch_size": args.batch_size,
        "repeats": args.repeats,
    }
    for mid in metrics:
        n, repeats = n_for.get(mid, args.n), repeats_for.get(mid, args.repeats)
        pairs = sub(all_pairs, 0, n)
        # warm up: load the metric's backbones and run each way once on a few pairs (not timed); 0 warm-up pairs
        # (a pairwise metric whose one forward costs minutes, SAM ViT-H on a CPU): load its backbones only
        t0 = time.perf_counter()
        n_warm = warm_for.get(mid, args.warm_pairs)
        probe = create(mid, bb_id if mid.startswith("id@") else bb)
        if n_warm == 0 and isinstance(probe, PairwiseMetric):
            for name in probe.feature_backbones():
                probe.backbones.get(name)
        else:
            warm = sub(all_pairs, 0, max(n_warm, 2 if mid.startswith("fid@") else 1))
            ours.run(mid, warm)
            naive.run(mid, warm)
        load_s = time.perf_counter() - t0
        t_ours, t_naive, runs = [], [], []
        for r in range(repeats):
            order = [("naive", naive), ("ours", ours)] if r % 2 == 0 else [("ours", ours), ("naive", naive)]
            for name, runner in order:
                (t_ours if name == "ours" else t_naive).append(timed(lambda: runner.run(mid, pairs), bb.device))
                runs.append({"way": name, "wall_s": TIMES[-1][0], "cpu_s": TIMES[-1][1]})
        to, tn = statistics.median(t_ours), statistics.median(t_naive)
        k = images_per_pair(mid)
        rows[mid] = {"n": n, "repeats": repeats, "images_per_pair": k,
                     "ours_pairs_per_s": n / to, "naive_pairs_per_s": n / tn,
                     "ours_images_per_s": k * n / to, "naive_images_per_s": k * n / tn, "speedup": tn / to,
                     "ours_s": to, "naive_s": tn, "ours_runs_s": t_ours, "naive_runs_s": t_naive,
                     "runs": runs,
                     "warm_pairs": n_warm, "warmup_and_load_s": load_s}
        if ours.last is not None:
            rows[mid]["ours_result"] = {k2: v for k2, v in ours.last.items() if k2 in ("value", "n", "failures", "detection_rate", "failure_reasons")}
        print(f"{mid:<24} n={n:<3} spfbench {n / to:8.3f} pairs/s   naive {n / tn:8.3f} pairs/s   x{tn / to:6.2f}", flush=True)
        if mid.startswith("fid@"):  # FID feature extraction vs torchmetrics' FID alone at the same batch size
            ratios = []
            for r in range(repeats):
                a = timed(lambda: naive._fid(pairs, args.batch_size), bb.device)
                b = timed(lambda: ours.run(mid, pairs), bb.device)
                ratios.append(a / b)
            fid_ratio = statistics.median(ratios)
            print(f"FID features at batch {args.batch_size}: spfbench / torchmetrics FID alone speed ratio {fid_ratio:.3f} (target >= 1)")
        naive.drop()
        drop_backbones(bb, bb_id)  # keep one metric's models in memory at a time
        if args.out:  # the figures so far (a long CPU run may be stopped before the end)
            write_result(args.out, {**header, "complete": False, "metrics": rows, "fid_features_vs_torchmetrics": fid_ratio})
    # pairs/s of all the metrics run on the same pairs: sum of per-pair costs
    per_pair_ours = sum(r["ours_s"] / r["n"] for r in rows.values())
    per_pair_naive = sum(r["naive_s"] / r["n"] for r in rows.values())
    print(f"{'all ' + str(len(rows)):<24}       spfbench {1 / per_pair_ours:8.3f} pairs/s   naive {1 / per_pair_naive:8.3f} pairs/s"
          f"   x{per_pair_naive / per_pair_ours:6.2f}")

    result = {
        **header, "complete": True, "metrics": rows,
        "all": {"ours_s_per_pair": per_pair_ours, "naive_s_per_pair": per_pair_naive,
                "ours_pairs_per_s": 1 / per_pair_ours, "naive_pairs_per_s": 1 / per_pair_naive,
                "speedup": per_pair_naive / per_pair_ours},
        "fid_features_vs_torchmetrics": fid_ratio,
    }
    write_result(args.out, result)
    if bb.random_weights:
        import shutil

        shutil.rmtree(os.environ[ROOT_ENV], ignore_errors=True)


if __name__ == "__main__":
    main()
