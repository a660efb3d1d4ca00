"""SPF stage-2 step vs the naive fine-tuning step: achieved FLOP/s, step time and peak memory (issue 5).

Both sides run the same model, toy data, batch size and precision in one process, through a hand-written
step in the shape of ``benchmarks/bench_train.py``'s ``plain_steps`` (fetch, the method's own ``loss``,
backward, clip, AdamW step, zero_grad) around each method's own ``setup`` (naive: the whole UNet trains;
SPF: the frozen reference UNet is built, only the response path's ``attn2`` trains; no stage-1 artifact,
the response path starts from the base model, which costs the same per step).

FLOPs: counted once per method with ``torch.utils.flop_counter.FlopCounterMode`` on one representative
step (forward + backward of the method's loss, caches warm), taken after the warm-up and not timed. The
figure is

    ratio = (FLOP_spf / t_spf) / (FLOP_naive / t_naive)      target >= 0.85

i.e. the SPF step's extra work (reference path, attention maps, VAE decode with gradients, CLIP) runs as
efficiently as plain fine-tuning. Step times: median over ``--steps`` timed steps after ``--warmup``,
each side rebuilt per repeat, the order alternating over ``--repeats``; the median over repeats is
reported. On CUDA: peak GiB (``torch.cuda.max_memory_allocated``, reset after setup, so it holds the
models, optimizer state and the step's activations) and MFU against ``--peak-tflops``.

    python benchmarks/bench_spf.py --preset tiny --steps 6 --repeats 2                               # CPU
    python benchmarks/bench_spf.py --preset sd15-random --precision bf16 --batch-size 4 --out results/spf_sd15_h100.json  # GPU

For presets other than ``tiny`` the SPF method's CLIP ViT-L/14 is a random-weight full-size open_clip
ViT-L/14 (``--clip random``; the FLOPs do not depend on the weights and no download is needed);
``--clip method`` uses the method's own loader (published weights from the local cache).

``--measure cache`` (issue 23) instead times the stage-2 step with and without ``cache_encodings``, side by
side: per method (``--method`` and naive), fresh :class:`trainers.loop.Trainer` runs (the real loop: data
loading, the cache's reads, the method's hooks; checkpoints off) in both settings, the order alternating
over ``--repeats``; a step time is the loop's logged ``seconds``, the figure the median over the steps after
the warm-up (at least one epoch, so that the uncached side's in-memory per-item caches are warm: the
stricter comparison), then the median over repeats. Building the cache is a one-off and not counted (its
run's wall time is recorded).

    ratio = t_cached / t_uncached      target <= 1.0 for every method

    python benchmarks/bench_spf.py --measure cache --preset tiny --threads 1 --out results/spf_cache_tiny_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import sync, write_result  # noqa: E402

import trainers  # noqa: E402
from spfbench.data import PortraitDataset, collate  # noqa: E402
from spfbench.models import get_preset, load_pipeline  # noqa: E402
from spfbench.toydata import make_toy_data  # noqa: E402
from trainers.base import Models  # noqa: E402
from trainers.loop import Trainer, training_scheduler  # noqa: E402

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SPF_REFERENCE_TFLOP_PER_SAMPLE = 7.95  # REFERENCE.md section 5: SD1.5, 512 px
NAIVE_REFERENCE_TFLOP_PER_SAMPLE = 2.41  # UNet fwd+bwd, all trainable (the naive step also runs the VAE encoder: +1.12)



def clip_config(name: str, args) -> dict:
    """SPF's CLIP: ``--clip random`` is the full-random environment's (open_clip ViT-L/14 at its published shapes,
    seeded random weights: the same FLOPs as the published one, no download); ``method`` the method's own
    choice (its base model's environment); ``auto``: ``method`` where the backbones are small, else ``random``."""
    from spfbench.environments import of_preset

    clip = args.clip if args.clip != "auto" else ("method" if not of_preset(args.preset)[0].full_size_backbones else "random")
    return {"clip_preset": "full-random"} if name != "naive" and clip == "random" else {}


def build(name: str, args, device):
    """A fresh pipeline, the method's own setup, AdamW over its parameters."""
    pipe, _ = load_pipeline(args.preset, device=device, dtype=torch.float32)
    wd = DTYPES[args.precision]
    models = Models(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, training_scheduler(pipe), wd)
    for m in (pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
        torch.nn.Module.to(m, dtype=wd)
    method = trainers.create(name, {"mixed_precision": args.precision, "train_batch_size": args.batch_size, **clip_config(name, args)})
    params = method.setup(models)
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=method.config.learning_rate)
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return models, method, params, opt, res


def run_side(name: str, args, data: Path, device, count_flops: bool) -> dict:
    models, method, params, opt, res = build(name, args, device)
    ds = PortraitDataset(data, resolution=res)
    # the same batches, in the same order, for both methods
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, collate_fn=collate, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast(device.type, dtype=DTYPES[args.precision], enabled=args.precision != "no")
    g = torch.Generator(device).manual_seed(0)  # one stream for the whole run

    def batches():
        while True:
            yield from loader

    it = batches()

    def step(i: int) -> None:
        batch = next(it)  # the step time includes fetching the batch
        with autocast:
            loss, _ = method.loss(models, batch, g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        method.after_backward(models, i)
        opt.step()
        method.after_step(models, i)
        opt.zero_grad(set_to_none=True)
        loss.item()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):
        step(i)
    flops = None
    if count_flops:  # a representative step (caches warm), counted, not timed
        counter = FlopCounterMode(display=False)
        with counter:
            step(args.warmup)
        flops = counter.get_total_flops()
    times = []
    sync(device)
    t = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + 1 + i)
        sync(device)
        now = time.perf_counter()
        times.append(now - t)
        t = now
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del models, method, params, opt, loader, it
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"times": times, "peak_gib": peak, "flops": flops}


