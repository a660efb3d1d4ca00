"""What blocks "glasses" and "freckles" on the v3 world (issue 20): a picture of originals, naive's images
and fine-tuning renders for those two target texts.

Rows, 8 triples each: originals of the "glasses" triples, naive's images of them, originals of the
"freckles" triples, naive's images of them, then 8 fine-tuning renders with glasses and 8 with freckles.

Usage: python results/world/regimes_faces.py TESTSET RUN DATA  -> results/world/regimes_faces.png
(made with: runs/world-exp/testset-cfg3 runs/probe/r1 runs/world-exp/data; r1 = naive at lr 1e-4, 3,000
steps x 16, CFG 3)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

from spfbench.testset import load_testset

SIZE = 96  # pixels per 64-px image in the sheet (nearest-neighbour upscaling: the pixels as they are)


def main(testset: str, run: str, data: str) -> None:
    _, triples = load_testset(testset)
    rows = []
    for text in ("glasses", "freckles"):
        ts = [t for t in triples if t.target_text == text][:8]
        rows.append([Path(testset) / "originals" / f"{t.id}.png" for t in ts])
        rows.append([Path(run) / "methods" / "naive" / "images" / f"{t.id}.png" for t in ts])
    meta = [json.loads(line) for line in (Path(data) / "metadata.jsonl").read_text().splitlines() if line.strip()]
    for text in ("glasses", "freckles"):
        rows.append([Path(data) / r["file_name"] for r in meta if r["target_text"] == text][:8])
    sheet = Image.new("RGB", (8 * SIZE, len(rows) * SIZE), "white")
    for i, row in enumerate(rows):
        for j, f in enumerate(row):
            sheet.paste(Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.NEAREST), (j * SIZE, i * SIZE))
    sheet.save(Path(__file__).parent / "regimes_faces.png")


if __name__ == "__main__":
    main(*sys.argv[1:4])
