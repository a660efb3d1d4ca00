import numpy as np
import pytest
import torch
from PIL import Image

from spfbench.errors import SpfbenchError
from spfbench.metrics import REGISTRY, Backbones, Batch, create, metric_class
from spfbench.metrics.clip import tiny_clip


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture
def batch():
    return Batch(["t0", "t1", "t2"], _images(3, 0), _images(3, 1), ["a hat", "freckles", "pencil drawing style"])


def _reference_embeddings(images, texts=None):
    # Independent computation on the same weights: open_clip's own forward and preprocessing.
    model, preprocess, tokenizer = tiny_clip(seed=0)
    model.eval()
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in images]))
        img = img / img.norm(dim=-1, keepdim=True)
        if texts is None:
            return img
        txt = model.encode_text(tokenizer(texts))
        return img, txt / txt.norm(dim=-1, keepdim=True)


def test_clip_i_is_the_cosine_of_normalised_image_embeddings(batch):
    m = create("clip-i@vit-l-14", Backbones("tiny", "cpu"))
    m.update(batch)
    a, b = _reference_embeddings(batch.originals), _reference_embeddings(batch.customized)
    expected = (a * b).sum(-1)
    got = torch.tensor([m.values[i] for i in batch.ids])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    r = m.compute()
    assert r["n"] == 3 and r["failures"] == 0 and r["value"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert r["column"] == "CLIP-I" and r["higher_is_better"] is True


def test_clip_t_uses_the_target_text(batch):
    m = create("clip-t@vit-l-14", Backbones("tiny", "cpu"))
    m.update(batch)
    img, txt = _reference_embeddings(batch.customized, batch.target_texts)
    torch.testing.assert_close(torch.tensor([m.values[i] for i in batch.ids]), (img * txt).sum(-1), rtol=0, atol=1e-5)


def test_identical_images_give_clip_i_of_one(batch):
    m = create("clip-i@vit-l-14", Backbones("tiny", "cpu"))
    m.update(Batch(batch.ids, batch.originals, batch.originals, batch.target_texts))
    assert m.compute()["value"] == pytest.approx(1.0, abs=1e-6)


def test_shards_merge_to_one_pass_and_share_one_backbone(batch):
    bb = Backbones("tiny", "cpu")
    whole, first, second = (create("clip-i@vit-l-14", bb) for _ in range(3))
    whole.update(batch)
    first.update(Batch(batch.ids[:2], batch.originals[:2], batch.customized[:2], batch.target_texts[:2]))
    second.update(Batch(batch.ids[1:], batch.originals[1:], batch.customized[1:], batch.target_texts[1:]))
    first.merge(second.state())  # t1 is in both shards: counted once
    assert first.compute() == whole.compute()
    create("clip-t@vit-l-14", bb).update(batch)
    assert list(bb._cache) == ["clip-vit-l-14"]  # CLIP-I and CLIP-T: one model, loaded once


def test_ids_carry_backbone_and_real_loading_forces_quickgelu(monkeypatch):
    assert {metric_class(i).id for i in REGISTRY} == set(REGISTRY)
    import open_clip

    model, _, _ = tiny_clip()
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    seen = {}

    def fake(name, **kwargs):
        seen.update(name=name, **kwargs)
        m, p, _ = tiny_clip()
        return m, None, p

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake)
    Backbones("real", "cpu").get("clip-vit-l-14")
    assert seen == {"name": "ViT-L-14", "pretrained": "openai", "force_quick_gelu": True}


def test_unknown_metric():
    with pytest.raises(SpfbenchError, match="unknown metric 'clip-x'"):
        metric_class("clip-x")
