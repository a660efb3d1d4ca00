import json
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spfbench.errors import MissingWeightsError, SpfbenchError
from spfbench.metrics import Backbones, Batch, create
from spfbench.metrics import mps
from spfbench.metrics.mps_model import CrossModel, condition_mask

KEYS_JSON = Path(__file__).parent / "data" / "mps_checkpoint_keys.json"
PROMPTS = ["a portrait of a woman with red hair", "a man with a beard, pencil drawing style", "a child smiling, freckles"]


def _images(n, seed, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def batch():
    return Batch(["t0", "t1", "t2"], _images(3, 0), _images(3, 1), ["red hair", "pencil drawing style", "freckles"], PROMPTS)


@pytest.fixture(scope="module")
def tiny_backbones():
    return Backbones("tiny", "cpu")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv(mps.ENV_CHECKPOINT, raising=False)
    monkeypatch.delenv(mps.ENV_ALLOW_PICKLE, raising=False)
    monkeypatch.setenv("SPFBENCH_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- published layout


def test_full_model_state_dict_equals_the_published_keys_and_shapes():
    published = json.loads(KEYS_JSON.read_text())
    model = mps.build_model(full=True, device="meta")  # ~1.1 B parameters, no memory
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) == set(published["keys"]), (set(ours) ^ set(published["keys"]))
    assert ours == published["keys"]
    assert len(ours) == published["n_keys"] == 962
    assert set(published["optional"]) == set(mps.NON_PERSISTENT)
    # the config details that change features silently when wrong
    cfg = model.model.config
    assert cfg.text_config.hidden_act == cfg.vision_config.hidden_act == "gelu"
    assert model.model.text_model.eos_token_id == 2


def _tiny_state(seed):
    return {k: v.clone() for k, v in mps.tiny_mps(seed).state_dict().items()}


def test_strict_load_of_a_tiny_state_dict(tmp_path):
    from safetensors.torch import save_file

    state = _tiny_state(seed=3)
    # as older transformers wrote them: persistent position_ids, dropped on load
    state["model.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["model.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    model = mps.load_mps(path, full=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(model.model.text_model.embeddings.position_ids, torch.arange(77)[None])

    broken = dict(state)
    del broken["cross_model.layers.1.0.fn.to_kv.weight"]
    broken["cross_model.layers.1.0.fn.extra"] = torch.zeros(1)
    broken["model.text_projection.weight"] = torch.zeros(3, 3)
    save_file(broken, str(path))
    with pytest.raises(SpfbenchError) as e:
        mps.load_mps(path, full=False)
    msg = str(e.value)
    assert "missing keys 1 (e.g. cross_model.layers.1.0.fn.to_kv.weight)" in msg
    assert "unexpected keys 1" in msg and "shape mismatches 1 (e.g. model.text_projection.weight)" in msg


# --------------------------------------------------------------------------- the score, computed independently


def _by_hand_pixels(image, size):
    """CLIP preprocessing written out: shortest side -> size (PIL bicubic), centre crop, /255, OpenAI mean/std."""
    w, h = image.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    im = image.convert("RGB").resize((nw, nh), Image.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    return torch.from_numpy(((x - mean) / std).astype(np.float32)).permute(2, 0, 1)


def _reference_cross(sd, prefix, x, ctx, keep, heads, dim_head):
    """The published Cross_model written out with plain tensor ops on the state dict."""

    def ln(t, w, b):
        return F.layer_norm(t, t.shape[-1:], w, b)

    def swiglu(t):
        a, g = t.chunk(2, dim=-1)
        return a * F.silu(g)

    n_layers = len({k.split(".")[2] for k in sd if k.startswith(prefix)})
    for i in range(n_layers):
        c = f"{prefix}{i}.0.fn."
        h = ln(x, sd[c + "norm.weight"], sd[c + "norm.bias"])
        q = torch.einsum("bnd,ed->bne", h, sd[c + "to_q.weight"]).unflatten(-1, (heads, dim_head)) * dim_head**-0.5
        k, v = (ctx @ sd[c + "to_kv.weight"].T).split(dim_head, dim=-1)
        s = torch.einsum("bnhd,bmd->bhnm", q, k).masked_fill(~keep[:, None, None, :], float("-inf"))
        o = torch.einsum("bhnm,bmd->bnhd", s.softmax(-1), v).flatten(2) @ sd[c + "to_out.weight"].T
        x = x + o + swiglu(h @ sd[c + "ff.0.weight"].T) @ sd[c + "ff.2.weight"].T
        p = f"{prefix}{i}.1.fn."
        h = ln(x, sd[p + "norm.weight"], sd[p + "norm.bias"])
        inner = heads * dim_head
        q, k, v, ff = (h @ sd[p + "fused_attn_ff_proj.weight"].T).split([inner, dim_head, dim_head, h.shape[-1] * 8], -1)
        n = x.shape[1]
        ang = torch.arange(n, dtype=torch.float32)[:, None] * sd[p + "rotary_emb.inv_freq"][None]
        ang = torch.cat([ang, ang], -1)

        def rot(t):
            a, b = t[..., : dim_head // 2], t[..., dim_head // 2 :]
            return t * ang.cos() + torch.cat([-b, a], -1) * ang.sin()

        q = rot(q.unflatten(-1, (heads, dim_head)).transpose(1, 2)) * dim_head**-0.5
        k = rot(k)
        a = torch.einsum("bhnd,bmd->bhnm", q, k).softmax(-1)
        o = torch.einsum("bhnm,bmd->bnhd", a, v).flatten(2) @ sd[p + "attn_out.weight"].T
        x = x + o + swiglu(ff) @ sd[p + "ff_out.1.weight"].T
    return x


def _reference_scores(scorer, images, prompts, threshold=0.3):  # the documented choice
    model = scorer.model
    clip, sd = model.model, model.state_dict()
    size = clip.config.vision_config.image_size
    tok = scorer.tokenizer
    ids = tok(prompts, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
    cond = tok([mps.CONDITION], max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (len(prompts), 77) and (ids[:, 0] == 49406).all()
    with torch.no_grad():
        t_hidden = clip.text_model(input_ids=ids).last_hidden_state
        c_hidden = clip.text_model(input_ids=cond).last_hidden_state
        eos_pos = (ids == 49407).int().argmax(-1)  # first <|endoftext|>
        eos = t_hidden[torch.arange(len(prompts)), eos_pos] @ sd["model.text_projection.weight"].T
        T = t_hidden @ sd["model.text_projection.weight"].T
        C = c_hidden @ sd["model.text_projection.weight"].T
        px = torch.stack([_by_hand_pixels(im, size) for im in images])
        I = clip.vision_model(pixel_values=px).last_hidden_state @ sd["model.visual_projection.weight"].T
        out = []
        for b in range(len(prompts)):  # one prompt at a time, as the official inference
            s = (T[b] @ C[0].T).max(dim=1).values
            keep = (s / s.max()) > threshold
            fused = _reference_cross(sd, "cross_model.layers.", I[b : b + 1], T[b : b + 1], keep[None],
                                     model.cross_config["heads"], model.cross_config["dim_head"])[0, 0]
            cos = (eos[b] @ fused) / (eos[b].norm() * fused.norm())
            out.append(float(sd["model.logit_scale"].exp() * cos))
    return torch.tensor(out), px


def test_score_equals_an_independent_computation(batch, tiny_backbones):
    m = create("mps@overall", tiny_backbones)
    m.update(batch)
    scorer = tiny_backbones.get("mps-overall")
    expected, px = _reference_scores(scorer, batch.customized, batch.prompts)
    got = torch.tensor([m.values[i] for i in batch.ids])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert len(set(got.tolist())) == 3
    # preprocessing: the library's CLIP image processor equals the by-hand transform
    torch.testing.assert_close(scorer.pixels(batch.customized), px, rtol=0, atol=1e-5)
    r = m.compute()
    assert r == {"id": "mps@overall", "column": "MPS", "higher_is_better": True,
                 "value": pytest.approx(float(expected.mean()), abs=1e-4), "n": 3, "failures": 0}


def test_batched_scores_equal_one_at_a_time(batch, tiny_backbones):
    scorer = tiny_backbones.get("mps-overall")
    together = scorer.score(batch.customized, batch.prompts)
    alone = torch.cat([scorer.score([im], [p]) for im, p in zip(batch.customized, batch.prompts)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_the_metric_scores_the_customized_image_against_the_prompt(batch, tiny_backbones):
    scorer = tiny_backbones.get("mps-overall")
    m = create("mps@overall", tiny_backbones)
    m.update(batch)
    torch.testing.assert_close(torch.tensor([m.values[i] for i in batch.ids]), scorer.score(batch.customized, PROMPTS))
    assert not torch.allclose(scorer.score(batch.originals, PROMPTS), scorer.score(batch.customized, PROMPTS))
    assert not torch.allclose(scorer.score(batch.customized, batch.target_texts), scorer.score(batch.customized, PROMPTS))


def test_missing_prompts(batch, tiny_backbones):
    m = create("mps@overall", tiny_backbones)
    with pytest.raises(SpfbenchError, match="no prompts"):
        m.update(Batch(batch.ids, batch.originals, batch.customized, batch.target_texts))
    m.update(Batch(batch.ids, batch.originals, batch.customized, batch.target_texts, [PROMPTS[0], "  ", PROMPTS[2]]))
    r = m.compute()
    assert (r["n"], r["failures"]) == (2, 1) and m.reasons == {"t1": "no prompt"}


# --------------------------------------------------------------------------- condition mask


def test_condition_threshold_masks_tokens_at_or_below_it():
    # condition token (1, 0): each prompt token's best similarity is its first coordinate (all positive here)
    text = torch.tensor([[[10.0, 1.0], [3.1, -2.0], [2.9, 5.0], [0.5, 0.0]]])
    cond = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    mask = condition_mask(text, cond, 0.3)
    assert mask.tolist() == [[0.0, 0.0, float("-inf"), float("-inf")]]  # normalised 1, .31, .29, .05
    assert condition_mask(text, cond, 0.01).tolist() == [[0.0, 0.0, 0.0, 0.0]]
    # normalised per prompt: a second prompt in the batch does not change the first one's mask
    two = condition_mask(torch.cat([text, 100 * text]), cond, 0.3)
    assert two[0].tolist() == mask[0].tolist() == two[1].tolist()


def test_masked_prompt_tokens_do_not_reach_the_image_tokens():
    torch.manual_seed(0)
    cross = CrossModel(dim=32, layer_num=2, heads=2, dim_head=16).eval()
    img, txt = torch.randn(1, 5, 32), torch.randn(1, 6, 32)
    mask = torch.zeros(1, 1, 6)
    mask[..., 2] = float("-inf")
    with torch.no_grad():
        base = cross(img, txt, mask)
        changed_masked = txt.clone()
        changed_masked[:, 2] += 5.0
        changed_kept = txt.clone()
        changed_kept[:, 3] += 5.0
        torch.testing.assert_close(cross(img, changed_masked, mask), base, rtol=0, atol=1e-6)
        assert not torch.allclose(cross(img, changed_kept, mask), base)


def test_tiny_preset_masks_some_prompt_tokens(tiny_backbones):
    scorer = tiny_backbones.get("mps-overall")
    with torch.no_grad():
        text, _ = scorer.model.text_features(scorer.tokenize(PROMPTS))
    mask = condition_mask(text, scorer.condition_tokens(), mps.THRESHOLD)
    assert (mask == 0).any() and torch.isinf(mask).any()  # the threshold matters in the tests too


# --------------------------------------------------------------------------- the official pickle


def _official_like_pickle(path: Path, state_seed: int, monkeypatch) -> torch.nn.Module:
    """torch.save of a whole module whose class lives in the authors' (absent) ``trainer`` package."""
    trainer = types.ModuleType("trainer")
    models = types.ModuleType("trainer.models")
    clip_model = types.ModuleType("trainer.models.clip_model")

    class CLIPModel(torch.nn.Module):
        pass

    CLIPModel.__module__, CLIPModel.__qualname__ = "trainer.models.clip_model", "CLIPModel"
    clip_model.CLIPModel = CLIPModel
    for name, mod in [("trainer", trainer), ("trainer.models", models), ("trainer.models.clip_model", clip_model)]:
        monkeypatch.setitem(sys.modules, name, mod)
    src = mps.tiny_mps(state_seed)
    wrapper = CLIPModel()
    wrapper.model, wrapper.cross_model = src.model, src.cross_model
    # transformers < 4.31 kept position_ids in the state dict
    wrapper.model.text_model.embeddings._non_persistent_buffers_set.discard("position_ids")
    torch.save(wrapper, path)
    for name in ("trainer.models.clip_model", "trainer.models", "trainer"):
        monkeypatch.delitem(sys.modules, name)
    return src


def test_convert_mps_round_trip_and_pickle_opt_in(tmp_path, monkeypatch, batch):
    pth = tmp_path / "MPS_overall_checkpoint.pth"
    src = _official_like_pickle(pth, 5, monkeypatch)
    with pytest.raises(ModuleNotFoundError):  # a plain unpickle needs the authors' package
        torch.load(pth, weights_only=False)

    # refused without the opt-in, with a one-line way out
    with pytest.raises(SpfbenchError) as e:
        mps.read_state_dict(pth)
    assert "refusing to unpickle" in str(e.value) and "convert-mps" in str(e.value) and "\n" not in str(e.value)
    bb = Backbones("real", "cpu", weights={"mps": str(pth)})
    with pytest.raises(SpfbenchError, match="refusing to unpickle"):
        bb.get("mps-overall")

    # opt-in: the tensors come out equal, position_ids included (dropped later)
    monkeypatch.setenv(mps.ENV_ALLOW_PICKLE, "1")
    raw = mps.read_state_dict(pth)
    assert "model.text_model.embeddings.position_ids" in raw
    for k, v in src.state_dict().items():
        assert torch.equal(raw[k], v), k
    monkeypatch.delenv(mps.ENV_ALLOW_PICKLE)

    # conversion (the opt-in is implied); the full-size check is patched down to the tiny config
    real_build = mps.build_model
    monkeypatch.setattr(mps, "build_model", lambda full=True, device="cpu": real_build(False, device))
    out = mps.convert_mps(pth, tmp_path / "out" / "mps.safetensors")
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["source_file"] == pth.name and "Kwai-Kolors/MPS" in meta["source"] and len(meta["source_sha256"]) == 64
    assert "model.text_model.embeddings.position_ids" in src.state_dict()  # as an old transformers saves it
    assert keys == set(src.state_dict()) - set(mps.NON_PERSISTENT)  # dropped in the conversion

    # the real loading path, from the converted file, scores like the source model
    bb = Backbones("real", "cpu", weights={"mps": str(out)})
    got = bb.get("mps-overall").score(batch.customized, PROMPTS)
    expected = mps.MpsScorer(src, "cpu", torch.float32).score(batch.customized, PROMPTS)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_unpickling_runs_no_code_from_the_file(tmp_path, monkeypatch):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, path)
    with pytest.raises(SpfbenchError, match="neither the pickled MPS module nor a state dict"):
        mps.read_state_dict(path, allow_pickle=True)
    assert not marker.exists()


def test_full_config_rejects_a_tiny_checkpoint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file(_tiny_state(1), str(path))
    with pytest.raises(SpfbenchError, match="does not match the MPS model: .*shape mismatches"):
        Backbones("real", "cpu", weights={"mps": str(path)}).get("mps-overall")


def test_missing_weights_is_one_line(monkeypatch, tmp_path):
    with pytest.raises(MissingWeightsError) as e:
        Backbones("real", "cpu").get("mps-overall")
    msg = str(e.value)
    assert "\n" not in msg and mps.MPS_URL in msg and str(mps.default_checkpoint()) in msg and "convert-mps" in msg
    monkeypatch.setenv(mps.ENV_CHECKPOINT, str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(MissingWeightsError, match="nowhere.safetensors"):
        Backbones("real", "cpu").get("mps-overall")
    row = mps.weight_rows()[0]
    assert set(row) == {"group", "name", "what", "source", "size", "present", "path"}
    assert row["name"] == "mps" and row["present"] is False and row["path"].endswith("nowhere.safetensors")


def test_convert_mps_command(tmp_path, monkeypatch, cli):
    pth = tmp_path / "MPS_overall_checkpoint.pth"
    src = _official_like_pickle(pth, 7, monkeypatch)
    real_build = mps.build_model
    monkeypatch.setattr(mps, "build_model", lambda full=True, device="cpu": real_build(False, device))
    out = tmp_path / "MPS_overall_checkpoint.safetensors"
    code, stdout, err = cli("weights", "convert-mps", pth, out)
    assert code == 0, err
    assert str(out) in stdout
    from safetensors.torch import load_file

    converted = load_file(out)
    for k, v in src.state_dict().items():
        if k not in mps.NON_PERSISTENT:
            assert torch.equal(converted[k], v), k
    code, _, err = cli("weights", "convert-mps", pth, tmp_path / "x.pt")
    assert code == 2 and "must end in .safetensors" in err
    code, _, err = cli("weights", "convert-mps", tmp_path / "absent.pth", out)
    assert code == 2 and "does not exist" in err
    (tmp_path / "junk.pth").write_bytes(b"junk")
    code, _, err = cli("weights", "convert-mps", tmp_path / "junk.pth", tmp_path / "j.safetensors")
    assert code == 2 and not (tmp_path / "j.safetensors").exists()
