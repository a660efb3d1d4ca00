"""The rebuilt house computes what the old one did (issue 25): the committed world tables' pipeline and the tiny
demo, each as a small run through the command line (tests/anchor.py), against the summary the code before the
rebuild wrote (tests/data/anchor.json, its commit inside). Renders and toy data are bit-exact; generated
images and scores agree within CPU rounding (another CPU rounds the last float digits differently: an
original may differ by a PNG level, a score by a little; the reader's decisions on untrained rows not at all)."""

import json
import math
from pathlib import Path

import pytest

from anchor import compute

ANCHOR = Path(__file__).parent / "data" / "anchor.json"
pytestmark = pytest.mark.usefixtures("one_thread")
UNTRAINED = {"original"}


def _close(got: dict, want: dict, what: str) -> None:
    for method, rows in want.items():
        assert set(got[method]) == set(rows), (what, method)
        for tid, values in rows.items():
            for metric, v in values.items():
                g = got[method][tid][metric]
                if metric.startswith("gt-"):  # the reader's 0/1 decisions: exact untrained; after training, the mean below
                    assert g == v or method not in UNTRAINED, (what, method, tid, metric)
                else:  # trained rows: the naive artifact is saved in fp16 since issue 24
                    tol = (2e-3 if method in UNTRAINED else 1e-2) * max(1.0, abs(v))
                    assert math.isclose(g, v, abs_tol=tol), (what, method, tid, metric, g, v)
        for metric in next(iter(rows.values())):
            mean_got = sum(r[metric] for r in got[method].values()) / len(rows)
            mean_want = sum(r[metric] for r in rows.values()) / len(rows)
            tol = 1e-3 * max(1.0, abs(mean_want)) + (0.2 if metric.startswith("gt-") else 0)
            assert math.isclose(mean_got, mean_want, abs_tol=tol), (what, method, metric, mean_got, mean_want)


@pytest.mark.parametrize("case", ["world", "tiny"])
def test_a_small_run_reproduces_the_summary_of_the_code_before_the_rebuild(case, tmp_path):
    want = json.loads(ANCHOR.read_text())[case]
    got = compute(case, tmp_path)
    assert got["data_png_sha256"] == want["data_png_sha256"]  # the renderer / the toy painter: bit for bit
    assert set(got["originals_png_sha256"]) == set(want["originals_png_sha256"])
    same = sum(got["originals_png_sha256"][k] == v for k, v in want["originals_png_sha256"].items())
    assert same >= len(want["originals_png_sha256"]) - 1, "the base model's originals changed"
    _close(got["samples"], want["samples"], "scores")
    if "retention" in want:
        _close(got["retention"], want["retention"], "retention")
