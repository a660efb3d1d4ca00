"""Training step time (and peak GPU memory) of the shared loop vs a plain hand-written diffusers step.

Per method, on the same model, data, batch size and precision:
* "plain": a hand-written loop in the shape of diffusers' ``train_text_to_image*.py`` examples (fetch,
  loss, backward, clip, AdamW step, zero_grad) around the method's own loss and hooks (for naive and
  LoRA that loss is the examples' VAE encode + noise + UNet + MSE) and trainable parameters
  (``Method.setup``), one random stream, no accelerate, no logging, no checkpoints;
* "spfbench": :class:`trainers.loop.Trainer` (accelerate, seeded per-step generators, JSONL log,
  method hooks), step times read from its log, checkpoints off.
Each side runs ``--steps`` steps after ``--warmup`` untimed ones; the figure is the median step time,
sides alternating over ``--repeats``. Targets: the loop adds <= 5 % (ratio <= 1.05); LoRA's peak memory
below naive's (GPU only: ``torch.cuda.max_memory_allocated``).

    python benchmarks/bench_train.py --preset tiny                                   # CPU
    python benchmarks/bench_train.py --preset sd15-random --precision bf16 --batch-size 4 --n 16   # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import fresh_peak, sync, write_result  # noqa: E402

import trainers  # noqa: E402
from spfbench.data import PortraitDataset, collate  # noqa: E402
from spfbench.models import load_pipeline  # noqa: E402
from spfbench.toydata import make_toy_data  # noqa: E402
from trainers.base import Models  # noqa: E402
from trainers.loop import Trainer, training_scheduler  # noqa: E402

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}



def plain_steps(method_name, cfg, args, data, device) -> tuple[list[float], float | None]:
    """The hand-written step; returns per-step seconds (after warm-up), the peak GPU GiB (model loading
    included, as in the loop's) and the GiB left allocated before it started."""
    left = fresh_peak(device)
    pipe, _ = load_pipeline(args.preset, device=device, dtype=torch.float32)
    wd = DTYPES[args.precision]
    models = Models(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, training_scheduler(pipe), wd)
    for m in (pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
        torch.nn.Module.to(m, dtype=wd)
    method = trainers.create(method_name, cfg)
    params = method.setup(models)
    opt = torch.optim.AdamW(params, lr=method.config.learning_rate)
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    ds = PortraitDataset(data, resolution=res)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, collate_fn=collate, drop_last=True)
    autocast = torch.autocast(device.type, dtype=wd, enabled=args.precision != "no")
    g = torch.Generator(device)  # one stream for the whole run
    times, step = [], 0
    sync(device)
    t = time.perf_counter()
    while step < args.warmup + args.steps:
        for batch in loader:  # the step time includes fetching the batch, as the loop's does
            with autocast:
                loss, _ = method.loss(models, batch, g)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            method.after_backward(models, step)
            opt.step()
            method.after_step(models, step)
            opt.zero_grad(set_to_none=True)
            loss.item()
            sync(device)
            now = time.perf_counter()
            if step >= args.warmup:
                times.append(now - t)
            t = now
            step += 1
            if step >= args.warmup + args.steps:
                break
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return times, peak, left


def loop_steps(method_name, cfg, args, data, device, out: Path) -> tuple[list[float], float | None]:
    method = trainers.create(method_name, {**cfg, "max_train_steps": args.warmup + args.steps, "checkpointing_steps": 10**9,
                                           "checkpoints_total_limit": 1, "mixed_precision": args.precision,
                                           "train_batch_size": args.batch_size})
    left = fresh_peak(device)
    Trainer(method, data, out, preset=args.preset, device=None if device.type == "cuda" else "cpu").run(progress=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return [e["seconds"] for e in log[args.warmup:]], peak, left


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--method", action="append", help="method (repeatable; default naive, lora, adalora)")
    p.add_argument("--precision", default="no", choices=list(DTYPES))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--n", type=int, default=8, help="toy training images")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="spfbench-bench-train-"))
    from spfbench.models import get_preset

    size = get_preset(args.preset).native_size
    make_toy_data(tmp / "data", args.n, size=size)
    rows = {}
    for name in args.method or ["naive", "lora", "adalora"]:
        cfg = {"max_train_steps": args.warmup + args.steps}
        plain, ours, peaks, left = [], [], {"plain": [], "loop": []}, []
        for r in range(args.repeats):
            order = ["plain", "loop"] if r % 2 == 0 else ["loop", "plain"]
            for side in order:
                if side == "plain":
                    t, peak, lf = plain_steps(name, cfg, args, tmp / "data", device)
                    plain.append(statistics.median(t))
                else:
                    t, peak, lf = loop_steps(name, cfg, args, tmp / "data", device, tmp / f"{name}-{r}")
                    ours.append(statistics.median(t))
                peaks[side].append(peak)
                left.append(lf)
        a, b = statistics.median(plain), statistics.median(ours)
        samples = args.batch_size / b
        gpu = device.type == "cuda"
        peak = {k: max(v) if gpu else None for k, v in peaks.items()}  # over repeats: each run starts freed
        rows[name] = {"plain_step_s": a, "loop_step_s": b, "ratio": b / a, "loop_samples_per_s": samples,
                      "plain_peak_gib": peak["plain"], "loop_peak_gib": peak["loop"],
                      "peak_gib_per_run": peaks if gpu else None, "left_allocated_gib_max": max(left) if gpu else None}
        mem = f"   peak GiB plain {peak['plain']:.2f} loop {peak['loop']:.2f} (left before a run <= {max(left):.2f})" if gpu else ""
        print(f"{name:<8} plain {a * 1000:8.1f} ms/step   loop {b * 1000:8.1f} ms/step   ratio {b / a:5.3f} (target <= 1.05){mem}", flush=True)
    result = {"command": "python benchmarks/bench_train.py " + " ".join(sys.argv[1:]), "preset": args.preset,
              "precision": args.precision, "device": str(device), "cpu_threads": torch.get_num_threads(),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats, "methods": rows}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
