"""A small Portrait World run through the command line, summarised to compare code versions (issue 25: the house
was rebuilt without changing a result). ``python tests/world_anchor.py OUT JSON`` writes the summary; the
committed one (tests/data/world_anchor.json) was made by the code before this rebuild (675eaf0, inside; made
with PYTHONPATH pointing at a checkout of it), and tests/test_world_anchor.py recomputes it with today's code.
Against it (2026-12-07, this machine): renders and the six originals bit-identical, the original row's scores
exactly equal, naive's within 1.7e-3 (MPS) / 6e-3 (Seg-Cons, of ~80) and the same reader decisions: what its
fp16 artifact changes.

The run: 48 fine-tuning renders, 6 world triples (originals by the shipped world model), the ``original`` row
and ``naive`` trained 20 steps at batch 8, scored with the world's default metrics (Table 1's eight on small
random backbones, GT-Target and GT-Preserve by the world's reader).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

CONFIG = {"all": {"max_train_steps": 20, "train_batch_size": 8, "learning_rate": 5e-4, "checkpointing_steps": 20}}
METHODS = ("original", "naive")


def _spfbench(*args) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "spfbench", *map(str, args)], check=True, env=env, capture_output=True, text=True)


def compute(out: Path) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIG))
    _spfbench("world", "data", "--split", "finetune", "--n", 48, "--out", out / "data")
    _spfbench("world", "captions", "--n", 6, "--out", out / "captions.jsonl")
    _spfbench("build-testset", "--preset", "world", "--captions", out / "captions.jsonl", "--out", out / "testset", "--no-progress")
    _spfbench("run", "--testset", out / "testset", "--data", out / "data", "--out", out / "run", "--config", out / "config.json",
              *[a for m in METHODS for a in ("--method", m)], "--no-progress")
    data = sorted((out / "data").rglob("*.png"))
    originals = sorted((out / "testset" / "originals").glob("*.png"))
    summary = {
        "data_png_sha256": hashlib.sha256(b"".join(p.read_bytes() for p in data)).hexdigest(),
        "originals_png_sha256": {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in originals},
        "samples": {},
    }
    for m in METHODS:
        rows = [json.loads(line) for line in (out / "run" / "methods" / m / "score" / "samples.jsonl").read_text().splitlines()]
        summary["samples"][m] = {r["id"]: {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                                 for r in rows}
    return summary


if __name__ == "__main__":
    result = compute(Path(sys.argv[1]))
    rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    Path(sys.argv[2]).write_text(json.dumps({"commit": rev, **result}, indent=1, sort_keys=True) + "\n")
