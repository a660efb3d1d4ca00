"""A short two-stage SPF run on toy data gives an artifact whose customized images ``spfbench score`` evaluates."""

import json

import numpy as np
import pytest
import torch

import trainers
from spfbench.generation import GenerationSettings
from spfbench.models import load_pipeline
from spfbench.metrics import DEFAULT_METRICS
from spfbench.scoring import Scorer, read_image
from spfbench.testset import TestsetBuilder, load_testset
from spfbench.toydata import make_toy_data
from trainers.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models, shared cores

N = 3
SETTINGS = GenerationSettings(steps=2)


def test_two_stage_spf_artifact_is_scored_by_every_metric(tmp_path):
    data = tmp_path / "data"
    make_toy_data(data, 4)
    common = {"max_train_steps": 2, "train_batch_size": 2, "learning_rate": 1e-3}
    s1 = Trainer(trainers.create("naive", common), data, tmp_path / "stage1", preset="tiny", device="cpu").run(progress=False)
    spf = trainers.create("spf", {**common, "stage1_artifact": str(s1.artifact)})
    s2 = Trainer(spf, data, tmp_path / "stage2", preset="tiny", device="cpu").run(progress=False)
    assert s2.steps == 2

    testset = tmp_path / "testset"
    TestsetBuilder(testset, preset="tiny", n=N, settings=SETTINGS, device="cpu").run(progress=False)
    _, triples = load_testset(testset)
    assert len(triples) == N

    base_pipe, _ = load_pipeline("tiny", device="cpu")
    untrained, _ = trainers.base_model(base_pipe).generate(triples, SETTINGS)
    pipe, _ = load_pipeline("tiny", device="cpu")
    fitted = trainers.load_artifact(s2.artifact, pipe)
    assert fitted.name == "spf"
    images, notes = fitted.generate(triples, SETTINGS)
    again, _ = fitted.generate(triples, SETTINGS)
    assert notes is None
    assert len(images) == N
    img = tmp_path / "img"
    img.mkdir()
    for t, im, im2, im0 in zip(triples, images, again, untrained):
        a = np.asarray(im)
        assert np.array_equal(a, np.asarray(im2)), t.id  # same seed -> same image
        assert not np.array_equal(a, np.asarray(im0)), t.id  # the trained weights were loaded
        original = np.asarray(read_image(testset / t.original))
        assert a.shape == original.shape
        # the complete caption through the trained model: not the original portrait
        assert not np.array_equal(a, original), t.id
        im.save(img / f"{t.id}.png")

    out = tmp_path / "score"
    summary = Scorer(testset, img, out, metric_ids=list(DEFAULT_METRICS), preset="tiny", device="cpu").run(progress=False)
    assert (summary["triples"], summary["missing_images"], summary["unreadable_images"], summary["unmatched_files"]) == (N, 0, 0, 0)
    assert list(summary["metrics"]) == DEFAULT_METRICS
    for mid, r in summary["metrics"].items():
        assert r["n"] == N and r["failures"] == 0, (mid, r)
        assert r["value"] is not None and np.isfinite(r["value"]), (mid, r)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [t.id for t in triples] and not any(r["errors"] for r in rows)
