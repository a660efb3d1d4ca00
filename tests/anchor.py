"""Two small runs through the command line, summarised to compare code versions (issue 25: the house was rebuilt
without changing a result). ``python tests/anchor.py OUT JSON`` writes the summary of both; the committed one
(tests/data/anchor.json) was made by the code before this rebuild (675eaf0, inside; made with PYTHONPATH
pointing at a checkout of it), and tests/test_anchor.py recomputes it with today's code.

* ``world``: 48 fine-tuning renders, 6 world triples (originals by the shipped world model), the ``original`` row
  and ``naive`` trained 20 steps at batch 8, every default world metric (Table 1's eight on small random
  backbones, GT-Target and GT-Preserve by the world's reader).
* ``tiny``: the tiny demo (``make demo-tiny``) at a quarter of its size: 8 toy portraits, 4 tiny triples, naive,
  LoRA and SPF trained 4 steps, Table 1's eight metrics and the retention table.

Against the pre-rebuild code (2026-12-07, one machine): renders, originals and the untrained rows bit-identical
or exactly equal; trained rows within what the fp16 naive artifact (issue 24) moves (world: MPS 1.7e-3, Seg-Cons
6e-3 of ~80) and the same reader decisions.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

CASES = {
    "world": {
        "config": {"all": {"max_train_steps": 20, "train_batch_size": 8, "learning_rate": 5e-4, "checkpointing_steps": 20}},
        "methods": ("original", "naive"),
    },
    "tiny": {
        "config": {"all": {"max_train_steps": 4, "checkpointing_steps": 4, "learning_rate": 1e-4},
                   "lora": {"rank": 4, "learning_rate": 1e-3}},
        "methods": ("naive", "lora", "spf"),
    },
}


DRIVER = """
import json, sys
from spfbench.cli import app
for args in json.loads(sys.argv[1]):
    app(args, prog_name="spfbench", standalone_mode=False)
"""


def _spfbench(commands: list[list]) -> None:
    """The commands in one process, one after the other (one interpreter start, not one per command: the same
    commands whichever code version runs them)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = json.dumps([[str(a) for a in c] for c in commands])
    r = subprocess.run([sys.executable, "-c", DRIVER, args], env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"spfbench {args} failed:\n{r.stderr[-3000:]}")


def _samples(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["id"]: {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} for r in rows}


def compute(case: str, out: Path) -> dict:
    spec, out = CASES[case], Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(spec["config"]))
    extra = []
    if case == "world":
        commands = [["world", "data", "--split", "finetune", "--n", 48, "--out", out / "data"],
                    ["world", "captions", "--n", 6, "--out", out / "captions.jsonl"],
                    ["build-testset", "--preset", "world", "--captions", out / "captions.jsonl", "--out", out / "testset", "--no-progress"]]
    else:
        extra = ["--retention"]
        commands = [["make-toy-data", "--out", out / "data", "--n", 8],
                    ["build-testset", "--preset", "tiny", "--n", 4, "--steps", 4, "--out", out / "testset", "--no-progress"]]
    commands.append(["run", "--testset", out / "testset", "--data", out / "data", "--out", out / "run", "--config", out / "config.json",
                     *[a for m in spec["methods"] for a in ("--method", m)], *extra, "--no-progress"])
    _spfbench(commands)
    data = sorted((out / "data").rglob("*.png"))
    originals = sorted((out / "testset" / "originals").glob("*.png"))
    summary = {
        "data_png_sha256": hashlib.sha256(b"".join(p.read_bytes() for p in data)).hexdigest(),
        "originals_png_sha256": {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in originals},
        "samples": {m: _samples(out / "run" / "methods" / m / "score" / "samples.jsonl") for m in spec["methods"]},
    }
    if extra:
        summary["retention"] = {m: _samples(out / "run" / "methods" / m / "retention" / "score" / "samples.jsonl")
                                for m in spec["methods"] if (out / "run" / "methods" / m / "retention" / "score").is_dir()}
    return summary


if __name__ == "__main__":
    root = Path(sys.argv[1])
    result = {case: compute(case, root / case) for case in CASES}
    rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    Path(sys.argv[2]).write_text(json.dumps({"commit": rev, **result}, indent=1, sort_keys=True) + "\n")
