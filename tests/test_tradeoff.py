"""Trade-off points, dominance and the plot (spfbench/tradeoff.py) on hand-made run folders."""

import json

import pytest

from spfbench import tradeoff as T
from spfbench.table1 import bootstrap_ci

GT_T, GT_P = "gt-target@world-reader", "gt-preserve@world-reader"


def pt(method, r, p, ci=0.0, value=None):
    return T.Point(method, "k" if value is not None else "", value, r, (r - ci, r + ci), p, (p - ci, p + ci), 10, "x")


def test_dominance_needs_the_lower_ci_bound_above_on_both_axes():
    b = pt("b", 0.5, 0.6)
    assert T.dominated(pt("a", 0.6, 0.7, ci=0.05), b)
    assert not T.dominated(pt("a", 0.6, 0.7, ci=0.15), b)  # better means, but b's lie inside a's CI
    assert not T.dominated(pt("a", 0.9, 0.55), b)  # more response, less preservation: no winner
    assert not T.dominated(b, b)  # equal is not a win
    assert T.dominated(pt("a", 0.5, 0.61), b)  # equal on one axis, better on the other
    comps = {(c["method"], c["other"]): c for c in T.comparisons([pt("a", 0.6, 0.7), pt("b", 0.5, 0.6, value=1),
                                                                   pt("b", 0.9, 0.5, value=2)])}
    assert comps[("a", "b")]["dominates"] == 1 and comps[("a", "b")]["of"] == 2 and comps[("a", "b")]["where"] == [("k", 1.0)]
    assert comps[("b", "a")]["dominates"] == 0


def make_run(root, metrics=(GT_T, GT_P), rows=None, rank=8):
    """A run folder as spfbench run leaves it: run.json's metric spec, per-method samples and config, a curve."""
    root.mkdir(parents=True)
    (root / "run.json").write_text(json.dumps({"spec": {"metrics": list(metrics)}}))
    rows = rows or {"lora": ([1, 0, 1, 1], [0.5, 0.6, 0.7, 0.8]), "naive": ([1, 1, 1, 0], [0.4, 0.5, 0.5, 0.6])}
    for m, (tgt, pre) in rows.items():
        d = root / "methods" / m
        (d / "score").mkdir(parents=True)
        (d / "score" / "samples.jsonl").write_text("\n".join(
            json.dumps({"id": f"t{i}", GT_T: a, GT_P: b, "errors": {}}) for i, (a, b) in enumerate(zip(tgt, pre))) + "\n")
        (d / "config.json").write_text(json.dumps({"rank": rank, "learning_rate": 1e-4}))
    for step, (tgt, pre) in {0: ([0, 0, 0, 0], [0.9, 0.9, 1.0, 1.0]), 10: ([0, 1, 1, 0], [0.7, 0.8, 0.6, None])}.items():
        s = root / "methods" / "naive" / "curve" / f"step-{step}"
        s.mkdir(parents=True)
        (s / "scores.json").write_text(json.dumps({"metrics_preset": "world", "values": {
            GT_T: {f"t{i}": v for i, v in enumerate(tgt)}, GT_P: {f"t{i}": v for i, v in enumerate(pre)}}}))
    return root


