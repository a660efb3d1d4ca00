"""Portrait World ground-truth masks: the renderer's part masks agree with its pixels, the phrase -> region
rule, and ``spfbench masks --preset world`` on a world set (and its refusal of anything else)."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import snapshot
from spfbench.errors import SpfbenchError
from spfbench.masks import sample_phrases
from spfbench.world.masks import world_phrase_parts
from spfbench.world import attributes as W
from spfbench.world.render import HAT_BAND, HAT_RGB, PARTS, part_masks, render, render_parts

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(W.sample("pretrain", 0, 0), position="center", pose="front", hair_style="short")


def _with(**kw):
    return dict(BASE, **kw)


def _dilate(m, r):
    """m grown by r pixels (square neighbourhood)."""
    p = np.pad(m, r)
    n = m.shape[0]
    return np.logical_or.reduce([p[r + dy:r + dy + n, r + dx:r + dx + n] for dy in range(-r, r + 1) for dx in range(-r, r + 1)])


def _phrase_mask(attrs, phrase, size=64, variant=None):
    (parts,) = world_phrase_parts(attrs, [phrase])
    masks = part_masks(attrs, size, variant)
    return np.logical_or.reduce([masks[p] for p in parts])


# ---------------------------------------------------------------------------------------------- part masks


@pytest.mark.parametrize("size", [48, 64, 1024])
def test_parts_partition_the_image_and_render_is_unchanged(size):
    for i in range(0, 10, 3):
        attrs = W.sample("finetune", i, 0)
        img, masks = render_parts(attrs, size, variant=i)
        assert list(masks) == list(PARTS)
        assert np.array_equal(np.asarray(img), np.asarray(render(attrs, size, variant=i)))
        stack = np.stack([masks[p] for p in PARTS])
        assert stack.shape == (len(PARTS), size, size) and stack.dtype == bool
        assert (stack.sum(0) == 1).all()  # disjoint and covering
        assert masks["face"].any() and masks["garment"].any() and masks["background"].any()


@pytest.mark.parametrize("attr,value,part", [("headwear", "hat", "hat"), ("eyewear", "glasses", "eyewear"),
                                             ("eyewear", "sunglasses", "eyewear"), ("freckles", "yes", "freckles")])
def test_target_mask_is_exactly_what_the_target_changes(attr, value, part):
    # at 1024 px the renderer draws at 1x (no reduction): the pixels a target changes are exactly its mask
    on, off = _with(**{attr: value}), BASE
    img, masks = render_parts(on, 1024, variant=7)
    changed = (np.asarray(img) != np.asarray(render(off, 1024, variant=7))).any(-1)
    assert masks[part].sum() > 100
    assert np.array_equal(changed, masks[part])
    assert not part_masks(off, 1024, variant=7)[part].any()  # absent target: empty part
    if part == "hat":
        inside = np.asarray(img)[masks["hat"]]
        assert np.isin(inside.view([("", inside.dtype)] * 3).ravel(),
                       np.array([HAT_RGB, HAT_BAND], dtype=inside.dtype).view([("", inside.dtype)] * 3).ravel()).all()


def test_hat_mask_at_64px_agrees_with_the_image():
    on = _with(headwear="hat")
    img, masks = render_parts(on, 64, variant=3)
    a = np.asarray(img, dtype=float)
    b = np.asarray(render(BASE, 64, variant=3), dtype=float)
    hat = masks["hat"]
    diff = np.abs(a - b).sum(-1)
    assert hat.sum() > 50
    assert (diff[hat] > 30).mean() > 0.9  # the hat's pixels changed
    far = ~_dilate(hat, 4)
    assert diff[far].max() == 0  # away from it nothing did
    # the hat's own pixels are close to the hat colours (away from its edge, where the reduction blends)
    core = hat & np.roll(hat, 1, 0) & np.roll(hat, -1, 0) & np.roll(hat, 1, 1) & np.roll(hat, -1, 1)
    cols = a[core][:, None, :] - np.array([HAT_RGB, HAT_BAND], dtype=float)[None]
    assert (np.abs(cols).max(-1).min(-1) < 40).mean() > 0.8


def test_person_and_background_partition_and_follow_position():
    attrs = _with(position="left")
    phrases = [text for text, _ in W.caption_phrases(attrs)]
    person = _phrase_mask(attrs, phrases[0])
    background = _phrase_mask(attrs, phrases[2])
    assert not (person & background).any() and (person | background).all()
    xs = []
    for pos in ("left", "center", "right"):
        m = _phrase_mask(_with(position=pos), phrases[0])
        xs.append(np.nonzero(m)[1].mean())
        assert m.sum() == pytest.approx(person.sum(), rel=0.05)  # the same figure, moved
    assert xs[0] < xs[1] < xs[2]
    assert xs[1] - xs[0] == pytest.approx(0.2 * 64, abs=1.5)
    assert not np.array_equal(person, _phrase_mask(_with(position="center"), phrases[0]))


def test_pencil_style_moves_no_part_and_its_phrase_is_the_whole_image():
    pencil = _with(style="pencil drawing")
    a, b = part_masks(pencil, 64, 2), part_masks(BASE, 64, 2)
    assert all(np.array_equal(a[p], b[p]) for p in PARTS)
    assert _phrase_mask(pencil, "pencil drawing style").all()


def test_phrase_rule():
    attrs = _with(headwear="hat", subject="woman", expression="smiling", background="blue",
                  clothing_color="red", garment="T-shirt")
    phrases = ["A woman", "smiling", "with a blue background", "in a red T-shirt", "a hat", "glasses",
               "a scarf", "pencil drawing style"]
    parts = world_phrase_parts(attrs, phrases)
    assert set(parts[0]) == set(PARTS) - {"background"}
    assert "face" in parts[1] and "mouth" in parts[1] and "hair" not in parts[1] and "hat" not in parts[1]
    assert parts[2] == ("background",) and parts[3] == ("garment",) and parts[4] == ("hat",)
    assert parts[5] is None and parts[6] is None and parts[7] is None  # not shown / unknown
    assert world_phrase_parts(attrs, [" a WOMAN "]) == [parts[0]]
    # the garment phrase covers the garment and nothing of the face
    m = part_masks(attrs, 64)
    assert m["garment"].any() and not (m["garment"] & m["face"]).any()


# ---------------------------------------------------------------------------------------------- spfbench masks --preset world


def _rows(d):
    return [json.loads(x) for x in (d / "metadata.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def world_set(tmp_path_factory):
    from spfbench.world.datasets import make_world_set

    d = tmp_path_factory.mktemp("world") / "ft"
    make_world_set(d, "finetune", 6, seed=0, size=64)
    return d


def test_cli_world_preset_writes_ground_truth_attn_list(world_set, cli, tmp_path):
    import shutil

    from spfbench.data import PortraitDataset

    d = tmp_path / "ft"
    shutil.copytree(world_set, d)
    rows0 = _rows(d)
    rows0[1]["target_text"] = "a scarf"  # a phrase with no region (the image shows no scarf)
    (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows0))
    code, out, err = cli("masks", "--data", d, "--preset", "world", "--no-progress")
    assert code == 0, err
    assert "29 masks for 6 samples (6 segmented now)" in out
    rows = _rows(d)
    for i, (old, row) in enumerate(zip(rows0, rows)):
        assert {k: v for k, v in row.items() if k != "attn_list"} == old
        phrases = sample_phrases(row["base_caption"], row["target_text"])
        assert [p for p, _ in row["attn_list"]] == phrases
        parts = world_phrase_parts(row["attributes"], phrases)
        masks = part_masks(row["attributes"], 64, variant=i)
        for k, ((_, rel), ps) in enumerate(zip(row["attn_list"], parts)):
            if i == 1 and k == 4:
                assert rel is None and ps is None
                continue
            stem = row["file_name"].rsplit(".", 1)[0]
            assert rel == f"masks/{stem}/{k}.png"
            with Image.open(d / rel) as im:
                assert im.mode == "L" and im.size == (64, 64)
                got = np.asarray(im)
            assert set(np.unique(got).tolist()) <= {0, 255}
            np.testing.assert_array_equal(got == 255, np.logical_or.reduce([masks[p] for p in ps]))
    assert not (d / "masks/images/00001/4.png").exists()
    ds = PortraitDataset(d, resolution=64)
    assert [len(r.extras["attn_list"]) for r in ds.records] == [5] * 6
    assert sum(p[1] is None for r in ds.records for p in r.extras["attn_list"]) == 1
    # rerun: nothing to do, nothing written
    snap = snapshot(d)
    code, out, err = cli("masks", "--data", d, "--preset", "world", "--no-progress")
    assert code == 0, err
    assert "0 segmented now" in out and "unchanged" in out
    assert snapshot(d) == snap


def test_world_preset_uses_the_file_name_variant_for_a_subset(world_set, tmp_path):
    import shutil

    from spfbench.masks import generate_masks

    d = tmp_path / "ft"
    shutil.copytree(world_set, d)
    rows = _rows(d)[3:]  # row 0 is image 00003 (variant 3)
    (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = generate_masks(d, "world", progress=False)
    assert r.samples == 3 and r.masks == 15
    got = np.asarray(Image.open(d / "masks/images/00003/0.png")) == 255
    masks = part_masks(rows[0]["attributes"], 64, variant=3)
    np.testing.assert_array_equal(got, ~masks["background"])


def test_world_preset_refuses_a_non_world_set(tmp_path, cli):
    from spfbench.toydata import make_toy_data

    d = tmp_path / "toy"
    make_toy_data(d, 2, size=64)  # its rows carry the toy world's `attributes`, not Portrait World's
    snap = snapshot(d)
    code, out, err = cli("masks", "--data", d, "--preset", "world", "--no-progress")
    assert code == 2
    assert "not a Portrait World ground truth" in err and "spfbench world data" in err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(d) == snap
    rows = [{k: v for k, v in r.items() if k != "attributes"} for r in _rows(d)]
    (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    snap = snapshot(d)
    code, out, err = cli("masks", "--data", d, "--preset", "world", "--no-progress")
    assert code == 2
    assert "no `attributes` column (not a Portrait World set)" in err and "spfbench world data" in err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(d) == snap


def test_world_preset_refuses_an_image_that_is_not_the_render(world_set, tmp_path):
    import shutil

    from spfbench.masks import generate_masks

    d = tmp_path / "ft"
    shutil.copytree(world_set, d)
    render(W.sample("finetune", 5, 0), 64, variant=5).save(d / "images/00002.png")
    with pytest.raises(SpfbenchError, match="not the Portrait World render"):
        generate_masks(d, "world", progress=False)
    rows = _rows(d)
    rows[0]["attributes"] = dict(rows[0]["attributes"], hair_color="purple")
    (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SpfbenchError, match="not a Portrait World ground truth"):
        generate_masks(d, "world", progress=False)
