import json
import shutil

import numpy as np
import pytest
from PIL import Image

from spfbench.generation import GenerationSettings
from spfbench.metrics import REGISTRY, Backbones, Batch, create
from spfbench.metrics.fid import Fid
from spfbench.metrics import DEFAULT_METRICS
from spfbench.scoring import Scorer, read_image
from spfbench.testset import TestsetBuilder, load_testset

N = 7
FAST_METRICS = ["clip-i@vit-l-14", "clip-t@vit-l-14", "lpips@alex-v0.1", "fid@inception-2048"]


@pytest.fixture(scope="session")
def testset(tmp_path_factory):
    from spfbench.models import load_pipeline

    out = tmp_path_factory.mktemp("score") / "testset"
    builder = TestsetBuilder(out, preset="tiny", n=N, settings=GenerationSettings(steps=2), device="cpu")
    builder.run(progress=False, pipeline=load_pipeline("tiny", device="cpu"))
    return out


def customize(testset, folder, transform=None):
    """Customized images named by triple id: the originals, transformed (default: colours inverted)."""
    folder.mkdir(parents=True, exist_ok=True)
    _, triples = load_testset(testset)
    for t in triples:
        im = read_image(testset / t.original)
        arr = np.asarray(im)
        Image.fromarray((transform or (lambda a, i: 255 - a))(arr, t.index)).save(folder / f"{t.id}.png")
    return triples


