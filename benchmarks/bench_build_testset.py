"""build-testset throughput vs a plain diffusers StableDiffusionPipeline loop, side by side in one run.

Both sides use the same loaded pipeline (same weights, sampler, steps, guidance, size, batch size) and
write one PNG per image. "plain" is what a user would write by hand: a loop of ``pipe(prompts,
generator=[...])`` calls and ``image.save``. "spfbench" is ``TestsetBuilder.run`` into a fresh folder:
manifest, per-seed noise, atomic writes, checksums and content hash included. Runs alternate
(plain, spfbench, spfbench, plain, ...) and the figure is the median over repeats of the ratio within
each adjacent pair, so slow drift on a noisy machine cancels.

    python benchmarks/bench_build_testset.py --preset tiny                      # CPU
    python benchmarks/bench_build_testset.py --preset sd15-random --dtype fp16 --n 64 --batch-size 8   # GPU

Target: ratio (spfbench images/s / plain images/s) >= 1.0.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import sync, write_result  # noqa: E402

from spfbench.generation import GenerationSettings, model_scheduler_config, use_sampler  # noqa: E402
from spfbench.models import dtype_name, load_pipeline, resolve_device, resolve_dtype  # noqa: E402
from spfbench.testset import Shard, TestsetBuilder, plan_triples  # noqa: E402



def plain_loop(pipe, triples, settings, batch_size, out: Path, device):
    out.mkdir(parents=True)
    for i in range(0, len(triples), batch_size):
        batch = triples[i : i + batch_size]
        images = pipe(
            prompt=[t.base_caption for t in batch],
            generator=[torch.Generator(device).manual_seed(t.seed) for t in batch],
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
        ).images
        for t, img in zip(batch, images):
            img.save(out / f"{t.id}.png")
    sync(device)


def spfbench_build(pipeline, args, settings, out: Path, device):
    TestsetBuilder(
        out, preset=args.preset, n=args.n, settings=settings, batch_size=args.batch_size,
        shard=Shard(0, 1), device=str(device), dtype=args.dtype,
    ).run(progress=False, pipeline=pipeline)
    sync(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sampler", default=None, help="default: the model's (generation.default_sampler)")
    ap.add_argument("--size", type=int, default=None, help="image size (default: the model's native size)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    args.dtype = dtype_name(dtype)
    pipeline = load_pipeline(args.preset, device=device, dtype=dtype)
    pipe, info = pipeline
    settings = GenerationSettings(sampler=args.sampler, steps=args.steps, height=args.size, width=args.size).resolved(info.native_size, model_scheduler_config(pipe))
    use_sampler(pipe, settings.sampler)  # the plain loop uses the same sampler
    triples = plan_triples(args.n, 0)

    work = Path(tempfile.mkdtemp(prefix="bench-build-testset-"))
    times = {"plain": [], "spfbench": []}
    runners = {
        "plain": lambda out: plain_loop(pipe, triples, settings, args.batch_size, out, device),
        "spfbench": lambda out: spfbench_build(pipeline, args, settings, out, device),
    }
    try:
        runners["plain"](work / "warmup-plain")
        runners["spfbench"](work / "warmup-spfbench")
        order = ["plain", "spfbench"]
        for r in range(args.repeats):
            for name in order if r % 2 == 0 else order[::-1]:
                out = work / f"{name}-{r}"
                t0 = time.perf_counter()
                runners[name](out)
                times[name].append(time.perf_counter() - t0)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: args.n / v for k, v in med.items()}
    pair_ratios = [p / s for p, s in zip(times["plain"], times["spfbench"])]  # throughput ratio per pair
    ratio = statistics.median(pair_ratios)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = {
        "benchmark": "build-testset vs plain diffusers loop",
        "preset": args.preset, "device": device_name, "dtype": args.dtype, "n": args.n, "batch_size": args.batch_size,
        "steps": args.steps, "sampler": settings.sampler, "size": settings.height, "repeats": args.repeats,
        "seconds": times, "images_per_s": {k: round(v, 3) for k, v in ips.items()},
        "pair_ratios": [round(r, 3) for r in pair_ratios], "ratio": round(ratio, 3),
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
    }
    print(f"{args.preset} {args.dtype} {settings.height}px n={args.n} batch={args.batch_size} steps={args.steps} on {device_name}")
    print(f"  plain diffusers loop: {ips['plain']:.3f} img/s   spfbench build-testset: {ips['spfbench']:.3f} img/s")
    print(f"  ratio spfbench/plain (median of {len(pair_ratios)} paired runs): {ratio:.3f}  (target >= 1.0);"
          f" pairs: {', '.join(f'{r:.3f}' for r in pair_ratios)}")
    write_result(args.json, result)


if __name__ == "__main__":
    main()
