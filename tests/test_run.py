"""`spfbench run` end to end on the tiny preset: resume, failures, report reproduction, reuse."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

METRICS = ["--metric", "fid@inception-2048", "--metric", "lpips@alex-v0.1", "--metric", "clip-t@vit-l-14"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny test set of 8 triples (2 generation batches of 4), 8 toy portraits, a 2-step config."""
    from spfbench.cli import main  # noqa: F401  (imports the CLI once)
    from spfbench.testset import TestsetBuilder
    from spfbench.generation import GenerationSettings
    from spfbench.toydata import make_toy_data

    root = tmp_path_factory.mktemp("run")
    TestsetBuilder(root / "ts", preset="tiny", n=8, settings=GenerationSettings(steps=4), batch_size=4).run(progress=False)
    make_toy_data(root / "data", 8, seed=0, size=64)
    cfg = root / "cfg.json"
    cfg.write_text(json.dumps({"all": {"max_train_steps": 2, "checkpointing_steps": 2}}))
    return root


def run_args(world, out, *methods, extra=()):
    args = ["run", "--testset", world / "ts", "--data", world / "data", "--out", out, "--config", world / "cfg.json", "--no-progress", *METRICS]
    for m in methods:
        args += ["--method", m]
    return [*args, *extra]


def samples(folder):
    return [json.loads(x) for x in (folder / "score" / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(world):
    """naive + lora, uninterrupted (the reference for the resume test)."""
    from spfbench.run import Runner, read_config

    out = world / "full"
    Runner(world / "ts", world / "data", out, ["naive", "lora"], config=read_config(world / "cfg.json"),
           metric_ids=METRICS[1::2], progress=False).run()
    return out


def test_two_method_run_end_to_end(world, full_run):
    from spfbench.testset import load_testset

    record = json.loads((full_run / "run.json").read_text())
    assert record["status"] == "complete" and record["methods"] == ["naive", "lora"]
    assert record["spec"]["triples"] == 8 and record["spec"]["metrics"][0] == "fid@inception-2048"
    env = record["environment"]
    assert env["packages"]["torch"] and env["packages"]["diffusers"] and "commit" in env["git"] and env["device"] == "cpu"
    _, triples = load_testset(world / "ts")
    for m in ("naive", "lora"):
        st = json.loads((full_run / "methods" / m / "status.json").read_text())
        assert st["status"] == "complete" and Path(st["artifact"], "method.json").is_file()
        assert sorted(p.stem for p in (full_run / "methods" / m / "images").glob("*.png")) == sorted(t.id for t in triples)
        rows = samples(full_run / "methods" / m)
        assert [r["id"] for r in rows] == [t.id for t in triples]
        assert all(r["lpips@alex-v0.1"] is not None for r in rows)
    import pandas as pd

    df = pd.read_csv(full_run / "results.csv")
    assert list(df["method"]) == ["naive", "lora"]
    assert (df["LPIPS N"] == 8).all() and df["FID"].notna().all() and df["error"].isna().all()
    res = json.loads((full_run / "results.json").read_text())
    assert [r["status"] for r in res["rows"]] == ["complete", "complete"]
    assert (full_run / "index.html").is_file() and (full_run / "results.tex").read_text().count("\\bottomrule") == 1


def test_customized_image_uses_complete_caption_and_triple_seed(world, full_run, tiny_pipe):
    """The naive image of a triple is exactly what the artifact gives for its complete caption and seed."""
    import numpy as np
    from PIL import Image

    import trainers
    from spfbench.generation import GenerationSettings, generate
    from spfbench.models import load_pipeline
    from spfbench.testset import load_testset

    _, triples = load_testset(world / "ts")
    pipe, _ = load_pipeline("tiny")
    trainers.load_artifact(full_run / "methods" / "naive" / "train" / "artifact", pipe)
    batch = triples[:4]  # the run's first generation batch
    images = generate(pipe, [t.target_caption for t in batch], [t.seed for t in batch], GenerationSettings(steps=4))
    stored = np.asarray(Image.open(full_run / "methods" / "naive" / "images" / f"{batch[2].id}.png"))
    assert np.array_equal(np.asarray(images[2]), stored)


def test_original_reference_row_is_the_untrained_base_model(world, cli, tmp_path):
    """`original`: nothing trained; its images are the base model's for the complete caption; not ranked."""
    import numpy as np
    from PIL import Image

    from spfbench.generation import GenerationSettings, generate
    from spfbench.models import load_pipeline
    from spfbench.testset import load_testset

    code, stdout, err = cli("run", "--testset", world / "ts", "--data", world / "data", "--out", tmp_path / "o",
                            "--method", "original", "--method", "naive", "--config", world / "cfg.json", "--limit", "4",
                            "--no-progress", *METRICS)
    assert code == 0, stdout + err
    assert not (tmp_path / "o" / "methods" / "original" / "train" / "checkpoints").exists()
    _, triples = load_testset(world / "ts")
    pipe, _ = load_pipeline("tiny")
    images = generate(pipe, [t.target_caption for t in triples[:4]], [t.seed for t in triples[:4]], GenerationSettings(steps=4))
    for t, im in zip(triples[:4], images):
        assert np.array_equal(np.asarray(im), np.asarray(Image.open(tmp_path / "o" / "methods" / "original" / "images" / f"{t.id}.png")))
    rows = {r["method"]: r for r in json.loads((tmp_path / "o" / "results.json").read_text())["rows"]}
    assert rows["original"]["ablation"] is True and rows["naive"]["ablation"] is False
    md = (tmp_path / "o" / "results.md").read_text()
    assert md.index("| naive |") < md.index("| original |")  # the ranked rows first


def test_killed_run_resumes_with_nothing_computed_twice(world, full_run, cli, monkeypatch):
    from trainers.lora import Lora
    from trainers.naive import Naive

    calls: list[tuple[str, str]] = []
    real = {c: c.generate_images.__func__ for c in (Naive, Lora)}
    state = {"batches": 0, "kill_after": 3}  # naive's two batches, then lora's first: killed before lora's second

    def counting(cls_):
        def gen(cls, pipe, triples, settings, config):
            if state["kill_after"] is not None and state["batches"] >= state["kill_after"]:
                raise KeyboardInterrupt
            state["batches"] += 1
            calls.extend((cls.name, t.id) for t in triples)
            return real[cls_](cls, pipe, triples, settings, config)
        return classmethod(gen)

    for c in (Naive, Lora):
        monkeypatch.setattr(c, "generate_images", counting(c))
    out = world / "killed"
    code, _, err = cli(*run_args(world, out, "naive", "lora"))
    assert code == 130 and "rerun the same command to resume" in err
    assert len(list((out / "methods" / "lora" / "images").glob("*.png"))) == 4
    assert not (out / "results.csv").exists()
    state["kill_after"] = None
    code, stdout, _ = cli(*run_args(world, out, "naive", "lora"))
    assert code == 0, stdout
    assert len(calls) == len(set(calls)) == 16  # every (method, triple) generated exactly once
    for m in ("naive", "lora"):
        assert samples(out / "methods" / m) == samples(full_run / "methods" / m)
        a = json.loads((out / "methods" / m / "score" / "summary.json").read_text())["metrics"]["fid@inception-2048"]["value"]
        b = json.loads((full_run / "methods" / m / "score" / "summary.json").read_text())["metrics"]["fid@inception-2048"]["value"]
        assert a == pytest.approx(b, rel=1e-9, abs=1e-9)
        # the finished training was reused: no second pass over the data
        assert len((out / "methods" / m / "train" / "log.jsonl").read_text().splitlines()) == 2


def test_report_reproduces_outputs_byte_for_byte(world, full_run, cli):
    copy = full_run  # in place: the page names its folder
    names = ["results.csv", "results.md", "results.tex", "results.json", "index.html"]
    before = {n: (copy / n).read_bytes() for n in names}
    for n in names:
        (copy / n).unlink()
    code, out, err = cli("report", copy)
    assert code == 0, err
    assert {n: (copy / n).read_bytes() for n in names} == before
    assert "| naive |" in out


def test_failing_method_is_recorded_and_the_other_finishes(world, cli, monkeypatch):
    import trainers
    from trainers.naive import Naive

    class Broken(Naive):
        name = "broken"
        description = "raises in setup"

        def setup(self, models):
            raise RuntimeError("adapter exploded")

    import sys
    import types

    mod = types.ModuleType("broken_method_for_tests")
    mod.Broken = Broken
    monkeypatch.setitem(sys.modules, "broken_method_for_tests", mod)
    monkeypatch.setitem(trainers.REGISTRY, "broken", "broken_method_for_tests:Broken")
    out = world / "broken"
    code, stdout, _ = cli(*run_args(world, out, "broken", "naive", extra=["--limit", "4"]))
    assert code == 1
    assert "broken: failed at fit: RuntimeError: adapter exploded" in stdout
    st = json.loads((out / "methods" / "broken" / "status.json").read_text())
    assert st["status"] == "failed" and st["stage"] == "fit" and "adapter exploded" in st["traceback"]
    assert json.loads((out / "methods" / "naive" / "status.json").read_text())["status"] == "complete"
    import pandas as pd

    df = pd.read_csv(out / "results.csv").set_index("method")
    assert "adapter exploded" in df.loc["broken", "error"] and pd.isna(df.loc["broken", "LPIPS"])
    assert pd.notna(df.loc["naive", "LPIPS"])
    assert "% broken: failed (fit: RuntimeError: adapter exploded)" in (out / "results.tex").read_text()
    assert "adapter exploded" in (out / "index.html").read_text()
    # the run is not "complete" when a method failed (issue 22: every method failed and the page said complete)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "partial" and record["failed_methods"] == ["broken"]
    assert "partial (1 of 2 methods failed: broken)" in (out / "index.html").read_text()
    code, _, _ = cli(*run_args(world, world / "broken-all", "broken", extra=["--limit", "4"]))
    assert code == 1 and json.loads((world / "broken-all" / "run.json").read_text())["status"] == "failed"
    assert "failed (1 of 1 methods failed: broken)" in (world / "broken-all" / "index.html").read_text()


def test_tokencompose_without_masks_says_so_beside_its_row(world, cli):
    # issue 22: without masks TokenCompose is naive fine-tuning; its row looked like any other
    out = world / "tc-no-masks"
    code, stdout, err = cli(*run_args(world, out, "tokencompose", "naive", extra=["--limit", "2"]))
    assert code == 0, stdout + err
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert len(rows["tokencompose"]["notes"]) == 1 and "no grounding loss applied" in rows["tokencompose"]["notes"][0]
    assert rows["naive"]["notes"] == []
    md = (out / "results.md").read_text()
    assert "| tokencompose * |" in md and "* tokencompose: no attn_list masks" in md
    assert "note: no attn_list masks" in (out / "index.html").read_text()


def test_changed_spec_or_config_is_refused_without_touching_the_run(world, full_run, cli, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(full_run, copy)
    before = snapshot(copy)
    code, _, err = cli(*run_args(world, copy, "naive", extra=["--limit", "3"]))
    assert code == 2 and "different limit" in err and "another --out" in err
    assert snapshot(copy) == before
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"all": {"max_train_steps": 2, "checkpointing_steps": 2}, "naive": {"learning_rate": 1e-3}}))
    args = run_args(world, copy, "naive")
    args[args.index("--config") + 1] = cfg
    code, out, _ = cli(*args)
    assert code == 1 and "different config (learning_rate)" in out
    assert (copy / "methods" / "naive" / "images").is_dir() and len(list((copy / "methods" / "naive" / "images").glob("*.png"))) == 8