def test_scores_equal_the_metrics_on_the_same_pairs_and_bad_images_are_recorded(testset, tmp_path, cli):
    triples = customize(testset, tmp_path / "img", lambda a, i: np.roll(a, 3 * i + 1, axis=1))
    missing, broken, jpeg = triples[1], triples[2], triples[3]
    (tmp_path / "img" / f"{missing.id}.png").unlink()
    data = (tmp_path / "img" / f"{broken.id}.png").read_bytes()
    (tmp_path / "img" / f"{broken.id}.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    im = Image.open(tmp_path / "img" / f"{jpeg.id}.png")
    im.load()
    (tmp_path / "img" / f"{jpeg.id}.png").unlink()
    im.save(tmp_path / "img" / f"{jpeg.id}.jpg", quality=95)
    (tmp_path / "img" / "stray.png").write_bytes(data)

    code, out, err = cli("score", "--testset", testset, "--images", tmp_path / "img", "--out", tmp_path / "s",
                         "--preset", "tiny", "--batch-size", "3", "--no-progress")
    assert code == 0, err
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert list(summary["metrics"]) == DEFAULT_METRICS
    assert (summary["triples"], summary["missing_images"], summary["unreadable_images"], summary["unmatched_files"]) == (N, 1, 1, 1)
    rows = [json.loads(line) for line in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [t.id for t in triples]
    by_id = {r["id"]: r for r in rows}
    assert "no customized image" in by_id[missing.id]["errors"]["input"]
    assert "unreadable" in by_id[broken.id]["errors"]["input"]
    for mid, r in summary["metrics"].items():
        assert r["failures"] >= 2, mid
        if r.get("value") is not None and mid in REGISTRY and r["column"] != "FID":
            assert r["n"] + r["failures"] == N, mid

    # The same pairs given straight to the metrics: equal values (nothing swapped, prompts are the complete captions).
    ok = [t for t in triples if t.id not in (missing.id, broken.id)]
    batch = Batch(
        [t.id for t in ok], [read_image(testset / t.original) for t in ok],
        [read_image(next((tmp_path / "img").glob(f"{t.id}.*"))) for t in ok],
        [t.target_text for t in ok], [t.target_caption for t in ok],
    )
    bb = Backbones("tiny", "cpu")
    for mid in DEFAULT_METRICS:
        m = create(mid, bb)
        m.update(batch)
        if m.per_sample:
            for t in ok:
                want, got = m.values[t.id], by_id[t.id][mid]
                assert (want is None and got is None) or got == pytest.approx(want, rel=1e-5, abs=1e-6), (mid, t.id)
    assert "FID" in out and "1 missing, 1 unreadable" in out


def test_identical_images_give_perfect_values(testset, tmp_path):
    customize(testset, tmp_path / "img", lambda a, i: a)
    s = Scorer(testset, tmp_path / "img", tmp_path / "s", FAST_METRICS, preset="tiny", device="cpu").run(progress=False)
    m = s["metrics"]
    assert m["clip-i@vit-l-14"]["value"] == pytest.approx(1.0, abs=1e-5)
    assert m["lpips@alex-v0.1"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert m["fid@inception-2048"]["value"] == pytest.approx(0.0, abs=1e-4)
    assert (m["fid@inception-2048"]["n"], m["fid@inception-2048"]["n_real"]) == (N, N)


def test_killed_run_resumes_to_the_same_result_without_rescoring(testset, tmp_path, monkeypatch):
    customize(testset, tmp_path / "img")
    whole = Scorer(testset, tmp_path / "img", tmp_path / "whole", FAST_METRICS, preset="tiny", device="cpu", batch_size=2).run(progress=False)

    from spfbench.metrics.lpips import Lpips

    calls = []
    real_update = Lpips.update

    def dying_update(self, batch):
        calls.append(list(batch.ids))
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_update(self, batch)

    monkeypatch.setattr(Lpips, "update", dying_update)
    kw = dict(preset="tiny", device="cpu", batch_size=2, checkpoint_seconds=0)
    with pytest.raises(KeyboardInterrupt):
        Scorer(testset, tmp_path / "img", tmp_path / "r", FAST_METRICS, **kw).run(progress=False)
    assert not (tmp_path / "r" / "summary.json").exists()
    calls.clear()
    resumed = Scorer(testset, tmp_path / "img", tmp_path / "r", FAST_METRICS, **kw).run(progress=False)
    assert sum(len(c) for c in calls) == N - 4  # the two checkpointed batches are not scored again
    for mid in FAST_METRICS:
        assert resumed["metrics"][mid]["value"] == pytest.approx(whole["metrics"][mid]["value"], rel=1e-6, abs=1e-9), mid
    assert (tmp_path / "r" / "samples.jsonl").read_text() == (tmp_path / "whole" / "samples.jsonl").read_text()


def test_fid_reference_statistics_are_cached_in_the_test_set_and_reused(testset, tmp_path, monkeypatch):
    customize(testset, tmp_path / "img")
    first = Scorer(testset, tmp_path / "img", tmp_path / "a", ["fid@inception-2048"], preset="tiny", device="cpu").run(progress=False)
    assert list((testset / "cache").glob("fid@inception-2048.tiny.*.pt"))
    monkeypatch.setattr(Fid, "update_reference", lambda *a: pytest.fail("reference recomputed"))
    counted = []
    real_features = Fid.features
    monkeypatch.setattr(Fid, "features", lambda self, ims: (counted.append(len(ims)), real_features(self, ims))[1])
    second = Scorer(testset, tmp_path / "img", tmp_path / "b", ["fid@inception-2048"], preset="tiny", device="cpu").run(progress=False)
    assert second["metrics"]["fid@inception-2048"]["value"] == pytest.approx(first["metrics"]["fid@inception-2048"]["value"], rel=1e-9)
    assert sum(counted) == N  # the customized side only: the originals' statistics came from the cache


def test_bad_input_gives_clear_errors_and_changes_nothing(testset, tmp_path, cli):
    customize(testset, tmp_path / "img")
    args = ["--testset", testset, "--images", tmp_path / "img", "--preset", "tiny", "--no-progress"]
    code, _, err = cli("score", *args, "--out", tmp_path / "s", "--metric", "clip-x@nothing")
    assert code == 2 and "unknown metric clip-x@nothing" in err and "spfbench metrics" in err
    code, _, err = cli("score", *args, "--out", tmp_path / "s", "--metric", "lpips@alex-v0.1")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    code, _, err = cli("score", *args, "--out", tmp_path / "s", "--metric", "clip-i@vit-l-14")
    assert code == 2 and "different metrics" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before
    code, _, err = cli("score", "--testset", testset, "--images", tmp_path / "s", "--out", tmp_path / "t", "--preset", "tiny")
    assert code == 2 and "no image in" in err and "named by a triple id" in err
    code, _, err = cli("score", "--testset", tmp_path / "img", "--images", tmp_path / "img", "--out", tmp_path / "t")
    assert code == 2 and "not a test set folder" in err
    code, _, err = cli("score", *args, "--out", tmp_path / "t", "--weights", "hpsv2")
    assert code == 2 and "NAME=PATH" in err

    partial = tmp_path / "partial"
    shutil.copytree(testset, partial)
    meta = json.loads((partial / "testset.json").read_text())
    meta["status"] = "incomplete"
    (partial / "testset.json").write_text(json.dumps(meta))
    code, _, err = cli("score", "--testset", partial, "--images", tmp_path / "img", "--out", tmp_path / "u", "--preset", "tiny")
    assert code == 2 and "not complete" in err


def test_fid_with_fewer_than_two_images_reports_why(testset, tmp_path):
    customize(testset, tmp_path / "img")
    s = Scorer(testset, tmp_path / "img", tmp_path / "s", ["fid@inception-2048"], preset="tiny", device="cpu", limit=1).run(progress=False)
    r = s["metrics"]["fid@inception-2048"]
    assert r["value"] is None and "at least 2" in r["error"] and r["n"] == 1


def test_metrics_command_lists_every_id(cli):
    code, out, _ = cli("metrics")
    assert code == 0
    for mid in REGISTRY:
        assert mid in out


def test_half_precision_option_changes_only_the_transformer_metrics_and_only_slightly(testset, tmp_path):
    customize(testset, tmp_path / "img", lambda a, i: np.roll(a, 5, axis=0))
    ids = ["clip-i@vit-l-14", "clip-t@vit-l-14", "hpsv2@v2.1", "mps@overall", "lpips@alex-v0.1", "fid@inception-2048"]
    full = Scorer(testset, tmp_path / "img", tmp_path / "fp32", ids, preset="tiny", device="cpu").run(progress=False)
    half = Scorer(testset, tmp_path / "img", tmp_path / "bf16", ids, preset="tiny", device="cpu", dtype="bf16").run(progress=False)
    for mid in ids:
        a, b = full["metrics"][mid]["value"], half["metrics"][mid]["value"]
        if mid.startswith(("lpips", "fid")):  # always fp32
            assert a == b, mid
        else:
            assert b == pytest.approx(a, abs=0.05 * max(1.0, abs(a))), mid
    assert full["metrics"]["clip-i@vit-l-14"]["value"] != half["metrics"]["clip-i@vit-l-14"]["value"]


def test_a_customized_image_of_another_size_fails_only_the_pixel_aligned_metrics(testset, tmp_path):
    triples = customize(testset, tmp_path / "img")
    odd = triples[0]
    im = Image.open(tmp_path / "img" / f"{odd.id}.png")
    im.resize((im.width * 2, im.height * 2)).save(tmp_path / "img" / f"{odd.id}.png")
    ids = ["lpips@alex-v0.1", "seg-cons@sam-vit-h", "clip-i@vit-l-14", "id@arcface-buffalo-l"]
    s = Scorer(testset, tmp_path / "img", tmp_path / "s", ids, preset="tiny", device="cpu").run(progress=False)
    rows = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()}
    for mid in ("lpips@alex-v0.1", "seg-cons@sam-vit-h"):
        assert rows[odd.id][mid] is None and "sizes differ" in rows[odd.id]["errors"][mid]
        assert s["metrics"][mid]["failures"] == 1
    for mid in ("clip-i@vit-l-14", "id@arcface-buffalo-l"):
        assert rows[odd.id][mid] is not None and s["metrics"][mid]["failures"] == 0
