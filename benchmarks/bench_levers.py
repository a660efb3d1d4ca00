"""Speed levers of the training loop (issue 23, item 3), each against the default, side by side in one run.

Per lever (a ``TrainConfig`` field: ``fused_adamw``, ``channels_last``, ``dataloader_num_workers=N``,
``compile_unet``, ``allow_tf32``), the same method, data, seed and steps as the default; the variants
alternate within each of ``--repeats`` rounds so that a machine's drift hits them alike. Figures per lever:

* ``ratio``: median step time with the lever / without (steps after ``--warmup``, read from the loop's
  own log, so model loading and compilation are outside it; compilation shows in ``first_step_ratio``);
* ``loss_max_rel_diff``: the largest relative difference of the logged losses from the default's;
* ``weights_rel_diff``: ||artifact - default artifact|| / ||default artifact - initial weights|| over the
  trained tensors: how far the lever moved the result, relative to how far training moved it.

A lever is worth turning on by default where ``ratio`` is clearly below 1 and the differences are within
docs/training.md's tolerance. Run from the repository root:

    python benchmarks/bench_levers.py --preset tiny --out results/levers_tiny_cpu.json            # CPU
    python benchmarks/bench_levers.py --preset sd15-random --precision bf16 --batch-size 8 --steps 20 \\
        --levers fused_adamw,channels_last,allow_tf32,compile_unet,dataloader_num_workers=4 --out results/levers_sd15_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_result  # noqa: E402

import trainers  # noqa: E402
from spfbench.models import load_pipeline  # noqa: E402
from spfbench.toydata import make_toy_data  # noqa: E402
from trainers.loop import Trainer  # noqa: E402

DEFAULT_LEVERS = "fused_adamw,channels_last,dataloader_num_workers=2"


def parse_levers(text: str) -> dict[str, dict]:
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, value = item.partition("=")
        out[item] = {name: int(value) if value else True}
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found = {}
    for f in sorted(folder.rglob("*.safetensors")):
        found.update({f"{f.relative_to(folder)}:{k}": v.float() for k, v in load_file(f).items()})
    return found


def one(method: str, cfg: dict, data: Path, out: Path, preset: str, device: str):
    t0 = time.perf_counter()
    result = Trainer(trainers.create(method, cfg), data, out, preset=preset, device=device).run(progress=False)
    wall = time.perf_counter() - t0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [e["seconds"] for e in log], [e["loss"] for e in log], result.artifact, wall


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--method", default="naive")
    p.add_argument("--data", type=Path, default=None, help="training set (default: 32 toy portraits at the model's size)")
    p.add_argument("--levers", default=DEFAULT_LEVERS)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    levers = parse_levers(a.levers)
    base_cfg = {"max_train_steps": a.warmup + a.steps, "train_batch_size": a.batch_size, "mixed_precision": a.precision,
                "checkpointing_steps": 10**6, "learning_rate": 1e-4, "seed": 0}
    tmp = Path(tempfile.mkdtemp(prefix="bench-levers-"))
    data = a.data
    if data is None:
        pipe, _ = load_pipeline(a.preset, device="cpu")
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        data = tmp / "data"
        make_toy_data(data, 32, seed=0, size=size)
    initial = {k: v.float() for k, v in load_pipeline(a.preset, device="cpu")[0].unet.state_dict().items()}
    variants = {"default": {}, **levers}
    times: dict[str, list[float]] = {v: [] for v in variants}
    first: dict[str, list[float]] = {v: [] for v in variants}
    losses, artifacts = {}, {}
    for r in range(a.repeats):
        for name, extra in variants.items():
            secs, loss, artifact, _ = one(a.method, {**base_cfg, **extra}, data, tmp / f"{name}-{r}", a.preset, device)
            times[name] += secs[a.warmup:]
            first[name].append(secs[0])
            if r == 0:
                losses[name], artifacts[name] = loss, tensors(artifact)
    base_med = statistics.median(times["default"])
    rows = {}
    base_art = artifacts["default"]
    for name in variants:
        med = statistics.median(times[name])
        art = artifacts[name]
        diff = sum(float((art[k] - base_art[k]).pow(2).sum()) for k in base_art if k in art) ** 0.5
        moved = 0.0
        for k, v in base_art.items():
            key = k.split(":", 1)[1]
            if key in initial and initial[key].shape == v.shape:
                moved += float((v - initial[key]).pow(2).sum())
        rows[name] = {
            "config": variants[name], "median_step_s": med, "ratio": med / base_med,
            "first_step_ratio": statistics.median(first[name]) / statistics.median(first["default"]),
            "loss_max_rel_diff": max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(losses[name], losses["default"])),
            "weights_rel_diff": diff / moved ** 0.5 if moved else None,
        }
        print(f"{name:32s} step {med * 1e3:8.1f} ms  ratio {rows[name]['ratio']:.3f}  loss diff {rows[name]['loss_max_rel_diff']:.2e}"
              f"  weights diff {rows[name]['weights_rel_diff'] if rows[name]['weights_rel_diff'] is not None else float('nan'):.2e}")
    result = {"command": "python benchmarks/bench_levers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "preset": a.preset, "method": a.method, "device": device,
              "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch_threads": torch.get_num_threads(), "batch_size": a.batch_size, "precision": a.precision,
              "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats, "levers": rows}
    write_result(a.out, result)
    return result


if __name__ == "__main__":
    main()
