"""The small training engine the world's training loops share (docs/world.md, "Layout").

What a resumable CPU training run needs besides its step: atomic saves (on :mod:`spfbench.io`'s atomic
writes), a checkpoint resumed only by the same arguments, a JSONL log trimmed back to the checkpoint a
resumed run starts from, a warm-up + cosine learning rate, an exponential moving average of weights, and
one step loop with a progress bar that logs, checkpoints and stops where asked (as if killed).

Used by the world's original model (``spfbench.world.train_vae``, ``train_unet``), its VAE decoder
fine-tune (``spfbench.world.vae``), its attribute reader and its CLIP. The method trainers
(``trainers/loop.py``) have their own accelerate loop.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Callable

from .errors import SpfbenchError
from .io import atomic_write_bytes, atomic_write_text

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
# arguments that may change between a run and its resumption: how fast or how far, never what is computed
RESUMABLE = ("stop_at", "threads", "progress")


# ------------------------------------------------------------------------------------------ files


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` at ``path`` atomically (parent folders made)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """A safetensors file at ``path`` atomically, world-readable (shipped in the repository); parent folders made."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    os.chmod(path, 0o644)
    return path


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """One JSON row appended to a log."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def trim_jsonl(path: str | os.PathLike, step: int) -> None:
    """Drop the log rows written after ``step`` (the checkpoint a resumed run starts from)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


# ------------------------------------------------------------------------------------------ checkpoints


def check_same_args(saved: dict, now: dict, what: str, where: str | os.PathLike) -> None:
    """A clear error when a checkpoint (or card) at ``where`` was written with other arguments than ``now``
    (those in :data:`RESUMABLE` aside)."""
    keys = sorted(set(now) | set(saved), key=list({**now, **saved}).index)
    diffs = [k for k in keys if k not in RESUMABLE and saved.get(k) != now.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in diffs[:4])
        raise SpfbenchError(f"{where} holds a {what} checkpoint of another training ({detail}); use another folder or the same arguments")


def resume(folder: str | os.PathLike, args: dict, what: str, opt, sched, generator, log=print):
    """``(checkpoint, step, seconds)`` of ``folder/checkpoint.pt`` (weights-only load) with the optimizer, LR
    schedule and random generator restored and ``folder/log.jsonl`` trimmed to it; ``(None, 0, 0.0)`` (and a
    stale log removed) when there is none. The caller loads its own modules from the checkpoint, which
    holds ``args``, ``step``, ``seconds``, ``opt``, ``sched`` and ``rng`` (:func:`checkpoint`)."""
    import torch

    folder = Path(folder)
    ckpt_path, log_path = folder / CHECKPOINT, folder / LOG
    if not ckpt_path.is_file():
        if log_path.exists():
            log_path.unlink()
        return None, 0, 0.0
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    check_same_args(ck["args"], args, what, folder)
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    generator.set_state(ck["rng"])
    trim_jsonl(log_path, ck["step"])
    log(f"resuming {what} training at step {ck['step']}")
    return ck, ck["step"], ck["seconds"]


def checkpoint(args: dict, step: int, seconds: float, opt, sched, generator, **state) -> dict:
    """What :func:`resume` reads back: the run's arguments, step and seconds, optimizer, LR schedule and
    random generator states, and the caller's own ``state`` (module weights, EMA, ...)."""
    return {"args": args, "step": step, "seconds": seconds, **state, "opt": opt.state_dict(), "sched": sched.state_dict(),
            "rng": generator.get_state()}


# ------------------------------------------------------------------------------------------ schedule, EMA


def warmup_cosine(warmup: int, total: int, schedule: str = "cosine", floor: float = 0.1) -> Callable[[int], float]:
    """A ``LambdaLR`` factor: linear warm-up over ``warmup`` steps, then constant (``schedule="constant"``)
    or a cosine from 1 down to ``floor`` at step ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))

    return factor


class EMA:
    """An exponential moving average of ``modules``' parameters; the decay warms up as ``(1 + step) / (10 + step)``."""

    def __init__(self, modules, decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    def update(self, step: int) -> None:
        import torch

        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    def copy_to(self, modules) -> None:
        copy_params(modules, self.shadow)


def copy_params(modules, tensors) -> None:
    """Copy ``tensors`` (in ``parameters()`` order of ``modules``, as :class:`EMA` keeps them) into the modules."""
    import torch

    params = [p for m in modules for p in m.parameters()]
    if len(params) != len(tensors):
        raise SpfbenchError(f"{len(tensors)} saved tensors for {len(params)} parameters: not this architecture's checkpoint")
    with torch.no_grad():
        for p, s in zip(params, tensors):
            p.copy_(s)


# ------------------------------------------------------------------------------------------ the step loop


def run_steps(
    one_step: Callable[[int], dict],
    step: int,
    steps: int,
    *,
    sched,
    stop_at: int | None = None,
    log_every: int = 1,
    log_path: str | os.PathLike | None = None,
    on_log: Callable[[dict], None] | None = None,
    save: Callable[[int], None] | None = None,
    ckpt_every: int = 1,
    elapsed: Callable[[], float] = lambda: 0.0,
    desc: str = "",
    progress: bool = False,
) -> int:
    """Run training steps ``step`` .. ``min(steps, stop_at)``; returns the step reached.

    ``one_step(step)`` does one optimizer step and returns the numbers to log. Every ``log_every`` steps and
    at the end a row ``{"step", the numbers averaged over those steps, "lr", "seconds"}`` is appended to
    ``log_path`` and passed to ``on_log``; ``save(step)`` runs every ``ckpt_every`` steps and at the end."""
    from tqdm import tqdm

    end = steps if stop_at is None else min(steps, stop_at)
    bar = tqdm(total=steps, initial=step, desc=desc, disable=not progress)
    run: list[dict] = []
    while step < end:
        run.append(one_step(step))
        step += 1
        bar.update(1)
        if step % log_every == 0 or step == end:
            row = {"step": step, **{k: sum(r[k] for r in run) / len(run) for k in run[0]}, "lr": sched.get_last_lr()[0],
                   "seconds": round(elapsed(), 1)}
            if log_path is not None:
                append_jsonl(log_path, row)
            if on_log is not None:
                on_log(row)
            first = next(iter(run[0]))
            bar.set_postfix({first: f"{row[first]:.4f}"})
            run = []
        if save is not None and (step % ckpt_every == 0 or step == end):
            save(step)
    bar.close()
    return step