def test_required_method_is_fitted_once_and_shared(world, cli):
    """SPF requires naive (stage 1): fitted first, its artifact named in SPF's config; Magnet reuses the same
    naive UNet instead of training its own copy."""
    out = world / "deps"
    code, stdout, err = cli(*run_args(world, out, "spf", "magnet", extra=["--limit", "4"]))
    assert code == 0, stdout + err
    naive_artifact = str((out / "methods" / "naive" / "train" / "artifact").resolve())
    assert json.loads((out / "methods" / "spf" / "config.json").read_text())["stage1_artifact"] == naive_artifact
    assert json.loads((out / "methods" / "magnet" / "config.json").read_text())["naive_artifact"] == naive_artifact
    assert not (out / "methods" / "magnet" / "train" / "checkpoints").exists()  # nothing trained for magnet
    assert not (out / "methods" / "naive" / "images").exists()  # naive is not a row of this run
    record = json.loads((out / "run.json").read_text())
    assert record["methods"] == ["spf", "magnet"]
    notes = sorted((out / "methods" / "magnet" / "notes").glob("*.json"))
    assert len(notes) == 4 and all("fallback" in json.loads(p.read_text()) for p in notes)
    import pandas as pd

    assert list(pd.read_csv(out / "results.csv")["method"]) == ["magnet", "spf"]
    # a config that names the stage-1 artifact itself: naive is not fitted again (a reading study's shared stage 1)
    cfg = json.loads((world / "cfg.json").read_text())
    cfg["spf"] = {**cfg.get("spf", {}), "stage1_artifact": naive_artifact}
    (world / "given.json").write_text(json.dumps(cfg))
    args = run_args(world, world / "given", "spf", extra=["--limit", "2"])
    args[args.index("--config") + 1] = world / "given.json"
    code, stdout, err = cli(*args)
    assert code == 0, stdout + err
    assert not (world / "given" / "methods" / "naive").exists()
    assert json.loads((world / "given" / "methods" / "spf" / "config.json").read_text())["stage1_artifact"] == naive_artifact


