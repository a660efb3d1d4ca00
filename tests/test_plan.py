"""`spfbench plan`: the cost model on hand-made timings, the estimate's arithmetic, the check, bad input,
and one calibration end to end on the tiny preset (timings recorded by `run` and `score`)."""

import json
import math

import pytest

from spfbench import plan as P
from spfbench.timing import append_attempt, read_attempts, total_seconds

pytestmark = pytest.mark.usefixtures("one_thread")


def test_linear_fit_through_two_points_recovers_fixed_and_per_unit_costs():
    f = P.Linear.through(1, 5 + 1 * 2.5, 4, 5 + 4 * 2.5)
    assert f.fixed == pytest.approx(5) and f.per_unit == pytest.approx(2.5)
    assert f(100) == pytest.approx(255)
    # noise that would make a cost negative is clamped: a slower small run is all fixed cost
    g = P.Linear.through(1, 10.0, 4, 9.0)
    assert g.per_unit == 0 and g.fixed == 10.0
    with pytest.raises(ValueError):
        P.Linear.through(2, 1.0, 2, 3.0)


def fake_method(run, name, fit=None, gen=None, score=None):
    """timings.json of one method as `spfbench run` writes them (one attempt per stage)."""
    folder = run / "methods" / name
    for stage, sec in (("fit", fit), ("generate", gen)):
        if sec is not None:
            append_attempt(folder / "timings.json", {"stages": {stage: {"seconds": sec, "peak_memory_bytes": 2**30}}, "work": {}})
    if score is not None:
        append_attempt(folder / "score" / "timings.json", {"metrics": score, "triples": 0})


def test_unit_costs_from_two_calibration_runs_and_the_estimate(tmp_path):
    """Two calibration runs made from a known cost model; the fitted unit costs and the estimate for the
    real sizes are computed here independently."""
    a, b = tmp_path / "a", tmp_path / "b"
    steps, sizes, G = (1, 4), (16, 32), 4
    fit = {"naive": (30.0, 2.0), "spf": (50.0, 6.0)}  # fixed, per step
    gen = {"naive": (8.0, 3.0), "spf": (9.0, 3.5)}  # fixed, per batch of G
    load, first, per = 4.0, 0.5, 0.2  # one metric: loading, first method per image, later methods per image
    for run, k, n in ((a, steps[0], sizes[0]), (b, steps[1], sizes[1])):
        fake_method(run, "naive", fit=fit["naive"][0] + k * fit["naive"][1], gen=gen["naive"][0] + n / G * gen["naive"][1],
                    score={"m": {"load": load, "originals": n * (first - per), "pairs": n * per}})
        fake_method(run, "spf", fit=fit["spf"][0] + k * fit["spf"][1], gen=gen["spf"][0] + n / G * gen["spf"][1],
                    score={"m": {"pairs": n * per}})
    costs = P.unit_costs(a, b, steps, sizes, G, ["naive", "spf"], ["naive", "spf"], ["m"])
    for name in fit:
        assert costs["methods"][name]["fit"]["fixed_s"] == pytest.approx(fit[name][0])
        assert costs["methods"][name]["fit"]["per_step_s"] == pytest.approx(fit[name][1])
        assert costs["methods"][name]["generate"]["per_batch_s"] == pytest.approx(gen[name][1])
    m = costs["metrics"]["m"]
    assert (m["load_s"], m["first_per_image_s"], m["per_image_s"]) == pytest.approx((load, first, per))

    rows = P.estimate(costs, {"naive": 1200, "spf": 200}, ["naive", "spf"], ["m"], triples=150, batch=G)
    by = {(r["stage"], r["item"]): r["seconds"] for r in rows}
    assert by[("fit", "naive")] == pytest.approx(30 + 1200 * 2)
    assert by[("fit", "spf")] == pytest.approx(50 + 200 * 6)
    assert by[("generate", "spf")] == pytest.approx(9 + math.ceil(150 / 4) * 3.5)
    assert by[("score", "m")] == pytest.approx(load + 150 * first + 150 * per)  # the second method reads the cache
    # a test set too small for the plan: the build's cost comes from the base model's generation
    rows = P.estimate(costs, {}, [], [], triples=5000, batch=G, build_originals=4850, build_method="naive")
    assert rows[0]["stage"] == "build" and rows[0]["seconds"] == pytest.approx(8 + math.ceil(4850 / 4) * 3.0)


