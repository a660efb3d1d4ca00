"""Pieces every benchmark script shares (run the scripts from the repository root or anywhere: this
folder is on ``sys.path`` when a script in it runs)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_peak(device: torch.device) -> float | None:
    """Free what an earlier run left (Python cycles, the caching allocator) and restart the GPU peak, so
    the next run's peak is its own; returns the GiB still allocated (what the peak cannot shed)."""
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**30


def write_result(path: Path | None, result: dict) -> None:
    """Write the figures as JSON (for results/), if a path was given."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"written {path}")
