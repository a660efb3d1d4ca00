"""Which attributes moved: a `spfbench run` on Portrait World read back attribute by attribute.

``attribute_report(run)`` reads every original of the run's test set and every method's customized
image with the shipped attribute reader and gives, per method:

* ``kept[attr]``: the share of triples whose ``attr`` is read the same on the original and on the
  customized image (the per-attribute view of GT-Preserve; the target's own attribute is left out of
  its triples, so each ``kept`` has its own N, given in ``n[attr]``);
* ``distribution[attr][value]``: the share of customized images read with that value (the originals'
  own distribution is the ``original images`` row), which shows *where* a moved attribute went (e.g.
  hair turning to the fine-tuning set's blonde and red);
* ``target[target_text]``: the share of that target's triples whose customized image shows it (the
  per-target view of GT-Target).

Methods whose images are missing are skipped with a note. Written by ``spfbench world attributes RUN``
as ``RUN/attributes.json`` and ``RUN/attributes.md`` (atomic; rerun any time, nothing else changes).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from ..errors import SpfbenchError
from ..io import atomic_write_json, atomic_write_text
from .attributes import ATTRIBUTES, SCHEMA, TARGET_TEXTS

ORIGINAL_ROW = "original images"


def _read_all(reader, paths: list[Path], batch_size: int = 256) -> list[dict]:
    from PIL import Image

    out: list[dict] = []
    for i in range(0, len(paths), batch_size):
        ims = []
        for p in paths[i : i + batch_size]:
            with Image.open(p) as im:
                ims.append(im.convert("RGB"))
        out += reader.read(ims)
    return out


def _distribution(reads: list[dict]) -> dict:
    n = len(reads)
    return {a: {v: sum(1 for r in reads if r[a] == v) / n for v in SCHEMA[a]} for a in ATTRIBUTES} if n else {}


def attribute_report(run: str | os.PathLike, reader=None) -> dict:
    """Per-attribute preservation, value distributions and per-target responsiveness of a world run."""
    from ..testset import load_testset
    from .reader import load_reader

    run = Path(run)
    record_path = run / "run.json"
    if not record_path.is_file():
        raise SpfbenchError(f"{run} is not a `spfbench run` folder (no run.json)")
    record = json.loads(record_path.read_text())
    testset = Path(record["spec"]["testset"])
    limit = record["spec"].get("limit")
    _, triples = load_testset(testset)
    triples = triples[:limit] if limit else triples
    unknown = sorted({t.target_text for t in triples if t.target_text.strip().lower() not in TARGET_TEXTS})
    if unknown:
        raise SpfbenchError(f"not a Portrait World test set: target texts {unknown[:3]} are not world targets (spfbench world captions)")
    reader = reader or load_reader()
    originals = _read_all(reader, [testset / t.original for t in triples])
    out = {"run": str(run), "testset": str(testset), "triples": len(triples), "methods": {}, "skipped": {},
           "original_distribution": _distribution(originals)}
    for method in record.get("methods", []):
        folder = run / "methods" / method / "images"
        paths = [folder / f"{t.id}.png" for t in triples]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            out["skipped"][method] = f"{len(missing)} of {len(paths)} images missing"
            continue
        reads = _read_all(reader, paths)
        kept, n = Counter(), Counter()
        target_hit, target_n = Counter(), Counter()
        for t, o, c in zip(triples, originals, reads):
            ta, tv = TARGET_TEXTS[t.target_text.strip().lower()]
            target_n[t.target_text] += 1
            target_hit[t.target_text] += int(c[ta] == tv)
            for a in ATTRIBUTES:
                if a != ta:
                    n[a] += 1
                    kept[a] += int(o[a] == c[a])
        out["methods"][method] = {
            "kept": {a: kept[a] / n[a] for a in ATTRIBUTES if n[a]},
            "n": {a: n[a] for a in ATTRIBUTES},
            "distribution": _distribution(reads),
            "target": {k: target_hit[k] / target_n[k] for k in sorted(target_n)},
            "target_n": dict(sorted(target_n.items())),
        }
    return out


def format_markdown(rep: dict) -> str:
    """Three tables: kept per attribute, target shown per target text, value shares of the moved attributes."""
    methods = list(rep["methods"])
    lines = [f"Attribute reads of {rep['triples']} triples (run {rep['run']}); reader: spfbench/world/weights/reader.safetensors.", ""]
    lines += ["Kept: share of triples whose attribute is read the same on the original and the customized image "
              "(the target's own attribute excluded).", ""]
    lines.append("| Method | " + " | ".join(ATTRIBUTES) + " |")
    lines.append("|---|" + "---:|" * len(ATTRIBUTES))
    for m in methods:
        k = rep["methods"][m]["kept"]
        lines.append(f"| {m} | " + " | ".join(f"{k[a]:.2f}" if a in k else "-" for a in ATTRIBUTES) + " |")
    targets = sorted({t for m in methods for t in rep["methods"][m]["target"]})
    lines += ["", "Target shown: share of the target's triples whose customized image is read with it.", ""]
    lines.append("| Method | " + " | ".join(targets) + " |")
    lines.append("|---|" + "---:|" * len(targets))
    for m in methods:
        tt, tn = rep["methods"][m]["target"], rep["methods"][m]["target_n"]
        lines.append(f"| {m} | " + " | ".join(f"{tt[t]:.2f} (N={tn[t]})" if t in tt else "-" for t in targets) + " |")
    lines += ["", "Value shares (customized images; first row: the originals).", ""]
    from .attributes import CAPTIONED

    for a in [a for a in ATTRIBUTES if a not in CAPTIONED]:
        vals = SCHEMA[a]
        lines.append(f"**{a}**")
        lines.append("")
        lines.append("| Images | " + " | ".join(vals) + " |")
        lines.append("|---|" + "---:|" * len(vals))
        rows = [(ORIGINAL_ROW, rep["original_distribution"])] + [(m, rep["methods"][m]["distribution"]) for m in methods]
        for name, d in rows:
            lines.append(f"| {name} | " + " | ".join(f"{d[a][v]:.2f}" for v in vals) + " |")
        lines.append("")
    for m, why in rep["skipped"].items():
        lines.append(f"Skipped {m}: {why}.")
    return "\n".join(lines).rstrip() + "\n"


def write_attribute_report(run: str | os.PathLike, reader=None) -> dict:
    rep = attribute_report(run, reader)
    run = Path(run)
    atomic_write_json(run / "attributes.json", rep)
    atomic_write_text(run / "attributes.md", format_markdown(rep))
    return rep