def test_timings_sum_over_attempts(tmp_path):
    path = tmp_path / "t.json"
    append_attempt(path, {"stages": {"fit": {"seconds": 3.0}}})
    append_attempt(path, {"stages": {"generate": {"seconds": 1.0}}})
    append_attempt(path, {"stages": {"fit": {"seconds": 4.5}}})  # resumed
    assert len(read_attempts(path)) == 3
    assert total_seconds(read_attempts(path), "fit") == 7.5 and total_seconds(read_attempts(path), "score") is None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from spfbench.generation import GenerationSettings
    from spfbench.testset import TestsetBuilder
    from spfbench.toydata import make_toy_data

    root = tmp_path_factory.mktemp("plan")
    TestsetBuilder(root / "ts", preset="tiny", n=8, settings=GenerationSettings(steps=3), batch_size=4).run(progress=False)
    make_toy_data(root / "data", 8, seed=0, size=64)
    (root / "cfg.json").write_text(json.dumps({"all": {"max_train_steps": 6, "train_batch_size": 2}}))
    return root


def test_plan_then_run_then_check_end_to_end(world, cli):
    common = ["--testset", world / "ts", "--data", world / "data", "--config", world / "cfg.json", "--method", "naive",
              "--metric", "lpips@alex-v0.1", "--metric", "clip-t@vit-l-14", "--batch-size", "4", "--no-progress"]
    code, out, err = cli("plan", *common, "--out", world / "plan", "--calibrate-steps", "2")
    assert code == 0, out + err
    plan = json.loads((world / "plan" / "plan.json").read_text())
    rows = {(r["stage"], r["item"]): r for r in plan["rows"]}
    assert set(rows) == {("fit", "naive"), ("generate", "naive"), ("score", "lpips@alex-v0.1"), ("score", "clip-t@vit-l-14")}
    assert rows[("fit", "naive")]["units"] == 6 and rows[("generate", "naive")]["units"] == 8
    assert all(r["seconds"] > 0 and r["peak_memory_bytes"] > 0 for r in rows.values())
    assert plan["calibration"]["triples"] == [4, 8] and plan["calibration"]["steps"] == [1, 3]
    # the calibration runs scored with caches of their own: the test set's cache was not touched
    assert not (world / "ts" / "cache").exists()
    # the runs record what `plan` reads: per stage and per metric part
    fit_attempts = read_attempts(world / "plan" / "calibration" / "b" / "methods" / "naive" / "timings.json")
    assert {s for a in fit_attempts for s in a["stages"]} == {"fit", "generate", "score"}
    score = read_attempts(world / "plan" / "calibration" / "b" / "methods" / "naive" / "score" / "timings.json")[0]
    assert score["triples"] == 8 and {"load", "originals", "pairs"} <= set(score["metrics"]["lpips@alex-v0.1"])

    code, out, err = cli("run", *common, "--out", world / "run")
    assert code == 0, out + err
    code, out, err = cli("plan-check", world / "plan", world / "run")
    assert code == 0, out + err
    check = json.loads((world / "plan" / "check.json").read_text())
    assert all(r["measured_seconds"] > 0 and r["ratio"] > 0 for r in check["rows"])
    assert check["ratio"] == pytest.approx(check["measured_seconds"] / check["estimated_seconds"])
    assert "measured / estimated" in out


def test_bad_input_gets_one_line_and_writes_nothing(world, cli, tmp_path):
    base = ["--testset", world / "ts", "--data", world / "data", "--method", "naive", "--no-progress"]
    for extra, msg in ((["--calibrate-steps", "0"], "--calibrate-steps"), (["--triples", "0"], "--triples"),
                       (["--method", "nosuch"], "nosuch"), (["--batch-size", "16"], "calibration needs at least 32")):
        code, out, err = cli("plan", *base, *extra, "--out", tmp_path / "p")
        assert code != 0 and msg in out + err, (extra, out + err)
        assert not (tmp_path / "p" / "plan.json").exists()
    code, out, err = cli("plan-check", tmp_path, world)
    assert code != 0 and "not a plan written by `spfbench plan`" in out + err
    (tmp_path / "plan.json").write_text(json.dumps({"format": P.FORMAT, "rows": [{"stage": "fit", "item": "naive", "seconds": 1.0}]}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    code, out, err = cli("plan-check", tmp_path, tmp_path / "run")
    assert code != 0 and "recorded no timings" in out + err
