import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from spfbench.errors import MissingWeightsError
from spfbench.metrics import Backbones, Batch, create


def _images(n, seed, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def _batch(n=5, ids=None, seeds=(0, 1)):
    ids = ids or [f"t{i}" for i in range(n)]
    return Batch(ids, _images(n, seeds[0]), _images(n, seeds[1]), ["a hat"] * n)


def test_lpips_equals_the_package_forward():
    import lpips

    bb = Backbones("tiny", "cpu")
    m = create("lpips@alex-v0.1", bb)
    b = _batch()
    m.update(b)
    net = bb.get("lpips-alex")
    with torch.no_grad():  # lpips' own image conversion (im2tensor) and forward, one pair at a time
        ref = [float(net(lpips.im2tensor(np.array(o)), lpips.im2tensor(np.array(c)))) for o, c in zip(b.originals, b.customized)]
    np.testing.assert_allclose([m.values[i] for i in b.ids], ref, rtol=1e-5, atol=1e-6)
    assert m.compute()["column"] == "LPIPS" and m.compute()["higher_is_better"] is False


def test_lpips_identical_is_zero_and_size_mismatch_is_a_recorded_failure():
    m = create("lpips@alex-v0.1", Backbones("tiny", "cpu"))
    imgs = _images(2, 3)
    m.update(Batch(["same", "odd"], imgs, [imgs[0], _images(1, 4, size=(32, 32))[0]], ["x", "y"]))
    assert m.values["same"] == pytest.approx(0.0, abs=1e-7)
    assert m.values["odd"] is None and "sizes differ" in m.reasons["odd"]
    r = m.compute()
    assert (r["n"], r["failures"]) == (1, 1)


def test_lpips_real_weights_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
        Backbones("real", "cpu").get("lpips-alex")


def _features(images):
    net = Backbones("tiny", "cpu").get("inception-fid")
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    with torch.no_grad():
        return net(x).double().numpy()


def _scipy_fid(f1, f2):
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_equals_a_scipy_frechet_distance_on_the_same_features():
    b = _batch(n=40)
    m = create("fid@inception-2048", Backbones("tiny", "cpu"))
    m.update(b)
    r = m.compute()
    assert r["n"] == 40 and r["column"] == "FID"
    assert r["value"] == pytest.approx(_scipy_fid(_features(b.originals), _features(b.customized)), rel=1e-6)


def test_fid_shards_merge_and_identical_sets_give_zero():
    bb = Backbones("tiny", "cpu")
    b = _batch(n=12)
    whole, a, c = (create("fid@inception-2048", bb) for _ in range(3))
    whole.update(b)
    a.update(Batch(b.ids[:7], b.originals[:7], b.customized[:7], b.target_texts[:7]))
    c.update(Batch(b.ids[7:], b.originals[7:], b.customized[7:], b.target_texts[7:]))
    a.merge(c.state())
    assert a.compute()["value"] == pytest.approx(whole.compute()["value"], rel=1e-6)
    a.update(b)  # triples already counted are not counted again
    assert a.compute()["n"] == 12
    same = create("fid@inception-2048", bb)
    same.update(Batch(b.ids, b.originals, b.originals, b.target_texts))
    assert same.compute()["value"] == pytest.approx(0.0, abs=1e-6)


def test_fid_scores_a_batch_that_mixes_image_sizes_as_each_size_alone():
    # regression (issue 22): a folder with two image sizes in one scoring batch crashed in torch.stack
    small, large = _images(3, 5, size=(32, 32)), _images(3, 6, size=(64, 64))
    mixed = [small[0], large[0], small[1], large[1], large[2], small[2]]
    m = create("fid@inception-2048", Backbones("tiny", "cpu"))
    got = m.features(mixed).numpy()
    want = np.concatenate([_features([im]) for im in mixed])
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-6)
    m.update(Batch([f"t{i}" for i in range(6)], mixed, mixed[::-1], ["a hat"] * 6))
    assert m.compute()["n"] == 6 and m.compute()["value"] is not None


def test_fid_needs_two_images():
    m = create("fid@inception-2048", Backbones("tiny", "cpu"))
    m.update(_batch(n=1))
    r = m.compute()
    assert r["value"] is None and "at least 2" in r["error"] and r["n"] == 1
