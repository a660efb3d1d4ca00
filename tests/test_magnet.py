"""Magnet: the embedding edit against a direct computation, the caption parser, the fallback record, and
training / loading / generating through the CLI (tiny preset, toy data, CPU)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import trainers
from spfbench.errors import SpfbenchError
from spfbench.generation import GenerationSettings, generate
from spfbench.models import load_pipeline
from trainers.magnet import Magnet, MagnetConfig, magnet_embeddings, parse_pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models, shared cores

BANK = ("man", "woman", "girl", "hair", "hat", "car", "dog", "background", "shirt", "eyes")


def _raw(pipe, text):
    """Plain encoder output of one text, straight from the tokenizer and text encoder."""
    tok = pipe.tokenizer
    ids = tok(text, max_length=tok.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0][0].float()


def _n_ids(pipe, text):
    return len(pipe.tokenizer(text).input_ids)  # SOT + words + EOT


def _emb(pipe, text):
    return _raw(pipe, text)[_n_ids(pipe, text) - 2]  # last word before EOT


def test_magnet_moves_only_the_object_tokens_by_alpha_vplus_minus_beta_vminus(tiny_pipe):
    pipe = tiny_pipe
    caption = "A young woman, with a red background, blonde hair"
    cfg = MagnetConfig(top_k=3, lam=0.6)
    cond, uncond, records = magnet_embeddings(pipe, [caption], cfg, negative_prompt="", bank=BANK)

    plain, plain_uncond = _raw(pipe, caption), _raw(pipe, "")
    assert torch.equal(uncond[0].float(), plain_uncond)  # unconditional untouched, bit for bit

    ids = pipe.tokenizer(caption).input_ids
    pairs = [("woman", "young"), ("background", "red"), ("hair", "blonde")]
    positions = [ids.index(pipe.tokenizer(o, add_special_tokens=False).input_ids[-1]) for o, _ in pairs]
    bank_emb = torch.stack([_emb(pipe, w) for w in BANK])
    expected = plain.clone()
    for (obj, attr), pos in zip(pairs, positions):
        subj = _emb(pipe, obj)
        nb = F.cosine_similarity(bank_emb, subj[None], dim=-1).topk(3).indices.tolist()
        concept = _raw(pipe, f"{attr} {obj}")
        w = F.cosine_similarity(concept[_n_ids(pipe, f"{attr} {obj}") - 1], concept[76], dim=0).item()
        alpha, beta = math.exp(0.6 - w), 1 - w * w

        def v(a):
            return torch.stack([_emb(pipe, f"{a} {BANK[k]}") - bank_emb[k] for k in nb]).mean(0)

        expected[pos] = plain[pos] + alpha * v(attr) - beta * sum(v(a) for o, a in pairs if o != obj)
    moved = [i for i in range(77) if not torch.equal(cond[0, i].float(), plain[i])]
    assert moved == positions  # SOT, other words, EOT and padding bit-identical
    torch.testing.assert_close(cond[0].float(), expected, rtol=1e-5, atol=1e-5)
    assert [(p["object"], p["attribute"], p["token"]) for p in records[0]["pairs"]] == [(o, a, t) for (o, a), t in zip(pairs, positions)]
    assert records[0]["fallback"] is None


def test_parser_on_our_caption_shapes():
    got = lambda c: [(p.object, p.attribute) for p in parse_pairs(c)]  # noqa: E731
    assert got("A woman, playing a guitar, with a red background, in a white T-shirt, a hat") == [
        ("woman", ""), ("background", "red"), ("T-shirt", "white"), ("hat", "")]
    assert got("A middle-aged man, reading a book, with a grey background, in a blue polo shirt, a long grey beard") == [
        ("man", "middle-aged"), ("background", "grey"), ("shirt", "blue polo"), ("beard", "long grey")]
    assert got("An old woman, dancing, with a green background, in a black dress, elderly, with wrinkles and grey hair") == [
        ("woman", "old"), ("background", "green"), ("dress", "black"), ("wrinkles", ""), ("hair", "grey")]
    c = "A young man, sitting on a bench, blonde hair"
    (p0, p1) = parse_pairs(c)
    assert c[p0.start:p0.end] == "man" and c[p1.start:p1.end] == "hair" and p1.attribute == "blonde"
    assert got("pencil drawing style, smiling") == []


def test_caption_without_pairs_falls_back_to_plain_embeddings_and_is_recorded(tiny_pipe):
    caps = ["smiling, pencil drawing style", "A young woman, blonde hair"]
    cond, _, records = magnet_embeddings(tiny_pipe, caps, MagnetConfig(), bank=BANK)
    assert torch.equal(cond[0].float(), _raw(tiny_pipe, caps[0]))
    assert records[0]["fallback"] and records[0]["pairs"] == []
    assert records[1]["fallback"] is None and len(records[1]["pairs"]) == 2


def test_cli_trains_magnet_and_its_artifact_generates_edited_images(tmp_path, cli):
    from spfbench.toydata import make_toy_data

    make_toy_data(tmp_path / "d", 4, seed=0, size=64)
    code, out, err = cli("train", "--method", "magnet", "--data", tmp_path / "d", "--out", tmp_path / "o", "--preset", "tiny",
                         "--max-steps", 2, "--device", "cpu", "--no-progress")
    assert code == 0, err
    fresh, _ = load_pipeline("tiny", device="cpu")
    art = trainers.load_artifact(tmp_path / "o" / "artifact", fresh)
    assert art.method is Magnet and art.config.base == "naive" and art.config.top_k == 5
    assert not [k for k in vars(fresh) if "magnet" in k.lower()]  # nothing of Magnet's on the pipeline
    settings = GenerationSettings(steps=2)
    triples = [SimpleNamespace(target_caption="A young woman, with a red background, in a white T-shirt, blonde hair", seed=3),
               SimpleNamespace(target_caption="smiling", seed=4)]
    edited, notes = art.generate(triples, settings)
    assert [r["fallback"] is None for r in notes] == [True, False]
    assert not hasattr(Magnet, "last_records")  # the notes come back with the images, no class-level state
    plain = generate(fresh, [t.target_caption for t in triples], [3, 4], settings)
    a, b = (np.asarray(x[0], dtype=np.int16) for x in (edited, plain))
    assert np.abs(a - b).max() > 0  # the edit changes the image
    assert np.array_equal(np.asarray(edited[1]), np.asarray(plain[1]))  # the fallback caption does not


def test_original_base_trains_nothing_and_keeps_the_base_unet(tmp_path):
    with pytest.raises(SpfbenchError, match="trains nothing"):
        Magnet(MagnetConfig(base="original")).setup(None)
    folder = Magnet.write_original_artifact(tmp_path / "a")
    pipe, _ = load_pipeline("tiny", device="cpu")
    before = pipe.unet
    assert trainers.load_artifact(folder, pipe).method is Magnet and pipe.unet is before
    with pytest.raises(SpfbenchError):
        MagnetConfig(base="other").validate()