def test_retention_and_curve(world, cli):
    """--retention: images from the base text only, preservation metrics only, retention.* tables;
    --curve 1: a checkpoint per step, CLIP-T and HPSv2 at steps 0, 1, 2 and the plot."""
    from PIL import Image

    from spfbench.testset import load_testset

    out = world / "extras"
    code, stdout, err = cli(*run_args(world, out, "naive", extra=["--limit", "4", "--retention", "--curve", "1", "--curve-limit", "2"]))
    assert code == 0, stdout + err
    _, triples = load_testset(world / "ts")
    summary = json.loads((out / "methods" / "naive" / "retention" / "score" / "summary.json").read_text())
    assert set(summary["metrics"]) == {"fid@inception-2048", "lpips@alex-v0.1"}  # CLIP-T is not preservation
    made = json.loads((out / "methods" / "naive" / "retention" / "generation.json").read_text())
    assert made["artifact"] == str((out / "methods" / "naive" / "train" / "artifact").resolve())
    assert (out / "retention.csv").is_file() and "| naive |" in (out / "retention.md").read_text()
    # the retention image is the artifact's answer to the base text alone: a different image from the customized one
    a = Image.open(out / "methods" / "naive" / "retention" / "images" / f"{triples[0].id}.png")
    b = Image.open(out / "methods" / "naive" / "images" / f"{triples[0].id}.png")
    assert a.tobytes() != b.tobytes()
    rows = [json.loads(x) for x in (out / "methods" / "naive" / "curve" / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["n"] == 2 for r in rows)
    assert Image.open(out / "methods" / "naive" / "curve" / "curve.png").size[0] > 100
    assert json.loads((out / "methods" / "naive" / "config.json").read_text())["checkpointing_steps"] == 1


def test_every_registered_method_completes(world, cli, tmp_path):
    """Every registered method (TokenCompose with CLIPSeg masks of the tiny segmenter) and the eight metrics."""
    import trainers

    data = tmp_path / "data"
    shutil.copytree(world / "data", data)
    code, _, err = cli("masks", "--preset", "tiny", "--data", data, "--no-progress")
    assert code == 0, err
    args = ["run", "--testset", world / "ts", "--data", data, "--out", tmp_path / "all", "--config", world / "cfg.json",
            "--limit", "2", "--no-progress"]
    for m in trainers.REGISTRY:
        args += ["--method", m]
    code, stdout, err = cli(*args)
    assert code == 0, stdout + err
    import pandas as pd

    df = pd.read_csv(tmp_path / "all" / "results.csv")
    assert sorted(df["method"]) == sorted(trainers.REGISTRY)
    assert df["error"].isna().all() and df["LPIPS N"].eq(2).all() and df["MPS N"].eq(2).all()
    assert all(r["notes"] == [] for r in json.loads((tmp_path / "all" / "results.json").read_text())["rows"])  # masks present


def test_accelerate_launch_shards_generation_and_scoring(world, full_run, tmp_path):
    """Two CPU processes: each generates and scores its share; the merged samples (and FID from the summed
    feature statistics) equal the single-process run's. The finished naive training is reused (copied in),
    so the images come from the same artifact."""
    import os
    import subprocess
    import sys

    out = tmp_path / "acc"
    shutil.copytree(full_run / "methods" / "naive" / "train", out / "methods" / "naive" / "train")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # two CPU processes: accelerate's --cpu launches a single process; --multi_gpu starts torchrun's workers
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "spfbench",
           *map(str, run_args(world, out, "naive"))]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("| naive |") == 1  # the table is printed once, by the main process
    assert snapshot(out / "methods" / "naive" / "images") == snapshot(full_run / "methods" / "naive" / "images")
    # the same values; scoring batches differ (each process scores its share), so only the last bits may
    got, ref = samples(out / "methods" / "naive"), samples(full_run / "methods" / "naive")
    assert [r["id"] for r in got] == [r["id"] for r in ref]
    for a, b in zip(got, ref):
        for k in ("lpips@alex-v0.1", "clip-t@vit-l-14"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-9)
    fid = [json.loads((f / "methods" / "naive" / "score" / "summary.json").read_text())["metrics"]["fid@inception-2048"]
           for f in (out, full_run)]
    assert fid[0]["n"] == fid[1]["n"] == 8 and fid[0]["value"] == pytest.approx(fid[1]["value"], rel=1e-6, abs=1e-9)
    assert not list((out / "methods" / "naive" / "score").glob("state.part-*.pt"))  # merged into state.pt
    assert json.loads((out / "run.json").read_text())["environment"]["processes"] == 2