def test_run_points_read_rows_knobs_and_curve_steps(tmp_path):
    run = make_run(tmp_path / "r8")
    points = T.run_points(run, {"lora": "rank"})
    by = {(p.method, p.knob, p.value): p for p in points}
    assert set(by) == {("lora", "rank", 8.0), ("naive", "", None), ("naive", "step", 0.0), ("naive", "step", 10.0)}
    lora = by[("lora", "rank", 8.0)]
    assert lora.response == pytest.approx(0.75) and lora.preservation == pytest.approx(0.65)
    assert lora.preservation_ci == pytest.approx(bootstrap_ci([0.5, 0.6, 0.7, 0.8]))
    step10 = by[("naive", "step", 10.0)]
    assert step10.preservation == pytest.approx(0.7) and step10.n == 3  # a null per-sample value is left out, counted
    # the lines run in knob order: curve steps first, then the rows of config values
    assert [(p.knob, p.value) for p in T.lines(points)["naive"]] == [("step", 0.0), ("step", 10.0), ("", None)]
    with pytest.raises(Exception, match="no field 'alpha'"):
        T.run_points(run, {"lora": "alpha"})
    # a run scored without ground truth has no trade-off points (no axis declared by its metrics)
    assert T.run_points(make_run(tmp_path / "nogt", metrics=("clip-t@vit-l-14",))) == []
    assert T.axes(["clip-t@vit-l-14", GT_P]) is None and T.axes([GT_P, GT_T]) == {"response": GT_T, "preservation": GT_P}


def test_cli_joins_runs_into_lines_and_refuses_bad_input_before_writing(tmp_path, cli):
    a = make_run(tmp_path / "r4", rank=4, rows={"lora": ([0, 0, 1, 0], [0.9, 0.9, 0.8, 0.9])})
    b = make_run(tmp_path / "r8", rank=8)
    out = tmp_path / "plot"
    code, stdout, err = cli("tradeoff", a, b, "--knob", "lora=rank", "--out", out)
    assert code == 0, stdout + err
    saved = json.loads((out / "tradeoff.json").read_text())
    assert sorted(p["value"] for p in saved["points"] if p["method"] == "lora") == [4.0, 8.0]
    from PIL import Image

    assert Image.open(out / "tradeoff.png").size == (720, 540)
    for bad, msg in ((["--knob", "lora"], "METHOD=FIELD"), (["--knob", "lora=alpha"], "no field 'alpha'")):
        code, stdout, err = cli("tradeoff", a, *bad, "--out", tmp_path / "bad")
        assert code != 0 and msg in stdout + err
        assert not (tmp_path / "bad").exists()
    code, stdout, err = cli("tradeoff", tmp_path, "--out", tmp_path / "bad")
    assert code != 0 and "not a run folder" in stdout + err and not (tmp_path / "bad").exists()


def test_saved_points_join_new_runs_without_drawing_a_point_twice(tmp_path, cli):
    a = make_run(tmp_path / "r4", rank=4, rows={"lora": ([0, 0, 1, 0], [0.9, 0.9, 0.8, 0.9])})
    b = make_run(tmp_path / "r8", rank=8)
    first = tmp_path / "first"
    assert cli("tradeoff", a, "--knob", "lora=rank", "--out", first)[0] == 0
    saved = T.saved_points(first / "tradeoff.json")
    assert saved == T.run_points(a, {"lora": "rank"})  # a round trip: every field, CIs as tuples
    # a committed plot plus a new run: the saved points stay, the new run's are added
    code, stdout, err = cli("tradeoff", first / "tradeoff.json", b, "--knob", "lora=rank", "--out", tmp_path / "second")
    assert code == 0, stdout + err
    pts = T.saved_points(tmp_path / "second" / "tradeoff.json")
    assert sorted((p.method, p.value) for p in pts if p.method == "lora") == [("lora", 4.0), ("lora", 8.0)]
    # a rerun that names its own output and the run again: the run's point replaces the saved one
    code, *_ = cli("tradeoff", tmp_path / "second" / "tradeoff.json", b, "--knob", "lora=rank", "--out", tmp_path / "second")
    again = T.saved_points(tmp_path / "second" / "tradeoff.json")
    assert code == 0 and len(again) == len(pts)
    assert sorted(p.value for p in again if p.method == "lora") == [4.0, 8.0]
    # a JSON that is not a tradeoff.json: one line, nothing written
    (tmp_path / "other.json").write_text('{"rows": []}')
    code, stdout, err = cli("tradeoff", tmp_path / "other.json", "--out", tmp_path / "bad")
    assert code != 0 and "not a tradeoff.json" in stdout + err and not (tmp_path / "bad").exists()
