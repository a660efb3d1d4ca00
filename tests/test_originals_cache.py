"""The originals' feature cache (issue 23): every pairwise metric, cached against uncached, on the tiny preset."""

import json
import multiprocessing
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from spfbench.generation import GenerationSettings
from spfbench.metrics import Backbones, PairwiseMetric, metric_class
from spfbench.originals_cache import FOLDER, OriginalsCache
from spfbench.scoring import Scorer, read_image
from spfbench.testset import TestsetBuilder, load_testset
from spfbench.world.attributes import TARGET_TEXTS

pytestmark = pytest.mark.usefixtures("one_thread")

N = 5
PAIRWISE = ["lpips@alex-v0.1", "id@arcface-buffalo-l", "clip-i@vit-l-14", "seg-cons@sam-vit-h", "gt-preserve@world-reader"]


def _build(out, captions, n=N):
    from spfbench.models import load_pipeline

    TestsetBuilder(out, preset="tiny", n=n, captions=captions, settings=GenerationSettings(steps=2), device="cpu").run(
        progress=False, pipeline=load_pipeline("tiny", device="cpu"))
    return out


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    path = tmp_path_factory.mktemp("caps") / "captions.jsonl"
    targets = list(TARGET_TEXTS)  # world targets, so GT-Preserve gives values
    path.write_text("".join(json.dumps({"base_caption": f"A woman, reading, number {i}", "target_text": targets[i % len(targets)]}) + "\n"
                            for i in range(N)))
    return path


@pytest.fixture
def testset(tmp_path, captions):
    return _build(tmp_path / "testset", captions)


def customize(testset, folder, shift):
    folder.mkdir(parents=True, exist_ok=True)
    for t in load_testset(testset)[1]:
        Image.fromarray(np.roll(np.asarray(read_image(testset / t.original)), shift, axis=1)).save(folder / f"{t.id}.png")
    return folder


