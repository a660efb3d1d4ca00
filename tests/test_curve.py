"""The training curve of paper Fig. 5 (spfbench/curve.py): checkpoints -> artifacts -> images -> scores."""

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

import trainers
from spfbench import curve
from spfbench.errors import SpfbenchError
from spfbench.generation import GenerationSettings, generate
from spfbench.metrics import Backbones, Batch, create
from spfbench.models import load_pipeline
from spfbench.scoring import read_image
from spfbench.testset import TestsetBuilder, load_testset
from trainers.base import Method
from trainers.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models, shared cores

LOAD = {"preset": "tiny", "seed": 0}
SETTINGS = GenerationSettings(steps=4)
METRICS = ("clip-t@vit-l-14", "hpsv2@v2.1")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from spfbench.toydata import make_toy_data

    out = tmp_path_factory.mktemp("toy") / "data"
    make_toy_data(out, 4, seed=0, size=64)
    return out


@pytest.fixture(scope="module")
def testset(tmp_path_factory):
    # what `spfbench build-testset --preset tiny --n 4 --steps 4` builds
    out = tmp_path_factory.mktemp("curve") / "testset"
    TestsetBuilder(out, preset="tiny", n=4, settings=SETTINGS, device="cpu").run(progress=False)
    return out


def _config(**kw):
    return {"max_train_steps": 4, "train_batch_size": 2, "resolution": 64, "checkpointing_steps": 2,
            "checkpoints_total_limit": None, "learning_rate": 1e-3, **kw}


def _train(name, cfg, data, out):
    return Trainer(trainers.create(name, cfg), data, out, preset="tiny", device="cpu").run(progress=False)


@pytest.fixture(scope="module")
def naive_run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("naive") / "run"
    cfg = _config()
    _train("naive", cfg, toy, out)
    return out, cfg


def _images(artifact):
    pipe, _ = load_pipeline("tiny", device="cpu")
    trainers.load_artifact(artifact, pipe)
    return generate(pipe, ["A woman, smiling, wearing a red hat", "A man, wearing glasses"], [3, 11], SETTINGS, output_type="np")


@pytest.mark.parametrize("name,extra", [("naive", {}), ("lora", {"rank": 2}), ("naive", {"use_ema": True, "ema_decay": 0.5})],
                         ids=["naive", "lora", "naive-ema"])
