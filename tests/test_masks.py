"""spfbench masks: CLIPSeg noun-phrase masks written beside an imagefolder for TokenCompose (tiny preset)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import snapshot
from spfbench.errors import MissingWeightsError, SpfbenchError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    from spfbench.masks import generate_masks
    from spfbench.toydata import make_toy_data

    d = tmp_path_factory.mktemp("masked") / "data"
    make_toy_data(d, 4, size=64)
    before = (d / "metadata.jsonl").read_text()
    r = generate_masks(d, "tiny", progress=False, device="cpu")
    return d, before, r


def _rows(d):
    return [json.loads(x) for x in (d / "metadata.jsonl").read_text().splitlines() if x.strip()]


def test_masks_for_every_sample_and_phrase(masked):
    from spfbench.data import PortraitDataset
    from trainers.spf_losses import split_base_phrases

    d, before, r = masked
    old = [json.loads(x) for x in before.splitlines() if x.strip()]
    rows = _rows(d)
    assert r.samples == 4 and r.segmented == 4 and r.metadata_rewritten
    for o, row in zip(old, rows):
        assert {k: v for k, v in row.items() if k != "attn_list"} == o  # other columns kept
        phrases = [*split_base_phrases(row["base_caption"]), row["target_text"]]
        assert [p for p, _ in row["attn_list"]] == phrases
        stem = row["file_name"].rsplit(".", 1)[0]
        with Image.open(d / row["file_name"]) as im:
            size = im.size
        for k, (_, rel) in enumerate(row["attn_list"]):
            assert rel == f"masks/{stem}/{k}.png"
            with Image.open(d / rel) as m:
                assert m.size == size and m.mode == "L"
                assert set(np.unique(np.asarray(m)).tolist()) <= {0, 255}
    assert r.masks == sum(len(row["attn_list"]) for row in rows)
    ds = PortraitDataset(d, resolution=64)
    assert all(len(rec.extras["attn_list"]) == 5 for rec in ds.records)


def test_mask_equals_independent_clipseg_forward(masked):
    from spfbench.masks import tiny_segmenter

    d, _, _ = masked
    seg = tiny_segmenter(seed=0)
    row = _rows(d)[1]
    phrases = [p for p, _ in row["attn_list"]]
    with Image.open(d / row["file_name"]) as im:
        image = im.convert("RGB")
    inputs = seg.processor(text=phrases, images=[image] * len(phrases), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = seg.model(**inputs).logits.reshape(len(phrases), *inputs["pixel_values"].shape[-2:])
    prob = torch.sigmoid(logits)[:, None]
    up = F.interpolate(prob, size=(image.height, image.width), mode="bilinear", align_corners=False)[:, 0]
    expect = (up > 0.5).numpy()
    for k, (_, rel) in enumerate(row["attn_list"]):
        got = np.asarray(Image.open(d / rel)) == 255
        np.testing.assert_array_equal(got, expect[k])
    # each phrase alone gives the same mask as in the batched call (batching is padding-invariant)
    alone = seg.processor(text=[phrases[0]], images=[image], return_tensors="pt")
    with torch.no_grad():
        l0 = seg.model(**alone).logits.reshape(1, *logits.shape[-2:])
    torch.testing.assert_close(l0[0], logits[0], atol=1e-4, rtol=1e-4)


def test_rerun_is_noop(masked, cli):
    d, _, _ = masked
    snap = snapshot(d)
    code, out, err = cli("masks", "--data", d, "--preset", "tiny", "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert "0 segmented now" in out and "unchanged" in out
    assert snapshot(d) == snap


def test_resume_after_missing_mask(tmp_path):
    from spfbench.masks import generate_masks
    from spfbench.toydata import make_toy_data

    d = tmp_path / "data"
    make_toy_data(d, 2, size=64)
    generate_masks(d, "tiny", progress=False, device="cpu")
    snap = snapshot(d)
    (d / "masks/images/00001/2.png").unlink()
    r = generate_masks(d, "tiny", progress=False, device="cpu")
    assert r.segmented == 1 and not r.metadata_rewritten
    assert snapshot(d) == snap


def test_tokencompose_trains_on_generated_masks(masked, cli, tmp_path):
    d, _, _ = masked
    code, out, err = cli("train", "--method", "tokencompose", "--data", d, "--out", tmp_path / "run",
                         "--preset", "tiny", "--max-steps", "1", "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "run" / "artifact").is_dir()


def test_real_preset_without_weights_is_one_line(tmp_path, cli):
    from spfbench.masks import HUB_ID, load_segmenter
    from spfbench.toydata import make_toy_data

    with pytest.raises(MissingWeightsError, match=HUB_ID):
        load_segmenter(device="cpu")
    d = tmp_path / "data"
    make_toy_data(d, 1, size=64)
    code, out, err = cli("masks", "--data", d, "--no-progress")
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and HUB_ID in lines[0] and "download" in lines[0]
    assert not (d / "masks").exists()


def test_non_imagefolder_refused(tmp_path):
    from spfbench.masks import generate_masks

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"")
    with pytest.raises(SpfbenchError, match="convert it to an imagefolder"):
        generate_masks(tmp_path / "shards", "tiny", progress=False)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "dataset_dict.json").write_text("{}")
    with pytest.raises(SpfbenchError, match="an HF datasets folder: convert it to an imagefolder"):
        generate_masks(hf, "tiny", progress=False)
