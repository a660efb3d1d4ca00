"""Scoring a second method against the same test set: what the originals' cache saves (issue 23).

One test set, two methods' image folders (the originals shifted by two different amounts), the same
shared, already loaded backbones (as ``spfbench run`` scores every method). Each repeat starts from an
empty ``TESTSET/cache`` and scores the two folders one after the other; "first" pays for the originals'
side (FID's reference statistics and every pairwise metric's original features), "second" finds it
cached. The same pair is also timed with the cache off (``Scorer(cache_originals=False)``), side by side,
as the before-figure. Which folder goes first alternates between repeats; each figure is the median over
repeats of time(second) / time(first).

    python benchmarks/bench_originals_cache.py --n 16 --repeats 3 --out results/originals_cache_tiny_cpu.json

Target: time(second) / time(first) <= 0.55 with the cache, on ``tiny``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_result  # noqa: E402

from spfbench.generation import GenerationSettings  # noqa: E402
from spfbench.metrics import Backbones  # noqa: E402
from spfbench.scoring import Scorer, default_metrics, read_image  # noqa: E402
from spfbench.testset import TestsetBuilder, load_testset  # noqa: E402


def method_images(testset: Path, folder: Path, shift: int) -> Path:
    """A method's customized images: each original rolled by ``shift`` pixels, with a little noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(shift)
    for t in load_testset(testset)[1]:
        a = np.roll(np.asarray(read_image(testset / t.original)), shift, axis=1).astype(np.float32)
        Image.fromarray(np.clip(a + rng.normal(0, 6, a.shape), 0, 255).astype(np.uint8)).save(folder / f"{t.id}.png")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="triples in the tiny test set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the tiny models gain nothing from more)")
    p.add_argument("--metric", action="append", help="metric id (repeatable; default: the eight of Table 1)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    metrics = args.metric or default_metrics("tiny")

    work = Path(tempfile.mkdtemp(prefix="spfbench-bench-cache-"))
    try:
        from spfbench.models import load_pipeline

        testset = work / "testset"
        TestsetBuilder(testset, preset="tiny", n=args.n, settings=GenerationSettings(steps=2), device="cpu").run(
            progress=False, pipeline=load_pipeline("tiny", device="cpu"))
        folders = [method_images(testset, work / "method-a", 3), method_images(testset, work / "method-b", 11)]
        bb = Backbones("tiny", "cpu")
        runs = 0

        def score(images: Path, cache: bool) -> float:
            nonlocal runs
            runs += 1
            t = time.perf_counter()
            Scorer(testset, images, work / f"score-{runs}", metrics, preset="tiny", device="cpu", batch_size=args.batch_size,
                   backbones=bb, cache_originals=cache).run(progress=False)
            return time.perf_counter() - t

        score(folders[0], cache=False)  # warm up: load every backbone (not timed)
        figures = {True: [], False: []}
        for r in range(args.repeats):
            order = folders if r % 2 == 0 else folders[::-1]
            for cache in ((True, False) if r % 2 == 0 else (False, True)):
                shutil.rmtree(testset / "cache", ignore_errors=True)  # nothing cached: the first method pays
                first, second = score(order[0], cache), score(order[1], cache)
                figures[cache].append({"first_s": first, "second_s": second, "ratio": second / first})
                print(f"repeat {r} cache {'on ' if cache else 'off'}: first {first:6.2f} s  second {second:6.2f} s"
                      f"  ratio {second / first:.3f}", flush=True)
        ratio = statistics.median(f["ratio"] for f in figures[True])
        ratio_off = statistics.median(f["ratio"] for f in figures[False])
        print(f"time(second) / time(first): {ratio:.3f} with the cache (target <= 0.55), {ratio_off:.3f} without")
        write_result(args.out, {
            "command": "python benchmarks/bench_originals_cache.py " + " ".join(sys.argv[1:]),
            "preset": "tiny", "device": "cpu", "cpu_threads": torch.get_num_threads(), "n": args.n,
            "batch_size": args.batch_size, "repeats": args.repeats, "metrics": metrics,
            "ratio_second_over_first": ratio, "ratio_without_cache": ratio_off,
            "runs": {"cache": figures[True], "no_cache": figures[False]},
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
