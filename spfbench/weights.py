"""The table of weight files behind ``spfbench weights``.

Each module that loads real weights exposes ``weight_rows() -> list[dict]`` (keys: group, name, what,
source, size, present, path) and is listed in ``PROVIDERS``; metric models and method artifacts add
themselves here as they arrive.
"""

from __future__ import annotations

import importlib

PROVIDERS = ["spfbench.models", "spfbench.metrics", "spfbench.masks"]
COLUMNS = [("name", "file"), ("what", "what"), ("source", "source"), ("size", "size"), ("present", "here")]


def all_weight_rows() -> list[dict]:
    rows = []
    for mod in PROVIDERS:
        rows.extend(importlib.import_module(mod).weight_rows())
    return rows


def format_table(rows: list[dict]) -> str:
    cells = [[("yes" if r[k] else "no") if k == "present" else str(r[k]) for k, _ in COLUMNS] for r in rows]
    heads = [h for _, h in COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*heads), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*c) for c in cells]
    return "\n".join(lines)