def loop_run(name: str, cached: bool, args, data: Path, out: Path, device) -> dict:
    """One fresh Trainer run; its per-step seconds after the warm-up and its wall time."""
    steps = args.warmup + args.steps
    method = trainers.create(name, {"max_train_steps": steps, "checkpointing_steps": 10**9, "checkpoints_total_limit": 1,
                                    "mixed_precision": args.precision, "train_batch_size": args.batch_size,
                                    "random_flip": args.random_flip, "cache_encodings": cached, **clip_config(name, args)})
    t = time.perf_counter()
    Trainer(method, data, out, preset=args.preset, device=None if device.type == "cuda" else "cpu").run(progress=False)
    wall = time.perf_counter() - t
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {"times": [e["seconds"] for e in log[args.warmup:]], "run_s": wall}


def measure_cache(args, data: Path, tmp: Path, device) -> None:
    per_epoch = math.ceil(args.n / args.batch_size)
    args.warmup = max(args.warmup, per_epoch)  # the uncached side's in-memory caches warm (one epoch seen)
    rows = {}
    for name in (args.method, "naive"):
        step_s = {False: [], True: []}
        run_s = {False: [], True: []}
        for r in range(args.repeats):
            for cached in ((False, True) if r % 2 == 0 else (True, False)):
                out = loop_run(name, cached, args, data, tmp / f"{name}-{r}-{'cached' if cached else 'plain'}", device)
                step_s[cached].append(statistics.median(out["times"]))
                run_s[cached].append(out["run_s"])
                print(f"repeat {r} {name:<12} {'cached' if cached else 'uncached':<9} {step_s[cached][-1] * 1000:9.1f} ms/step",
                      flush=True)
        a, b = statistics.median(step_s[False]), statistics.median(step_s[True])
        rows[name] = {"uncached_step_s": a, "cached_step_s": b, "ratio": b / a, "uncached_step_s_per_repeat": step_s[False],
                      "cached_step_s_per_repeat": step_s[True], "uncached_run_s": run_s[False], "cached_run_s": run_s[True]}
    for name, row in rows.items():
        print(f"{name:<12} uncached {row['uncached_step_s'] * 1000:9.1f} ms/step   cached {row['cached_step_s'] * 1000:9.1f} ms/step"
              f"   ratio cached/uncached {row['ratio']:.3f} (target <= 1.0)")
    result = {
        "command": "python benchmarks/bench_spf.py " + " ".join(sys.argv[1:]), "measure": "cache",
        "preset": args.preset, "precision": args.precision, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(), "batch_size": args.batch_size, "n": args.n, "random_flip": args.random_flip,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "timing": "trainers.loop.Trainer log.jsonl seconds per step (data loading included), median after the warm-up;"
                  " median over repeats; the cache build is not counted (run_s holds each run's wall time)",
        "methods": rows, "ratio": {name: row["ratio"] for name, row in rows.items()}, "target": 1.0,
    }
    write_result(args.out, result)


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (tiny on CPU; sd15-random on a GPU)")
    p.add_argument("--method", default="spf", help="the SPF variant to compare with naive (spf or an ablation)")
    p.add_argument("--precision", default="no", choices=list(DTYPES))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--n", type=int, default=8, help="toy training images")
    p.add_argument("--steps", type=int, default=6, help="timed steps per side and repeat")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense peak for MFU (H100 SXM bf16: 989)")
    p.add_argument("--clip", default="auto", choices=["auto", "method", "random"],
                   help="SPF's CLIP ViT-L/14: the method's loader, or random full-size weights (auto: method for tiny)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--measure", default="flops", choices=["flops", "cache"],
                   help="flops: SPF vs naive achieved FLOP/s; cache: each with and without cache_encodings")
    p.add_argument("--random-flip", action="store_true", help="(--measure cache) train with random_flip")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="spfbench-bench-spf-"))
    make_toy_data(tmp / "data", args.n, size=get_preset(args.preset).native_size)
    if args.measure == "cache":
        return measure_cache(args, tmp / "data", tmp, device)

    sides = ["naive", args.method]
    step_s = {s: [] for s in sides}
    peaks, flops = {}, {}
    for r in range(args.repeats):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            out = run_side(side, args, tmp / "data", device, count_flops=side not in flops)
            if out["flops"] is not None:
                flops[side] = out["flops"]
            step_s[side].append(statistics.median(out["times"]))
            peaks[side] = max(peaks.get(side) or 0.0, out["peak_gib"] or 0.0) if out["peak_gib"] is not None else None
            print(f"repeat {r} {side:<12} {step_s[side][-1] * 1000:9.1f} ms/step", flush=True)

    rows = {}
    for side in sides:
        t = statistics.median(step_s[side])
        tflop = flops[side] / 1e12
        row = {"tflop_per_step": tflop, "tflop_per_sample": tflop / args.batch_size, "step_s": t,
               "step_s_per_repeat": step_s[side], "achieved_tflops": tflop / t, "samples_per_s": args.batch_size / t,
               "peak_gib": peaks[side]}
        if device.type == "cuda":
            row["mfu"] = row["achieved_tflops"] / args.peak_tflops
        rows[side] = row
    a, b = rows["naive"], rows[args.method]
    ratio = b["achieved_tflops"] / a["achieved_tflops"]
    for side in sides:
        r = rows[side]
        mem = f"   peak {r['peak_gib']:.2f} GiB   MFU {r['mfu'] * 100:.1f} %" if device.type == "cuda" else ""
        print(f"{side:<12} {r['tflop_per_step'] * 1000:10.3f} GFLOP/step   {r['step_s'] * 1000:9.1f} ms/step"
              f"   {r['achieved_tflops'] * 1000:9.2f} GFLOP/s   {r['samples_per_s']:7.2f} samples/s{mem}")
    print(f"achieved FLOP/s ratio {args.method}/naive {ratio:.3f} (target >= 0.85);"
          f" FLOP ratio {b['tflop_per_step'] / a['tflop_per_step']:.2f}, step-time ratio {b['step_s'] / a['step_s']:.2f}")
    result = {
        "command": "python benchmarks/bench_spf.py " + " ".join(sys.argv[1:]),
        "preset": args.preset, "precision": args.precision, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(), "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "gradient_checkpointing": args.gradient_checkpointing,
        "peak_tflops": args.peak_tflops if device.type == "cuda" else None,
        "flop_counter": "torch.utils.flop_counter.FlopCounterMode, one step per method (forward + backward)",
        "reference_tflop_per_sample_512px": {"spf": SPF_REFERENCE_TFLOP_PER_SAMPLE, "naive_unet": NAIVE_REFERENCE_TFLOP_PER_SAMPLE},
        "methods": rows, "flop_ratio": b["tflop_per_step"] / a["tflop_per_step"], "step_time_ratio": b["step_s"] / a["step_s"],
        "achieved_flops_ratio": ratio, "target": 0.85,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
