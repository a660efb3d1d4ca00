"""The rebuilt house computes what the old one did (issue 25): a small Portrait World run through the command line
(tests/world_anchor.py: renders, world originals, the original row and naive trained 20 steps, every default
world metric) against the summary the code before the rebuild wrote (tests/data/world_anchor.json, its commit
inside). Renders are bit-exact; generated images and scores agree within CPU rounding (another CPU rounds the
last float digits differently: an image may differ by a PNG level, a score by a little; the reader's decisions of
the untrained row not at all)."""

import json
import math
from pathlib import Path

import pytest

from world_anchor import compute

ANCHOR = Path(__file__).parent / "data" / "world_anchor.json"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_small_world_run_reproduces_the_summary_of_the_code_before_the_rebuild(tmp_path):
    want = json.loads(ANCHOR.read_text())
    got = compute(tmp_path)
    assert got["data_png_sha256"] == want["data_png_sha256"]  # the renderer: bit for bit
    assert set(got["originals_png_sha256"]) == set(want["originals_png_sha256"])
    same = sum(got["originals_png_sha256"][k] == v for k, v in want["originals_png_sha256"].items())
    assert same >= len(want["originals_png_sha256"]) - 1, "the world model's originals changed"
    for method, rows in want["samples"].items():
        assert set(got["samples"][method]) == set(rows), method
        for tid, values in rows.items():
            for metric, v in values.items():
                g = got["samples"][method][tid][metric]
                if metric.startswith("gt-"):  # the reader's 0/1 decisions: exact untrained; after training, the mean below
                    assert g == v or method != "original", (method, tid, metric)
                else:  # trained: the naive artifact is saved in fp16 since (MPS moved 1.7e-3, Seg-Cons 6e-3 of ~80)
                    tol = (2e-3 if method == "original" else 1e-2) * max(1.0, abs(v))
                    assert math.isclose(g, v, abs_tol=tol), (method, tid, metric, g, v)
        for metric in next(iter(rows.values())):
            mean_got = sum(r[metric] for r in got["samples"][method].values()) / len(rows)
            mean_want = sum(r[metric] for r in rows.values()) / len(rows)
            assert math.isclose(mean_got, mean_want, abs_tol=1e-3 * max(1.0, abs(mean_want)) + (0.2 if metric.startswith("gt-") else 0)), (method, metric)
