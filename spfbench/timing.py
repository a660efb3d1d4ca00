"""What a stage of a run cost: wall seconds and peak memory, appended per attempt to a ``timings.json``.

``spfbench run`` writes ``RUN/methods/M/timings.json`` (fit, generate, score, ...) and ``spfbench score``
writes ``OUT/timings.json`` (per metric); ``spfbench plan`` calibrates from them and checks its estimate
against them (spfbench/plan.py, docs/plan.md). A resumed stage appends another attempt: the cost of a
stage is the sum over its attempts.

Peak memory: on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``, reset at the start of each
timed stage); on CPU the process's peak resident set (``ru_maxrss``), which cannot be reset: it is the
peak of the process so far, an upper bound for the stage.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .io import atomic_write_json


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    """``{"peak_memory_bytes": int, "memory": what it measures}`` since the last reset (CUDA) or process start (CPU)."""
    if torch.cuda.is_available():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "memory": "cuda max_memory_allocated"}
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_bytes": int(rss if sys.platform == "darwin" else rss * 1024), "memory": "process peak RSS (cpu)"}


def read_attempts(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text()).get("attempts", []))
    except (OSError, ValueError, AttributeError):
        return []


def append_attempt(path: Path, entry: dict) -> None:
    """Add one attempt's record to ``path`` (``{"attempts": [...]}``), atomically."""
    attempts = read_attempts(path) + [{"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry}]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(path), {"attempts": attempts})


@contextmanager
def timed(record: dict, stage: str):
    """Time the block as ``record[stage] = {"seconds", "peak_memory_bytes", "memory"}`` (written even if it raises)."""
    reset_peak_memory()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        record[stage] = {"seconds": round(time.perf_counter() - t0, 4), **peak_memory()}


def total_seconds(attempts: list[dict], stage: str) -> float | None:
    """Seconds of ``stage`` summed over the attempts that ran it (None: no attempt did)."""
    found = [a["stages"][stage]["seconds"] for a in attempts if stage in a.get("stages", {})]
    return sum(found) if found else None


__all__ = ["append_attempt", "peak_memory", "read_attempts", "reset_peak_memory", "timed", "total_seconds"]