def rows(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def score(testset, images, out, **kw):
    kw.setdefault("batch_size", 2)
    return Scorer(testset, images, out, PAIRWISE, preset="tiny", device="cpu", **kw).run(progress=False)


@pytest.fixture
def counting(monkeypatch):
    """Originals whose features each pairwise metric computes, per metric id."""
    counts = {m: 0 for m in PAIRWISE}
    for mid in PAIRWISE:
        cls = metric_class(mid)
        real = cls.original_features

        def counted(self, ids, images, real=real, mid=mid):
            counts[mid] += len(ids)
            return real(self, ids, images)

        monkeypatch.setattr(cls, "original_features", counted)
    return counts


def test_every_pairwise_metric_declares_its_originals_side():
    for mid in PAIRWISE:
        assert issubclass(metric_class(mid), PairwiseMetric), mid


def test_second_scoring_reads_the_cache_and_gives_identical_values(testset, tmp_path, counting, monkeypatch):
    a, b = customize(testset, tmp_path / "a", 3), customize(testset, tmp_path / "b", 7)
    uncached = score(testset, a, tmp_path / "plain", cache_originals=False)
    assert not (testset / FOLDER).exists() and counting == {m: N for m in PAIRWISE}
    first = score(testset, a, tmp_path / "first")
    assert counting == {m: 2 * N for m in PAIRWISE}
    folders = sorted((testset / FOLDER).iterdir())
    assert len(folders) == len(PAIRWISE) and all(len(list(f.glob("*.safetensors"))) == N for f in folders)
    assert json.loads((folders[0] / "key.json").read_text())["testset_content_sha256"] == load_testset(testset)[0]["content_sha256"]

    for mid in PAIRWISE:  # from now on an original's features must come from the cache
        monkeypatch.setattr(metric_class(mid), "original_features", lambda *a, mid=mid: pytest.fail(f"{mid} recomputed an original"))
    again = score(testset, a, tmp_path / "again")
    other = score(testset, b, tmp_path / "other")  # the second method
    # the same batching: bit-identical to the uncached path and to the scoring that filled the cache
    assert (tmp_path / "again" / "samples.jsonl").read_text() == (tmp_path / "first" / "samples.jsonl").read_text()
    assert (tmp_path / "plain" / "samples.jsonl").read_text() == (tmp_path / "first" / "samples.jsonl").read_text()
    assert again["metrics"] == first["metrics"] == uncached["metrics"]
    for mid in PAIRWISE:
        assert all(r[mid] is not None for r in rows(tmp_path / "again") + rows(tmp_path / "other")), mid  # all scored
        if mid != "gt-preserve@world-reader":  # (a 0-1 read may agree on both shifts) the second method's own values
            assert [r[mid] for r in rows(tmp_path / "other")] != [r[mid] for r in rows(tmp_path / "again")], mid

    # another batching: the cached features were computed in other batches; equal within float rounding
    regrouped = score(testset, b, tmp_path / "regrouped", batch_size=3)
    monkeypatch.undo()
    fresh = score(testset, b, tmp_path / "fresh", batch_size=3, cache_originals=False)
    for mid in PAIRWISE:
        assert regrouped["metrics"][mid]["value"] == pytest.approx(fresh["metrics"][mid]["value"], rel=1e-6, abs=1e-9), mid
        assert other["metrics"][mid]["value"] == pytest.approx(fresh["metrics"][mid]["value"], rel=1e-6, abs=1e-9), mid


def test_corrupt_or_foreign_entries_are_recomputed_not_fatal(testset, tmp_path, counting):
    a = customize(testset, tmp_path / "a", 3)
    first = score(testset, a, tmp_path / "first")
    entries = sorted((testset / FOLDER / next(p.name for p in (testset / FOLDER).iterdir() if p.name.startswith("clip-i"))).glob("*.safetensors"))
    data = entries[0].read_bytes()
    entries[0].write_bytes(data[: len(data) // 2])  # a partial file
    entries[1].write_bytes(b"not a safetensors file")
    flipped = bytearray(entries[2].read_bytes())
    flipped[-1] ^= 0xFF  # the last byte of the tensor data: loads, but fails its checksum
    entries[2].write_bytes(bytes(flipped))
    lpips_folder = next(p for p in (testset / FOLDER).iterdir() if p.name.startswith("lpips"))
    shutil.copy(entries[3], lpips_folder / entries[3].name)  # another metric's entry under this key's name
    before = dict(counting)
    second = score(testset, a, tmp_path / "second")
    assert counting["clip-i@vit-l-14"] - before["clip-i@vit-l-14"] == 3
    assert counting["lpips@alex-v0.1"] - before["lpips@alex-v0.1"] == 1
    assert sum(counting.values()) - sum(before.values()) == 4
    # the recomputed originals came in a batch of their own: equal within float rounding (on CPUs whose GEMM
    # kernels depend on the batch, e.g. AVX-512, the last digits move), as for another batching above
    for r2, r1 in zip(rows(tmp_path / "second"), rows(tmp_path / "first"), strict=True):
        assert r2.keys() == r1.keys() and r2["id"] == r1["id"]
        for k, v in r1.items():
            assert r2[k] == (pytest.approx(v, rel=1e-6, abs=1e-9) if isinstance(v, float) else v), (r1["id"], k)
    for mid, m in first["metrics"].items():
        assert second["metrics"][mid]["value"] == pytest.approx(m["value"], rel=1e-6, abs=1e-9), mid
    score(testset, a, tmp_path / "third")  # the recomputed entries were written back whole
    assert sum(counting.values()) - sum(before.values()) == 4


def _perturbed_reader(src, dst, delta):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    state = load_file(str(src))
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 10)
    state[name] = state[name] + delta
    save_file(state, str(dst), metadata=meta)
    return dst


def test_changed_weights_or_test_set_change_the_key(testset, tmp_path, counting, captions):
    from spfbench.world.reader import DEFAULT_WEIGHTS

    a = customize(testset, tmp_path / "a", 3)
    gt = ["gt-preserve@world-reader"]
    Scorer(testset, a, tmp_path / "s1", gt, preset="tiny", device="cpu").run(progress=False)
    assert counting["gt-preserve@world-reader"] == N
    # the same weights in another file: the key is of the tensors, not of the path
    same = _perturbed_reader(DEFAULT_WEIGHTS, tmp_path / "same.safetensors", 0.0)
    Scorer(testset, a, tmp_path / "s2", gt, preset="tiny", device="cpu", weights={"world-reader": str(same)}).run(progress=False)
    assert counting["gt-preserve@world-reader"] == N
    changed = _perturbed_reader(DEFAULT_WEIGHTS, tmp_path / "changed.safetensors", 1e-3)
    Scorer(testset, a, tmp_path / "s3", gt, preset="tiny", device="cpu", weights={"world-reader": str(changed)}).run(progress=False)
    assert counting["gt-preserve@world-reader"] == 2 * N
    assert len(list((testset / FOLDER).iterdir())) == 2

    # a changed original: the test set's content hash, hence the key, changes; nothing stale is read
    t0 = load_testset(testset)[1][0]
    im = np.asarray(read_image(testset / t0.original)).copy()
    im[:4, :4] = 255 - im[:4, :4]
    Image.fromarray(im).save(testset / t0.original)
    old_hash = load_testset(testset)[0]["content_sha256"]
    TestsetBuilder(testset, preset="tiny", n=N, captions=captions, settings=GenerationSettings(steps=2), device="cpu").finalize()
    assert load_testset(testset)[0]["content_sha256"] != old_hash
    lpips = ["lpips@alex-v0.1"]
    Scorer(testset, a, tmp_path / "s4", lpips, preset="tiny", device="cpu").run(progress=False)
    assert counting["lpips@alex-v0.1"] == N
    assert len(list((testset / FOLDER).iterdir())) == 3


def test_fingerprint_follows_the_tensors():
    one, two = Backbones("tiny", "cpu"), Backbones("tiny", "cpu")
    names = ["lpips-alex", "clip-vit-l-14", "sam-vit-h", "arcface-buffalo-l", "world-reader"]
    for mid in PAIRWISE:
        metric_class(mid)  # registers the backbones
    assert [one.fingerprint(n) for n in names] == [two.fingerprint(n) for n in names]  # same seed, same tensors
    assert len({one.fingerprint(n) for n in names}) == len(names)
    three = Backbones("tiny", "cpu")
    with torch.no_grad():
        next(three.get("lpips-alex").parameters()).view(-1)[0] += 1e-6
    assert three.fingerprint("lpips-alex") != one.fingerprint("lpips-alex")


def test_a_read_only_test_set_is_scored_without_caching(testset, tmp_path, counting, monkeypatch):
    a = customize(testset, tmp_path / "a", 3)
    first = score(testset, a, tmp_path / "first", cache_originals=False)

    def refuse(*args, **kw):
        raise PermissionError("read-only file system")

    monkeypatch.setattr("spfbench.originals_cache.atomic_write_bytes", refuse)
    monkeypatch.setattr("spfbench.originals_cache.atomic_write_json", refuse)
    second = score(testset, a, tmp_path / "second")
    assert second["metrics"] == first["metrics"]
    assert not list((testset / FOLDER).rglob("*.safetensors"))
    assert counting == {m: 2 * N for m in PAIRWISE}


BIG = 1 << 20  # a 4 MB entry: a torn write would be visible


def _cache(root):
    from spfbench.metrics import Backbones, create

    return OriginalsCache(root, "0" * 64, create("clip-i@vit-l-14", Backbones("tiny", "cpu")))


def _write_repeatedly(root, n):
    cache = _cache(root)
    for _ in range(n):
        cache.store("t0", {"x": torch.arange(BIG, dtype=torch.float32)})


def test_two_processes_writing_one_entry_never_leave_a_torn_file(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_repeatedly, args=(tmp_path, 30)) for _ in range(2)]
    for p in procs:
        p.start()
    reader = _cache(tmp_path)
    seen = torn = 0
    while any(p.is_alive() for p in procs):
        if reader.path("t0").is_file():
            got = reader.load("t0")
            seen += 1
            torn += got is None or not torch.equal(got["x"], torch.arange(BIG, dtype=torch.float32))
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert seen > 0 and torn == 0
    assert sorted(p.name for p in reader.folder.iterdir()) == ["key.json", "t0.safetensors"]  # no temporary file left
