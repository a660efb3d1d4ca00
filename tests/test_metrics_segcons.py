import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from spfbench.errors import MissingWeightsError, SpfbenchError
from spfbench.metrics import Backbones, Batch, create
from spfbench.metrics.segcons import TINY_GENERATOR_PARAMS, SegConsVitB, seg_consistency, tiny_sam

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models, shared cores

VIT_H_LIKE = {"depth": 32, "global_attn_indexes": (7, 15, 23, 31)}  # ViT-H's parameter names, tiny widths


def _box(shape, rows, cols):
    m = np.zeros(shape, dtype=bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def _images(n, seed, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


# --- the matching function on hand-made masks ------------------------------------------------------


def test_hand_made_masks_with_an_unmatched_mask():
    s = (10, 10)
    a = [_box(s, (0, 10), (0, 5)), _box(s, (0, 5), (5, 10))]  # left half (50 px), top-right quarter (25 px)
    b = [
        _box(s, (0, 10), (0, 6)),  # left 6 columns (60 px): IoU with a[0] = 50/60
        _box(s, (1, 6), (5, 10)),  # the quarter one row lower (25 px): IoU with a[1] = 20/30
        _box(s, (8, 10), (8, 10)),  # 4 px, overlaps no mask of a: stays unmatched
    ]
    # Cross pairs: a[1]&b[0] = 5 px of 80 -> 1/16; a[0]&b[1] = 0. Best matching: (a0,b0), (a1,b1).
    expected = 100 * (Fraction(50, 60) * (50 + 60) + Fraction(20, 30) * (25 + 25)) / (50 + 25 + 60 + 25 + 4)
    assert seg_consistency(a, b) == pytest.approx(float(expected), rel=1e-12)
    # order of the masks and order of the two images do not matter
    assert seg_consistency(a[::-1], [b[2], b[0], b[1]]) == pytest.approx(float(expected), rel=1e-12)
    assert seg_consistency(b, a) == pytest.approx(float(expected), rel=1e-12)
    # arrays (N, H, W) work as lists do; an all-empty mask is ignored
    assert seg_consistency(np.stack(a + [np.zeros(s, bool)]), np.stack(b)) == pytest.approx(float(expected), rel=1e-12)


def test_matching_is_the_best_one_to_one_assignment_not_greedy():
    s = (1, 10)
    a = [_box(s, (0, 1), (0, 2)), _box(s, (0, 1), (1, 5))]  # {0,1}, {1,2,3,4}
    b = [_box(s, (0, 1), (1, 3)), _box(s, (0, 1), (3, 6))]  # {1,2}, {3,4,5}
    # IoU x (|A|+|B|): a0b0 = 1/3 * 4, a0b1 = 0, a1b0 = 2/4 * 6 = 3, a1b1 = 2/5 * 7. Greedy takes a1b0 first
    # (3, then a0b1 = 0); the best matching is a0b0 + a1b1 = 4/3 + 14/5.
    expected = 100 * (Fraction(1, 3) * 4 + Fraction(2, 5) * 7) / (2 + 4 + 2 + 3)
    assert seg_consistency(a, b) == pytest.approx(float(expected), rel=1e-12)
    assert float(expected) > 100 * 3 / 11


def _brute_force(a, b):
    """The best area-weighted IoU over all one-to-one matchings, by enumeration with Python sets."""
    sa, sb = [set(zip(*np.nonzero(m))) for m in a], [set(zip(*np.nonzero(m))) for m in b]
    sa, sb = [x for x in sa if x], [x for x in sb if x]
    total = sum(map(len, sa)) + sum(map(len, sb))
    iou = [[Fraction(len(x & y), len(x | y)) for y in sb] for x in sa]
    k = min(len(sa), len(sb))
    best = max(
        sum(iou[r][c] * (len(sa[r]) + len(sb[c])) for r, c in zip(rows, cols))
        for rows in itertools.permutations(range(len(sa)), k)
        for cols in itertools.permutations(range(len(sb)), k)
    )
    return float(100 * best / total)


def test_random_masks_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(30):
        a = rng.random((int(rng.integers(1, 4)), 5, 6)) < 0.4
        b = rng.random((int(rng.integers(1, 4)), 5, 6)) < 0.4
        assert seg_consistency(a, b) == pytest.approx(_brute_force(a, b), rel=1e-12)
        checked += 1
    assert checked >= 20


def test_empty_and_identical_sets():
    s = (6, 7)
    a = [_box(s, (0, 3), (0, 7)), _box(s, (3, 6), (2, 5))]
    assert seg_consistency(a, a) == pytest.approx(100.0)
    assert seg_consistency(a, []) == 0.0 and seg_consistency(np.zeros((0, *s), bool), a) == 0.0
    assert seg_consistency([], []) is None
    assert seg_consistency([np.zeros(s, bool)], np.zeros((0, *s), bool)) is None  # zero-area masks are no masks
    assert seg_consistency([_box(s, (0, 2), (0, 2))], [_box(s, (4, 6), (4, 6))]) == 0.0  # disjoint
    with pytest.raises(ValueError, match="differ in size"):
        seg_consistency(a, [np.ones((5, 5), bool)])


# --- the metric on the tiny random SAM -------------------------------------------------------------


@pytest.fixture(scope="module")
def bb():
    return Backbones("tiny", "cpu")


def test_batched_encoder_gives_the_stock_generator_masks_and_values(bb):
    from segment_anything import SamAutomaticMaskGenerator

    ims = _images(3, 0) + _images(1, 1, size=(32, 56))  # two sizes in one encoder batch
    m = create("seg-cons@sam-vit-h", bb)
    m.encoder_batch = 3  # two encoder calls for four images
    ours = m.masks(ims)
    stock = SamAutomaticMaskGenerator(bb.get("sam-vit-h"), **TINY_GENERATOR_PARAMS)
    ref = [np.stack([r["segmentation"] for r in stock.generate(np.asarray(im))]) for im in ims]
    for o, r in zip(ours, ref):
        assert o.dtype == bool and len(o) > 0
        np.testing.assert_array_equal(o, r)
    m.update(Batch(["p", "q"], ims[:2], ims[1:3], ["x", "y"]))
    assert m.values["p"] == pytest.approx(seg_consistency(ref[0], ref[1]), rel=1e-12)
    assert m.values["q"] == pytest.approx(seg_consistency(ref[1], ref[2]), rel=1e-12)
    assert 0.0 < m.values["p"] < 100.0


def test_identical_images_give_100_and_a_changed_image_less(bb):
    ims = _images(2, 3)
    rng = np.random.default_rng(4)
    noisy = Image.fromarray(np.clip(np.asarray(ims[0], int) + rng.integers(-40, 41, (40, 48, 3)), 0, 255).astype(np.uint8))
    m = create("seg-cons@sam-vit-h", bb)
    assert all(len(x) > 0 for x in m.masks(ims))
    m.update(Batch(["same", "noisy", "other"], [ims[0]] * 3, [ims[0], noisy, ims[1]], ["x"] * 3))
    assert m.values["same"] == pytest.approx(100.0)
    assert 0.0 < m.values["other"] < m.values["noisy"] < 100.0
    r = m.compute()
    assert (r["column"], r["higher_is_better"], r["n"], r["failures"]) == ("Seg-Cons", True, 3, 0)


def test_size_mismatch_and_no_masks_are_recorded_failures(bb):
    a, b = _images(2, 5)
    m = create("seg-cons@sam-vit-h", bb)
    m.update(Batch(["ok", "odd"], [a, a], [b, _images(1, 6, size=(48, 40))[0]], ["x", "y"]))
    assert m.values["odd"] is None and "sizes differ" in m.reasons["odd"]
    assert m.values["ok"] is not None and "ok" not in m.reasons
    # No mask passes an impossible quality threshold: both sets empty -> failure, not 0 or 100.
    strict = type(m)(bb, generator_params={"pred_iou_thresh": 2.0})
    strict.update(Batch(["none"], [a], [a], ["x"]))
    assert strict.values["none"] is None and strict.reasons["none"] == "no masks in either image"
    assert (strict.compute()["n"], strict.compute()["failures"]) == (0, 1)


def test_shards_merged_equal_one_pass(bb):
    o, c = _images(5, 7), _images(5, 8)
    ids = [f"t{i}" for i in range(5)]
    whole, s1, s2 = (create("seg-cons@sam-vit-h", bb) for _ in range(3))
    whole.update(Batch(ids, o, c, ["x"] * 5))
    s1.update(Batch(ids[:2], o[:2], c[:2], ["x"] * 2))
    s2.update(Batch(ids[2:], o[2:], c[2:], ["x"] * 3))
    s1.merge(s2.state())
    assert s1.values == pytest.approx(whole.values, rel=1e-12)
    r1, rw = s1.compute(), whole.compute()
    assert (r1["n"], r1["failures"]) == (rw["n"], rw["failures"]) == (5, 0)
    assert r1["value"] == pytest.approx(rw["value"], rel=1e-12)
    s1.merge(s2.state())  # merging a shard again does not count it twice
    assert s1.compute()["n"] == 5


# --- real weights: presence, strict loading, no code unpickled --------------------------------------


def test_missing_weights_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as e:
        Backbones("real", "cpu").get("sam-vit-h")
    msg = str(e.value)
    assert "\n" not in msg and "sam_vit_h_4b8939.pth" in msg
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg
    from spfbench.metrics.segcons import weight_rows

    row, row_b = weight_rows()
    assert row_b["name"] == "sam-vit-b" and row_b["path"].endswith("sam_vit_b_01ec64.pth") and row_b["present"] is False
    assert row["present"] is False and row["path"] == str(tmp_path / "hub" / "checkpoints" / "sam_vit_h_4b8939.pth")
    assert row["name"] == "sam-vit-h" and row["size"] == "2.56 GB"


def test_tiny_vit_h_like_model_has_exactly_vit_h_parameter_names():
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        real = sam_model_registry["vit_h"](checkpoint=None)
    assert set(real.state_dict()) == set(tiny_sam(**VIT_H_LIKE).state_dict())
    assert len(real.state_dict()) > 500


@pytest.fixture
def vit_h_checkpoint(tmp_path, monkeypatch):
    """A small checkpoint with ViT-H's key names at TORCH_HOME's place; sam_model_registry builds the tiny twin."""
    import segment_anything

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_h", lambda checkpoint=None: tiny_sam(seed=9, **VIT_H_LIKE))
    source = tiny_sam(seed=1, **VIT_H_LIKE)
    path = tmp_path / "hub" / "checkpoints" / "sam_vit_h_4b8939.pth"
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    return path, source


def test_real_loader_loads_every_tensor_strictly(vit_h_checkpoint):
    path, source = vit_h_checkpoint
    model = Backbones("real", "cpu").get("sam-vit-h")
    got, want = model.state_dict(), source.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # the non-persistent buffers the checkpoint does not hold are segment-anything's values (Sam's defaults in source)
    assert torch.equal(model.pixel_mean, source.pixel_mean) and torch.equal(model.pixel_std, source.pixel_std)
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        assert torch.equal(model.image_encoder(model.preprocess(x)), source.image_encoder(source.preprocess(x)))
    # --weights sam-vit-h=PATH is used before the torch hub folder
    moved = path.parent.parent / "elsewhere.pth"
    path.rename(moved)
    assert torch.equal(Backbones("real", "cpu", weights={"sam-vit-h": str(moved)}).get("sam-vit-h").mask_decoder.iou_token.weight,
                       source.mask_decoder.iou_token.weight)


def test_real_loader_rejects_incomplete_extra_misshapen_and_pickled_code(vit_h_checkpoint):
    path, source = vit_h_checkpoint
    state = source.state_dict()
    cases = {
        "missing keys": {k: v for k, v in state.items() if k != "mask_decoder.iou_token.weight"},
        "unexpected": {**state, "extra.weight": torch.zeros(1)},
        "does not fit": {**state, "mask_decoder.iou_token.weight": torch.zeros(1, 7)},
    }
    for words, bad in cases.items():
        torch.save(bad, path)
        with pytest.raises(SpfbenchError, match=words):
            Backbones("real", "cpu").get("sam-vit-h")
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module: would need code execution to load
    with pytest.raises(SpfbenchError, match="cannot read SAM checkpoint"):
        Backbones("real", "cpu").get("sam-vit-h")


def test_vit_b_variant_uses_its_own_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert SegConsVitB.id == "seg-cons@sam-vit-b"
    with pytest.raises(MissingWeightsError, match="sam_vit_b_01ec64.pth"):
        SegConsVitB(Backbones("real", "cpu")).masks(_images(1, 0))
