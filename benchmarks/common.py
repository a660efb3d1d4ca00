"""Pieces every benchmark script shares (run the scripts from the repository root or anywhere: this
folder is on ``sys.path`` when a script in it runs)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_result(path: Path | None, result: dict) -> None:
    """Write the figures as JSON (for results/), if a path was given."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"written {path}")
