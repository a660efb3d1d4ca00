"""Start-up of the command line: ``spfbench --help`` against importing torch, side by side in one run.

The CLI must answer ``--help`` and refuse a bad option before any model library loads (docs/architecture.md);
the ratio says how much of a torch import the start costs (well below 1 when torch is not imported).

    python benchmarks/bench_startup.py --out results/startup_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    help_cmd = [sys.executable, "-m", "spfbench", "--help"]
    torch_cmd = [sys.executable, "-c", "import torch"]
    wall(help_cmd), wall(torch_cmd)  # warm the file cache
    runs = [(wall(help_cmd), wall(torch_cmd)) for _ in range(a.repeats)]
    h, t = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    result = {"command": "python benchmarks/bench_startup.py" + (f" --out {a.out}" if a.out else ""), "repeats": a.repeats,
              "help_s_median": h, "import_torch_s_median": t, "ratio_help_over_torch_import": h / t,
              "runs": [{"help_s": x, "import_torch_s": y} for x, y in runs]}
    write_result(a.out, result)
    print(f"spfbench --help {h:.2f} s, import torch {t:.2f} s: ratio {h / t:.2f}")


if __name__ == "__main__":
    main()