def test_the_final_checkpoint_becomes_the_run_artifact_exactly(name, extra, toy, tmp_path):
    cfg = _config(max_train_steps=2, **extra)
    r = _train(name, cfg, toy, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    art = curve.artifact_from_checkpoint(trainers.create(name, cfg), ckpt, tmp_path / "art", load_kwargs=LOAD, device="cpu")
    meta, run_meta = (json.loads((p / "method.json").read_text()) for p in (art, r.artifact))
    assert meta["method"] == name and meta["steps"] == 2 and meta["config"] == run_meta["config"] and meta["model"] == run_meta["model"]
    assert meta["ema"] == bool(extra.get("use_ema"))  # the run's artifact holds the EMA weights: so does this one
    assert not list(tmp_path.glob(".art*"))  # no temporary folder left
    a, b = _images(art), _images(r.artifact)
    assert np.array_equal(a, b)
    base, _ = load_pipeline("tiny", device="cpu")  # and training changed the model
    assert not np.array_equal(a, generate(base, ["A woman, smiling, wearing a red hat", "A man, wearing glasses"], [3, 11], SETTINGS, output_type="np"))


def test_a_checkpoint_of_another_config_or_model_is_refused(naive_run, tmp_path):
    run, cfg = naive_run
    ckpt = run / "checkpoints" / "checkpoint-2"
    with pytest.raises(SpfbenchError, match="learning_rate"):
        curve.artifact_from_checkpoint(trainers.create("naive", {**cfg, "learning_rate": 2e-3}), ckpt, tmp_path / "a", load_kwargs=LOAD, device="cpu")
    with pytest.raises(SpfbenchError, match="model"):
        curve.artifact_from_checkpoint(trainers.create("naive", cfg), ckpt, tmp_path / "b", load_kwargs={"preset": "tiny", "seed": 1}, device="cpu")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _curve(run, cfg, testset, out, **kw):
    return curve.training_curve(run, "naive", cfg, testset, None, out, load_kwargs=LOAD, metrics_preset="tiny",
                                metric_ids=METRICS, settings=SETTINGS, batch_size=4, device="cpu", progress=False, **kw)


def test_curve_rows_files_and_plot(naive_run, testset, tmp_path, monkeypatch):
    run, cfg = naive_run
    out = tmp_path / "curve"
    rows = _curve(run, cfg, testset, out)
    _, triples = load_testset(testset)
    assert [r["step"] for r in rows] == [0, 2, 4]
    for r in rows:
        assert r["n"] == len(triples) and all(math.isfinite(r[m]) for m in METRICS)
    assert [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()] == rows
    csv_lines = (out / "curve.csv").read_text().splitlines()
    assert csv_lines[0] == "step,clip-t@vit-l-14,hpsv2@v2.1,n" and len(csv_lines) == 4
    for s in (0, 2, 4):
        assert sorted(p.stem for p in (out / f"step-{s}" / "images").glob("*.png")) == sorted(t.id for t in triples)
    assert (out / "step-2" / "artifact" / "method.json").is_file() and not (out / "step-0" / "artifact").exists()
    # training moved the images away from the base model's
    a0, a4 = (np.asarray(read_image(out / f"step-{s}" / "images" / f"{triples[0].id}.png")) for s in (0, 4))
    assert not np.array_equal(a0, a4)

    with Image.open(out / "curve.png") as im:
        im.load()
        px = np.asarray(im.convert("RGB"))
    assert px.shape[0] > 200 and px.shape[1] > 300 and len(np.unique(px.reshape(-1, 3), axis=0)) > 10

    # independent recomputation of step 2 with the metric objects
    bb = Backbones("tiny", "cpu")
    imgs = out / "step-2" / "images"
    batch = Batch([t.id for t in triples], [read_image(testset / t.original) for t in triples],
                  [read_image(imgs / f"{t.id}.png") for t in triples], [t.target_text for t in triples],
                  [t.target_caption for t in triples])
    for m in METRICS:
        metric = create(m, bb)
        metric.update(batch)
        assert rows[1][m] == pytest.approx(np.mean([metric.values[t.id] for t in triples]), rel=1e-6, abs=1e-6)

    # a rerun recomputes nothing: no artifact, no image, no score
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix in (".png", ".safetensors")}
    mtimes.update({p: p.stat().st_mtime_ns for p in out.glob("step-*/scores.json")})
    calls = []
    real = Method.generate_images.__func__

    def counting(cls, pipe, chunk, settings, config):
        calls.append(len(chunk))
        return real(cls, pipe, chunk, settings, config)

    monkeypatch.setattr(Method, "generate_images", classmethod(counting))
    monkeypatch.setattr(curve, "artifact_from_checkpoint", lambda *a, **k: pytest.fail("artifact rebuilt"))
    monkeypatch.setattr("spfbench.metrics.base.PerSampleMetric.update", lambda *a, **k: pytest.fail("rescored"))
    assert _curve(run, cfg, testset, out) == rows
    assert calls == []
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p.name != "curve.png")
    monkeypatch.undo()

    # one lost image: only it is generated again (from the cached artifact), identical, and rescored
    lost = out / "step-2" / "images" / f"{triples[1].id}.png"
    before = lost.read_bytes()
    lost.unlink()
    monkeypatch.setattr(Method, "generate_images", classmethod(counting))
    monkeypatch.setattr(curve, "artifact_from_checkpoint", lambda *a, **k: pytest.fail("artifact rebuilt"))
    again = _curve(run, cfg, testset, out)
    assert calls == [1]
    # the same image up to batch-size float noise (it was first generated in a batch of four)
    diff = np.abs(np.asarray(read_image(lost), dtype=int) - np.asarray(Image.open(io.BytesIO(before)).convert("RGB"), dtype=int))
    assert diff.max() <= 2, diff.max()
    for r, a in zip(rows, again):  # (scored in a batch of one: equal up to float batching)
        assert a == {k: pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in r.items()}

    # the same folder for other settings is refused
    with pytest.raises(SpfbenchError, match="settings"):
        curve.training_curve(run, "naive", cfg, testset, None, out, load_kwargs=LOAD, metrics_preset="tiny",
                             settings=GenerationSettings(steps=3), device="cpu", progress=False)
