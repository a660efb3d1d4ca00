"""The world original model's frozen text encoder (spfbench/world/text_encoder.py): the world CLIP's text
tower as a CLIPTextModel, the target-separability measure, and UNet training against a frozen encoder."""

from __future__ import annotations

import json

import pytest
import torch

from spfbench.clip_tokenizer import clip_tokenizer
from spfbench.errors import SpfbenchError
from spfbench.world import recipe
from spfbench.world import text_encoder as T
from spfbench.world.components import CARD
from spfbench.world.pipeline import checkpoint_pipeline, load_world_pipeline
from spfbench.world.recipe import continue_model, train
from spfbench.world.renders import tokenize_captions
from spfbench.world.train_unet import caption_states, latent_cache, train_unet
from spfbench.world.train_vae import train_vae
from spfbench.world.attributes import TARGET_TEXTS

from test_world_model import MICRO, QUIET

pytestmark = pytest.mark.usefixtures("one_thread")


def _micro_clip(seed=0, width=32):
    import open_clip

    torch.manual_seed(seed)
    clip = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "layers": 1, "width": 16, "patch_size": 16, "head_width": 8},
                          text_cfg={"context_length": 77, "vocab_size": 49408, "width": width, "heads": 2, "layers": 2})
    with torch.no_grad():  # open_clip initialises biases and norms to constants: make every tensor count
        for p in clip.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return clip.eval()