def test_lora_best_rank_through_the_config(world, tmp_path):
    """{"lora": {"ranks": [...], "val_data": ...}}: the fit runs the rank sweep and returns the chosen rank's
    artifact (what sweep.json names), so a run's LoRA row is Table 1's "LoRA (Best Rank)"."""
    import trainers
    from spfbench.toydata import make_toy_data
    from trainers.base import read_artifact_meta
    from trainers.sweep import read_sweep

    make_toy_data(tmp_path / "val", 4, seed=1, size=64)
    art = trainers.fit("lora", {"ranks": [2, 4], "val_data": str(tmp_path / "val"), "max_train_steps": 1}, world / "data",
                       tmp_path / "sweep", progress=False, preset="tiny", device="cpu")
    sweep = read_sweep(tmp_path / "sweep")
    assert art == tmp_path / "sweep" / sweep["best_artifact"]
    assert read_artifact_meta(art)["config"]["rank"] == sweep["best_rank"]
    with pytest.raises(Exception, match="val_data is the rank sweep's held-out set"):
        trainers.fit("lora", {"val_data": str(tmp_path / "val")}, world / "data", tmp_path / "x", preset="tiny")


def test_results_json_and_report_hold_the_paired_differences(full_run):
    """results.json pairs every two rows on their shared triples; the report shows lora against naive."""
    paired = json.loads((full_run / "results.json").read_text())["paired"]
    got = {(d["a"], d["b"], d["column"]) for d in paired}
    assert got == {("naive", "lora", c) for c in ("LPIPS", "CLIP-T")}  # FID is set-level: not paired
    lp_naive, lp_lora = samples(full_run / "methods" / "naive"), samples(full_run / "methods" / "lora")
    d = next(x for x in paired if x["column"] == "LPIPS")
    diffs = [a["lpips@alex-v0.1"] - b["lpips@alex-v0.1"] for a, b in zip(lp_naive, lp_lora)]
    assert d["n"] == 8 and d["diff"] == pytest.approx(sum(diffs) / len(diffs))
    html = (full_run / "index.html").read_text()
    assert "<h2>Paired differences</h2>" in html and "lora &minus; naive" in html