def test_conversion_reproduces_open_clip_hidden_states_and_pooling():
    clip = _micro_clip()
    te = T.from_world_clip(clip)
    assert not any(p.requires_grad for p in te.parameters())
    tok = clip_tokenizer()
    texts = ["A woman, smiling, with a blue background, in a red T-shirt, a hat", "An old man, at the beach, freckles", ""]
    ids = tok(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        x = clip.token_embedding(ids) + clip.positional_embedding
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        out = te(ids)
    # every position, padding included (the UNet attends to all 77)
    assert torch.allclose(out.last_hidden_state, x, atol=1e-5), (out.last_hidden_state - x).abs().max()
    eot = (ids == tok.eos_token_id).int().argmax(1)  # open_clip pools the (first) end token
    assert torch.allclose(out.pooler_output, x[torch.arange(3), eot], atol=1e-5)
    with torch.no_grad():  # and its projection is open_clip's text feature
        assert torch.allclose(out.pooler_output @ clip.text_projection, clip.encode_text(ids), atol=1e-5)


def test_target_span_is_the_target_tokens_and_the_end_token():
    tok = clip_tokenizer()
    base = "A girl, laughing, in a forest, in a yellow turtleneck"
    for target in TARGET_TEXTS:
        ids, a, b = T.target_span(tok, base, target)
        assert tok.decode(ids[a:b]).strip() == target
        assert ids[b] == tok.eos_token_id and b == len(ids) - 1
    # a caption the 77 positions would cut: refused, not measured on a truncated target
    long_base = "An old man, smiling, " + "with a blue background, " * 12 + "in a red T-shirt"
    assert len(tok(long_base).input_ids) < 77 < len(tok(long_base + ", pencil drawing style").input_ids)
    with pytest.raises(SpfbenchError, match="more than the encoder's 77"):
        T.target_span(tok, long_base, "pencil drawing style")


class _Lookup(torch.nn.Module):
    """A hand-made 'encoder': each token's hidden state is a fixed vector of its id (no context)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, ids):
        return (self.table[ids],)


def test_separability_counts_nearest_centroid_hits_and_fails_a_blind_encoder():
    tok = clip_tokenizer()
    bases = ["A man, smiling, with a blue background, in a red T-shirt", "A woman, laughing, at the beach, in a black hoodie",
             "A boy, looking surprised, in a forest, in a green shirt"]
    g = torch.Generator().manual_seed(0)
    distinct = T.target_separability(_Lookup(torch.randn(49408, 16, generator=g)), tok, bases)
    # context-free features: a target's feature is the same after every base caption -> always named right
    assert distinct["accuracy"] == 1.0 and distinct["passed"] and all(v == 1.0 for v in distinct["per_target"].values())
    assert distinct["cosine"]["a scarf | a dog"] < 0.99
    # an encoder blind to the words (one vector for every token): every target gets the first centroid
    blind = T.target_separability(_Lookup(torch.ones(49408, 16)), tok, bases)
    assert blind["accuracy"] == pytest.approx(1 / len(TARGET_TEXTS)) and not blind["passed"]
    assert blind["min_target_cosine"] == pytest.approx(1.0, abs=1e-4)
    # leave-one-out needs at least two base captions
    with pytest.raises(SpfbenchError, match="at least 2 base captions"):
        T.target_separability(_Lookup(torch.ones(49408, 16)), tok, bases[:1])


def test_separability_is_leave_one_base_caption_out(monkeypatch):
    # "a hat" after base i is e_i, "glasses" always (e_0 + e_1 + e_2 + e_3) / 2. Centroids that included the
    # held-out base would name the hat right (cos 0.577 vs 0.5); leave-one-out centroids (e_j + e_k) never do (0 vs 0.5)
    eye = torch.eye(4)
    feats = {f"base {i}": torch.stack([eye[i], eye.sum(0) / 2]) for i in range(3)}
    monkeypatch.setattr(T, "target_features", lambda te, tok, base, texts: feats[base])
    res = T.target_separability(None, None, list(feats), targets=["a hat", "glasses"], unused=())
    assert res["per_target"] == {"a hat": 0.0, "glasses": 1.0} and res["accuracy"] == 0.5
    assert res["cosine"]["a hat | glasses"] == pytest.approx(0.5)


def test_unet_trains_against_a_frozen_encoder_and_refuses_another(tmp_path):
    vae = train_vae(tmp_path / "vae", n=16, steps=2, batch_size=8, overrides=MICRO, n_val=8, **QUIET)
    te = T.from_world_clip(_micro_clip(0))
    before = {k: v.clone() for k, v in te.state_dict().items()}
    run = dict(n=16, steps=3, batch_size=8, lr=1e-2, warmup=1, ckpt_every=1, log_every=1, overrides=MICRO, **QUIET)
    res = train_unet(tmp_path / "u", vae, text_encoder=te, **run)
    assert all(torch.equal(before[k], v) for k, v in te.state_dict().items())  # the caller's encoder untouched
    assert all(torch.equal(before[k], v) for k, v in res["text_encoder"].state_dict().items())  # and the run's: frozen
    ck = torch.load(tmp_path / "u" / "checkpoint.pt", weights_only=True)
    assert ck["args"]["text_encoder"]["frozen"] and ck["args"]["text_encoder"]["hidden_size"] == 32
    assert len(ck["ema"]) == len(list(res["unet"].parameters()))  # the EMA holds the UNet only
    # the cached caption states are what the encoder gives per step
    latents, ids = latent_cache(tmp_path / "u", vae, 16, 0, print, reuse_only=True)
    empty = tokenize_captions([""])[0]
    states, row = caption_states(te, ids, empty)
    with torch.no_grad():
        assert torch.allclose(states[row], te(ids.long())[0], atol=1e-5)
        assert torch.allclose(states[-1], te(empty.view(1, -1).long())[0][0], atol=1e-5)
    # killed and rerun: the uninterrupted run's weights
    assert not train_unet(tmp_path / "k", vae, text_encoder=te, stop_at=1, **run)["done"]
    resumed = train_unet(tmp_path / "k", vae, text_encoder=te, **run)
    assert all(torch.equal(a, b) for a, b in zip(res["unet"].state_dict().values(), resumed["unet"].state_dict().values()))
    # the checkpoint evaluates with its own (frozen) encoder and the UNet's EMA weights
    pipe = checkpoint_pipeline(tmp_path / "u" / "checkpoint.pt", vae)
    assert all(torch.equal(before[k], v) for k, v in pipe.text_encoder.state_dict().items())
    assert all(torch.equal(p, e) for p, e in zip(pipe.unet.parameters(), ck["ema"]))
    assert any(not torch.equal(p, ck["unet"][n]) for n, p in pipe.unet.named_parameters())  # EMA, not the raw weights
    # a continuation of the frozen run: with the same encoder it trains on; without it, one clear error
    more = train_unet(tmp_path / "u2", vae, text_encoder=te, init=tmp_path / "u" / "checkpoint.pt", **{**run, "steps": 1})
    assert more["done"] and all(torch.equal(before[k], v) for k, v in more["text_encoder"].state_dict().items())
    with pytest.raises(SpfbenchError, match="other data or architecture.*text_encoder"):
        train_unet(tmp_path / "u3", vae, init=tmp_path / "u" / "checkpoint.pt", **{**run, "steps": 1})
    # another encoder (or none) on the same folder: refused
    with pytest.raises(SpfbenchError, match="another training"):
        train_unet(tmp_path / "u", vae, text_encoder=T.from_world_clip(_micro_clip(1)), **run)
    with pytest.raises(SpfbenchError, match="another training"):
        train_unet(tmp_path / "u", vae, **run)


def test_continue_replaces_the_folders_encoder_by_the_frozen_one(tmp_path, monkeypatch):
    train(tmp_path / "model", tmp_path / "work", vae_n=16, vae_steps=2, vae_batch_size=8, unet_n=16, unet_steps=1,
          batch_size=8, eval_n=0, continuations=[], overrides=MICRO, **QUIET)
    te = T.from_world_clip(_micro_clip(2))
    monkeypatch.setattr(recipe, "world_clip_text_encoder", lambda source: te)
    card = continue_model(tmp_path / "model", tmp_path / "v3", tmp_path / "w", steps=2, lr=1e-2, batch_size=8, n=16, eval_n=0,
                          overrides=MICRO, text_encoder="world-clip", **QUIET)
    saved = load_world_pipeline(tmp_path / "v3")
    want = te.state_dict()
    assert all(torch.allclose(v.float(), want[k].half().float()) for k, v in saved.text_encoder.state_dict().items())
    stage = card["training"]["unet"]["stages"][-1]
    assert stage["text_encoder"] == {"source": "world-clip", "frozen": True} and "frozen text tower" in stage["continues"]
    sep = json.loads((tmp_path / "v3" / CARD).read_text())["text_encoder_separability"]
    assert set(sep["per_target"]) == set(TARGET_TEXTS) and 0 <= sep["accuracy"] <= 1
    assert card["parameters"]["text_encoder"] == sum(p.numel() for p in te.parameters())
    # the saved folder continued without --text-encoder keeps its own encoder, frozen
    card2 = continue_model(tmp_path / "v3", tmp_path / "v3b", tmp_path / "wb", steps=1, lr=1e-2, batch_size=8, n=16, eval_n=0,
                           overrides=MICRO, **QUIET)
    again = load_world_pipeline(tmp_path / "v3b").text_encoder.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in saved.text_encoder.state_dict().items())
    assert card2["training"]["unet"]["stages"][-1]["text_encoder"] == {"source": "the folder's own", "frozen": True}
    # a missing world CLIP file: one clear error before any work
    monkeypatch.undo()
    with pytest.raises(SpfbenchError, match="do not exist"):
        continue_model(tmp_path / "model", tmp_path / "x", tmp_path / "w2", steps=1, overrides=MICRO, text_encoder=tmp_path / "no.safetensors", **QUIET)
    assert not (tmp_path / "w2").exists()


def test_shipped_model_text_encoder_tells_the_targets_apart():
    """The shipped original model's frozen text encoder passes the separability bar, as its card records,
    and is the shipped world CLIP's text tower (the model's UNet trained against it)."""
    from spfbench.world.environment import MODEL_DIR as WORLD_MODEL_DIR

    pipe = load_world_pipeline(WORLD_MODEL_DIR)
    got = T.target_separability(pipe.text_encoder, pipe.tokenizer)
    card = json.loads((WORLD_MODEL_DIR / CARD).read_text())["text_encoder_separability"]
    assert got["accuracy"] >= T.SEPARABILITY_BAR and got["passed"], got["per_target"]
    assert got["accuracy"] == card["accuracy"] and got["per_target"] == card["per_target"]
    assert got["max_target_cosine"] == pytest.approx(card["max_target_cosine"], abs=2e-3)
    tower = T.from_world_clip()
    ids = pipe.tokenizer(["A man, smiling, at the beach, in a blue hoodie, freckles"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():  # fp16 storage of both: equal to fp16 rounding
        assert torch.allclose(pipe.text_encoder(ids)[0], tower(ids)[0], atol=2e-2)
