"""Portrait World's original model (spfbench/world/components.py, train_vae.py, train_unet.py, pipeline.py,
evaluate.py, recipe.py) at micro sizes: configs, training steps, resume, the saved diffusers folder,
generation and evaluation, and its commands (spfbench world train-model / continue-model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spfbench.errors import SpfbenchError
from spfbench.world import recipe
from spfbench.world import train_unet as TU
from spfbench.world.attributes import CAPTIONED, SCHEMA, UNCAPTIONED
from spfbench.world.components import DEFAULT_OUT, FORMAT, build_components, parameter_counts, scheduler_config
from spfbench.world.evaluate import ceiling, evaluate, meets_bar, reading_report
from spfbench.world.pipeline import checkpoint_pipeline, load_world_pipeline, save_pipeline
from spfbench.world.recipe import continue_model, parse_stage, stage_text, train
from spfbench.world.renders import DETAIL_PARTS, tokenize_captions
from spfbench.world.train_unet import detail_cache, detail_weighted_mse, train_unet, training_noise
from spfbench.world.train_vae import train_vae

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO = {
    "unet": {"block_out_channels": [16, 32, 32], "norm_num_groups": 8, "attention_head_dim": 2, "cross_attention_dim": 32},
    "vae": {"block_out_channels": [16, 16, 16], "norm_num_groups": 8},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "projection_dim": 32},
}
QUIET = dict(progress=False, log=lambda *a: None, threads=1)


def test_configs_build_sd_architecture():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    comps = build_components(0)
    unet, vae, te = comps["unet"], comps["vae"], comps["text_encoder"]
    assert isinstance(unet, UNet2DConditionModel) and isinstance(vae, AutoencoderKL) and isinstance(te, CLIPTextModel)
    counts = parameter_counts(comps)
    assert 3e6 <= counts["unet"] <= 8e6
    assert unet.config.cross_attention_dim == te.config.hidden_size == 128
    assert te.config.vocab_size == 49408 and te.config.max_position_embeddings == 77
    assert any("CrossAttn" in b for b in unet.config.down_block_types)
    assert any(name.endswith("attn2") for name, _ in unet.named_modules())  # what SPF captures
    # 64 px -> 16 x 16 x 8 latents (the UNet's channels) -> 64 px
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        assert z.shape == (1, 8, 16, 16) and unet.config.sample_size == 16
        assert unet.config.in_channels == unet.config.out_channels == vae.config.latent_channels == 8
        assert vae.decode(z).sample.shape == (1, 3, 64, 64)
    sched = scheduler_config()
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"], sched["prediction_type"]) == ("scaled_linear", 0.00085, 0.012, "epsilon")


def test_tokenize_matches_pipeline():
    from spfbench.clip_tokenizer import clip_tokenizer

    caps = ["A woman, smiling, with a blue background, in a red T-shirt", ""]
    ids = tokenize_captions(caps)
    ref = clip_tokenizer()(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (2, 77) and torch.equal(ids.long(), ref)


def test_vae_steps_lower_loss_and_set_scaling_factor(tmp_path):
    vae = train_vae(tmp_path / "vae", n=16, steps=12, batch_size=16, lr=3e-3, warmup=1, log_every=1, overrides=MICRO, n_val=16, **QUIET)
    rows = [json.loads(ln) for ln in (tmp_path / "vae" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert sum(r["l1"] for r in rows[-3:]) < sum(r["l1"] for r in rows[:3])
    card = json.loads((tmp_path / "vae" / "vae_card.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(card["scaling_factor"]) and card["scaling_factor"] > 0
    assert not (tmp_path / "vae" / "checkpoint.pt").exists()


def test_vae_killed_and_rerun_equals_one_run(tmp_path):
    kw = dict(n=16, steps=4, batch_size=8, lr=3e-3, warmup=1, ckpt_every=2, log_every=1, overrides=MICRO, n_val=8, **QUIET)
    full = train_vae(tmp_path / "a", **kw)
    train_vae(tmp_path / "b", stop_at=3, **kw)  # "killed" after step 3 (checkpoints at 2 and 3)
    assert (tmp_path / "b" / "checkpoint.pt").is_file() and not (tmp_path / "b" / "vae_card.json").exists()
    with pytest.raises(SpfbenchError, match="holds a VAE checkpoint of another training.*lr"):
        train_vae(tmp_path / "b", **{**kw, "lr": 1e-3})
    resumed = train_vae(tmp_path / "b", **kw)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def numbers(path):  # everything but the timings
        rows = [json.loads(ln) for ln in path.read_text().splitlines()] if path.suffix == ".jsonl" else [json.loads(path.read_text())]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    for name in ("log.jsonl", "vae_card.json"):
        assert numbers(tmp_path / "a" / name) == numbers(tmp_path / "b" / name), name
    assert [r["step"] for r in numbers(tmp_path / "b" / "log.jsonl")] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def micro_vae(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae") / "vae"
    return train_vae(d, n=16, steps=2, batch_size=8, overrides=MICRO, n_val=8, **QUIET)


def _unet(out, vae, **kw):
    base = dict(n=16, steps=4, batch_size=8, lr=1e-3, warmup=1, ckpt_every=2, log_every=1, overrides=MICRO, **QUIET)
    return train_unet(out, vae, **{**base, **kw})


def test_unet_steps_lower_loss_on_fixed_batch(tmp_path, micro_vae):
    # a fixed batch: 8 images, batch 8, no caption dropout; the loss falls while the noise varies
    _unet(tmp_path / "u", micro_vae, n=8, steps=30, lr=3e-3, caption_dropout=0.0, ema_decay=0.0, lr_schedule="constant")
    rows = [json.loads(ln) for ln in (tmp_path / "u" / "log.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:6]) / 6, sum(r["loss"] for r in rows[-6:]) / 6
    assert last < 0.8 * first


def test_resume_matches_uninterrupted(tmp_path, micro_vae):
    full = _unet(tmp_path / "a", micro_vae)
    part = _unet(tmp_path / "b", micro_vae, stop_at=2)  # "killed" after step 2 (checkpoint at 2)
    assert part["step"] == 2 and not part["done"]
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 2
    resumed = _unet(tmp_path / "b", micro_vae)
    assert resumed["step"] == 4 and resumed["done"]
    for name in ("unet", "text_encoder"):
        a, b = full[name].state_dict(), resumed[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    logs = [[json.loads(ln)["step"] for ln in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
    assert logs[0] == logs[1] == [1, 2, 3, 4]
    with pytest.raises(Exception, match="another training"):
        _unet(tmp_path / "b", micro_vae, lr=5e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_unet_trains_on_cuda_like_cpu_and_moves_between_devices(tmp_path, micro_vae):
    # the same draws on either device: 4 steps on cuda track the cpu run's losses closely (not bit-equal:
    # other kernels); a run killed on cuda resumes on the cpu from its checkpoint and tracks the cuda run.
    # (Weights are not compared: Adam turns the kernels' last-bit gradient differences on near-zero
    # gradients into whole lr-sized steps; seen on an H100, 2026-11-27.)
    cpu = _unet(tmp_path / "cpu", micro_vae, lr_schedule="constant")
    gpu = _unet(tmp_path / "gpu", micro_vae, lr_schedule="constant", device="cuda")
    assert next(gpu["unet"].parameters()).device.type == "cpu"  # returned on the cpu

    def log(d):
        return [json.loads(ln) for ln in (tmp_path / d / "log.jsonl").read_text().splitlines()]

    assert [r["loss"] for r in log("cpu")] == pytest.approx([r["loss"] for r in log("gpu")], rel=2e-3)
    part = _unet(tmp_path / "mixed", micro_vae, lr_schedule="constant", device="cuda", stop_at=2)
    assert not part["done"]
    ck = torch.load(tmp_path / "mixed" / "checkpoint.pt", weights_only=True)  # as saved: it did train on cuda
    assert all(t.is_cuda for t in ck["unet"].values())
    mixed = _unet(tmp_path / "mixed", micro_vae, lr_schedule="constant")
    assert mixed["done"] and [r["step"] for r in log("mixed")] == [1, 2, 3, 4]
    assert [r["loss"] for r in log("mixed")] == pytest.approx([r["loss"] for r in log("gpu")], rel=2e-3)


def test_train_refuses_a_device_it_cannot_use_before_any_work(tmp_path):
    with pytest.raises(SpfbenchError, match="'gpu' is not a device torch knows.*cpu, cuda"):
        train(tmp_path / "o", tmp_path / "w", device="gpu", **QUIET)
    if not torch.cuda.is_available():
        with pytest.raises(SpfbenchError, match="no CUDA device on this machine"):
            train(tmp_path / "o", tmp_path / "w", device="cuda", **QUIET)
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_continuation_equals_one_longer_run(tmp_path, micro_vae):
    # 4 steps at a constant LR == 2 steps, then a continuation of 2 (weights, EMA, Adam moments, RNG carried)
    const = dict(lr_schedule="constant", warmup=1)
    full = _unet(tmp_path / "a", micro_vae, **const)
    _unet(tmp_path / "b", micro_vae, steps=2, **const)
    cont = _unet(tmp_path / "c", micro_vae, steps=2, init=tmp_path / "b" / "checkpoint.pt", **const)
    assert cont["done"] and not (tmp_path / "c" / "latents.pt").exists()  # the first run's cache is reused
    for name in ("unet", "text_encoder"):
        a, c = full[name].state_dict(), cont[name].state_dict()
        assert all(torch.equal(a[k], c[k]) for k in a), name
    again = _unet(tmp_path / "d", micro_vae, steps=2, init=tmp_path / "b" / "checkpoint.pt", lr=1e-2, **const)
    assert not torch.equal(next(iter(again["unet"].parameters())), next(iter(cont["unet"].parameters())))  # its own LR
    # a killed continuation resumes to the same weights; its folder cannot be resumed as a fresh run
    part = _unet(tmp_path / "e", micro_vae, steps=2, init=tmp_path / "b" / "checkpoint.pt", stop_at=1, **const)
    assert part["step"] == 1 and not part["done"]
    resumed = _unet(tmp_path / "e", micro_vae, steps=2, init=tmp_path / "b" / "checkpoint.pt", **const)
    assert all(torch.equal(a, b) for a, b in zip(resumed["unet"].state_dict().values(), cont["unet"].state_dict().values()))
    with pytest.raises(SpfbenchError, match="another training.*init"):
        _unet(tmp_path / "e", micro_vae, steps=2, **const)
    # a continuation of a continuation still finds the first run's latent cache (and equals 6 steps)
    full6 = _unet(tmp_path / "f", micro_vae, steps=6, **const)
    cont2 = _unet(tmp_path / "g", micro_vae, steps=2, init=tmp_path / "c" / "checkpoint.pt", **const)
    assert not (tmp_path / "g" / "latents.pt").exists()
    assert all(torch.equal(a, b) for a, b in zip(full6["unet"].state_dict().values(), cont2["unet"].state_dict().values()))


def test_detail_weighted_mse_weighs_face_latents_and_keeps_the_plain_scale():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    share = torch.rand(2, 1, 4, 4, generator=g)
    share[0, 0, 0, 0] = 0.0
    # no detail anywhere, or a zero weight: the plain MSE
    plain = torch.nn.functional.mse_loss(pred, target)
    assert torch.allclose(detail_weighted_mse(pred, target, torch.zeros_like(share), 10.0), plain)
    assert torch.allclose(detail_weighted_mse(pred, target, share, 0.0), plain)
    # by hand: sum over pixels and channels of w * err^2 / (channels x sum of w), w = 1 + 10 x share
    w = (1 + 10 * share.double()).numpy()[:, 0]
    err = ((pred - target).double() ** 2).numpy()
    want = (w[:, None] * err).sum() / (3 * w.sum())
    assert detail_weighted_mse(pred, target, share, 10.0).item() == pytest.approx(want, rel=1e-6)
    # the gradient of a face latent's error outweighs a background one's in proportion to their weights
    p = pred.clone().requires_grad_()
    detail_weighted_mse(p, target, share, 10.0).backward()
    i, j = (0, 0, 0, 0), (0, 0, 1, 1)
    ratio = (p.grad[i] / (p[i] - target[i])) / (p.grad[j] / (p[j] - target[j]))
    assert ratio.item() == pytest.approx(1 / (1 + 10 * share[0, 0, 1, 1].item()), rel=1e-5)


def test_detail_cache_holds_the_part_masks_shares_and_is_reused(tmp_path, monkeypatch):
    from spfbench.world.attributes import sample
    from spfbench.world.render import render_parts

    d = detail_cache(tmp_path, 6, 3, 16, lambda *a: None)
    assert d.shape == (6, 1, 16, 16) and d.dtype == torch.float16 and 0 <= d.min() and d.max() <= 1
    for i in (0, 5):  # each latent pixel: the share of its 4 x 4 pixels on a detail part, from the renderer's masks
        parts = render_parts(sample("pretrain", i, 3), 64, variant=i)[1]
        mask = np.any([parts[p] for p in DETAIL_PARTS], axis=0).astype(np.float64)
        want = mask.reshape(16, 4, 16, 4).mean(axis=(1, 3))
        assert np.allclose(d[i, 0].double().numpy(), want, atol=1e-3) and want.max() == 1 and want.min() == 0
    monkeypatch.setattr(TU, "render_batch_details", lambda *a: pytest.fail("re-rendered a cached set"))
    assert torch.equal(detail_cache(tmp_path, 6, 3, 16, lambda *a: None), d)
    with pytest.raises(pytest.fail.Exception):  # another n is another set
        detail_cache(tmp_path, 7, 3, 16, lambda *a: None)


def test_unet_detail_weight_changes_training_and_resumes(tmp_path, micro_vae):
    const = dict(lr_schedule="constant", warmup=1, ema_decay=0.0)
    plain = _unet(tmp_path / "p", micro_vae, **const)
    full = _unet(tmp_path / "d", micro_vae, detail_weight=10.0, **const)
    assert (tmp_path / "d" / "details.pt").is_file() and not (tmp_path / "p" / "details.pt").exists()
    a, b = plain["unet"].state_dict(), full["unet"].state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the weighted loss is the one trained
    assert torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)["args"]["detail_weight"] == 10.0
    assert "detail_weight" not in torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=True)["args"]  # older runs resume
    _unet(tmp_path / "k", micro_vae, detail_weight=10.0, stop_at=2, **const)
    with pytest.raises(SpfbenchError, match="another training"):
        _unet(tmp_path / "k", micro_vae, **const)  # a killed weighted run is not resumed as a plain one
    resumed = _unet(tmp_path / "k", micro_vae, detail_weight=10.0, **const)
    assert all(torch.equal(x, y) for x, y in zip(resumed["unet"].state_dict().values(), b.values()))


def test_checkpoint_pipeline_holds_the_runs_ema_weights(tmp_path, micro_vae):
    res = _unet(tmp_path / "u", micro_vae, ema_decay=0.9)  # done: train_unet returns the EMA weights
    pipe = checkpoint_pipeline(tmp_path / "u" / "checkpoint.pt", micro_vae)
    for name, mod in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        a, b = res[name].state_dict(), mod.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    raw = torch.load(tmp_path / "u" / "checkpoint.pt", weights_only=True)["unet"]
    assert any(not torch.equal(raw[k], pipe.unet.state_dict()[k]) for k in raw)  # not the raw weights


def test_continuation_refuses_an_unfinished_or_missing_run(tmp_path, micro_vae):
    _unet(tmp_path / "p", micro_vae, stop_at=2)
    with pytest.raises(SpfbenchError, match="stopped at step 2 of 4"):
        _unet(tmp_path / "c", micro_vae, init=tmp_path / "p" / "checkpoint.pt")
    with pytest.raises(SpfbenchError, match="no UNet checkpoint"):
        _unet(tmp_path / "c", micro_vae, init=tmp_path / "nowhere" / "checkpoint.pt")
    _unet(tmp_path / "q", micro_vae, steps=2)
    with pytest.raises(SpfbenchError, match="other data or architecture.*n: 16 there, 8 now"):
        _unet(tmp_path / "c", micro_vae, n=8, init=tmp_path / "q" / "checkpoint.pt")
    (tmp_path / "q" / "latents.pt").unlink()
    with pytest.raises(SpfbenchError, match="latents.pt is missing or was encoded with another VAE"):
        _unet(tmp_path / "c", micro_vae, init=tmp_path / "q" / "checkpoint.pt")
    assert not (tmp_path / "q" / "latents.pt").exists()  # nothing re-encoded into the first run's folder


def test_save_load_generate_evaluate(tmp_path, micro_vae):
    from diffusers import StableDiffusionPipeline

    from spfbench.generation import GenerationSettings, generate

    res = _unet(tmp_path / "u", micro_vae, steps=2)
    out = save_pipeline(tmp_path / "model", res["unet"], micro_vae, res["text_encoder"], {"format": FORMAT})
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / sub).is_dir()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    assert len(pipe.tokenizer) == 49408
    assert pipe.vae.config.scaling_factor == pytest.approx(micro_vae.config.scaling_factor, rel=1e-3)
    pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, ["A man, smiling, with a blue background, in a red T-shirt"], [0], GenerationSettings(steps=2))
    assert images[0].size == (64, 64)
    # the suite's `world` preset loads such a folder (--model; default: the shipped one) to the same image
    from spfbench.models import load_pipeline

    wpipe, info = load_pipeline("world", model=str(out), device="cpu", dtype="fp32")
    assert info.native_size == 64 and info.preset == "world"
    again = generate(wpipe, ["A man, smiling, with a blue background, in a red T-shirt"], [0], GenerationSettings(steps=2))
    assert again[0].tobytes() == images[0].tobytes()

    r = evaluate(load_world_pipeline(out), n=3, batch_size=3, settings=GenerationSettings(steps=2))
    for k in ("captioned_accuracy", "captioned_mean", "all_captioned", "uncaptioned_distribution", "uncaptioned_tv",
              "uncaptioned_tv_max", "spurious_target_rate", "spurious_any", "ceiling", "quality_bar", "bar", "passed", "n"):
        assert k in r
    assert r["ceiling"]["n"] == 3 and len(r["bar"]) == 11  # 5 captioned + 5 uncaptioned + spurious
    assert set(r["captioned_accuracy"]) == {"subject", "expression", "background", "clothing_color", "garment"}
    assert set(r["uncaptioned_tv"]) == {"hair_style", "hair_color", "skin_tone", "position", "pose"}
    assert set(r["spurious_target_rate"]) == {"headwear", "eyewear", "freckles", "style"}
    assert all(0 <= v <= 1 for v in r["uncaptioned_tv"].values())


def test_reading_report_counts_what_the_reader_saw():
    from spfbench.world.attributes import ABSENT, CAPTIONED, distribution, sample

    attrs = [sample("heldout", i, 3) for i in range(10)]
    got = [dict(a) for a in attrs]  # a perfect reading ...
    got[0]["subject"] = next(v for v in SCHEMA["subject"] if v != attrs[0]["subject"])  # ... but one subject
    got[1]["freckles"] = next(v for v in SCHEMA["freckles"] if v != ABSENT["freckles"])  # and one spurious target
    got[1]["eyewear"] = next(v for v in SCHEMA["eyewear"] if v != ABSENT["eyewear"])  # on the same image
    r = reading_report(got, [{c: a[c] for c in CAPTIONED} for a in attrs])
    assert r["captioned_accuracy"]["subject"] == 0.9 and r["captioned_accuracy"]["garment"] == 1.0
    assert r["all_captioned"] == 0.9
    assert r["spurious_target_rate"] == {"headwear": 0.0, "eyewear": 0.1, "freckles": 0.1, "style": 0.0}
    assert r["spurious_any"] == 0.1
    ref = distribution("pretrain")["pose"]
    freq = {v: sum(a["pose"] == v for a in attrs) / 10 for v in ref}
    assert r["uncaptioned_tv"]["pose"] == pytest.approx(0.5 * sum(abs(freq[v] - ref[v]) for v in ref), abs=1e-4)


def test_quality_bar_is_set_against_the_ceiling():
    ceil = {"captioned_accuracy": {a: 0.6 for a in CAPTIONED}, "uncaptioned_tv": {a: 0.05 for a in UNCAPTIONED}, "spurious_any": 0.02}
    e = 1e-6  # just inside each threshold (0.51 = 0.85 x 0.6; 0.15 = 0.05 + 0.10; 0.05 = 0.02 + 0.03) ...
    res = {"captioned_accuracy": {a: 0.51 + e for a in CAPTIONED}, "uncaptioned_tv": {a: 0.15 - e for a in UNCAPTIONED}, "spurious_any": 0.05 - e}
    assert all(meets_bar(res, ceil).values())
    res["captioned_accuracy"]["subject"] = 0.51 - e  # ... and just outside
    res["uncaptioned_tv"]["pose"] = 0.15 + e
    res["spurious_any"] = 0.05 + e
    assert {k for k, v in meets_bar(res, ceil).items() if not v} == {"captioned subject", "tv pose", "spurious any"}


def test_ceiling_reads_reconstructions_of_the_rows_evaluate_generates():
    from spfbench.world.attributes import sample
    from spfbench.world.datasets import world_captions

    # the ceiling's images are renders of the very rows evaluate() captions
    rows = world_captions(20, 5)
    assert [r["base_attributes"] for r in rows] == [{c: sample("heldout", i, 5)[c] for c in CAPTIONED} for i in range(20)]
    # with the shipped VAE, the coarse attributes survive reconstruction (misaligned rows would read ~1/8 right)
    r = ceiling(Path(DEFAULT_OUT) / "vae", n=20, seed=5)
    assert r["n"] == 20 and r["captioned_accuracy"]["background"] >= 0.9 and r["captioned_accuracy"]["clothing_color"] >= 0.9


def test_load_missing_folder_names_command(tmp_path):
    from spfbench.errors import SpfbenchError

    with pytest.raises(SpfbenchError, match="spfbench world train-model --out"):
        load_world_pipeline(tmp_path / "nothing")


def test_world_preset_without_shipped_weights_names_the_training_command(tmp_path):
    from spfbench.errors import MissingWeightsError
    from spfbench.models import load_pipeline

    with pytest.raises(MissingWeightsError, match="spfbench world train-model --out"):
        load_pipeline("world", model=str(tmp_path / "nothing"))


@pytest.mark.skipif(not (Path(DEFAULT_OUT) / "model_index.json").is_file(),
                    reason="the world's original model is not in this checkout (spfbench/world/weights/model)")
def test_shipped_model_loads_generates_and_keeps_its_card():
    """The shipped original model (spfbench/world/weights/model): loads through the `world` preset, and
    30 fresh generations, read back by the attribute reader, stay near what its card's evaluation
    (n = 200) recorded: captions obeyed, no target attribute appearing on its own."""
    from spfbench.models import load_pipeline
    from spfbench.world.environment import MODEL_DIR as WORLD_MODEL_DIR

    card = json.loads((WORLD_MODEL_DIR / "world_model.json").read_text())
    ev = card["evaluation"]
    pipe, info = load_pipeline("world", device="cpu", dtype="fp32")
    assert info.native_size == 64
    r = evaluate(pipe, n=30, seed=777, batch_size=15)
    assert r["n"] == 30
    # 30 images x 5 captioned attributes: binomial slack of 0.1 below the card's mean
    assert r["captioned_mean"] >= ev["captioned_mean"] - 0.1, (r["captioned_accuracy"], ev["captioned_accuracy"])
    # 30 images: three binomial standard deviations above the card's rate (0.27 -> 0.51; seen: 0.40)
    p = ev["spurious_any"]
    assert r["spurious_any"] <= max(0.1, p + 3 * (p * (1 - p) / 30) ** 0.5), (r["spurious_target_rate"], ev["spurious_target_rate"])


def test_training_noise_offset_adds_per_channel_constants():
    # the spatial mean of each (image, channel) has variance 1/(H W) for plain noise, 1/(H W) + offset^2 with
    # the offset; the offset is constant over the image, so the centred noise is the plain draw
    shape = (4096, 8, 16, 16)
    plain = training_noise(shape, torch.Generator().manual_seed(0))
    off = training_noise(shape, torch.Generator().manual_seed(0), noise_offset=0.1)
    assert torch.equal(plain, training_noise(shape, torch.Generator().manual_seed(0), noise_offset=0.0))
    assert plain.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 256, rel=0.05)
    assert off.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 256 + 0.01, rel=0.05)
    centred = lambda x: x - x.mean(dim=(2, 3), keepdim=True)  # noqa: E731
    assert torch.allclose(centred(off), centred(plain), atol=1e-5)


def test_noise_offset_is_part_of_the_runs_arguments(tmp_path, micro_vae):
    plain = _unet(tmp_path / "a", micro_vae, steps=2)
    assert "noise_offset" not in torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["args"]
    off = _unet(tmp_path / "b", micro_vae, steps=2, noise_offset=0.1)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["args"]["noise_offset"] == 0.1
    assert not torch.equal(next(iter(plain["unet"].parameters())), next(iter(off["unet"].parameters())))
    with pytest.raises(SpfbenchError, match="another training.*noise_offset"):
        _unet(tmp_path / "b", micro_vae, steps=2, noise_offset=0.2)
    cont = _unet(tmp_path / "c", micro_vae, steps=2, init=tmp_path / "a" / "checkpoint.pt", noise_offset=0.1)
    assert cont["done"]  # a plain run can be continued with offset noise


def test_train_chains_continuations_and_records_each_stage(tmp_path):
    stages = [{"steps": 2, "lr": 1e-3}, {"steps": 2, "lr": 1e-3, "noise_offset": 0.1}, {"steps": 1, "lr": 1e-3, "detail_weight": 5.0}]
    kw = dict(vae_n=16, vae_steps=2, vae_batch_size=8, unet_n=16, unet_steps=2, batch_size=8, eval_n=0, overrides=MICRO, **QUIET)
    for bad in ({"steps": 1, "lr": 1e-3, "detail_weight": -1.0}, {"steps": 1, "lr": 1e-3, "noise_offset": math.nan}):
        with pytest.raises(SpfbenchError, match="must be a finite number >= 0"):
            train(tmp_path / "model", tmp_path / "work", continuations=[bad], **kw)
    assert not (tmp_path / "work").exists()  # refused before the VAE stage
    card = train(tmp_path / "model", tmp_path / "work", continuations=stages, **kw)
    got = card["training"]["unet"]["stages"]
    assert [(s["steps"], s["noise_offset"], s.get("detail_weight")) for s in got] == [(2, 0.0, None), (2, 0.0, None), (2, 0.1, None), (1, 0.0, 5.0)]
    assert card["training"]["unet"]["steps"] == 7 and got[-1]["continues"] == "unet-3: weights, EMA, optimizer and RNG"
    last = torch.load(tmp_path / "work" / "unet-3" / "checkpoint.pt", weights_only=True)
    assert last["args"]["noise_offset"] == 0.1 and last["args"]["init"] == {"path": str(tmp_path / "work" / "unet-2" / "checkpoint.pt"), "steps_before": 4}
    detail = torch.load(tmp_path / "work" / "unet-4" / "checkpoint.pt", weights_only=True)["args"]
    assert detail["detail_weight"] == 5.0 and "noise_offset" not in detail and (tmp_path / "work" / "unet-4" / "details.pt").is_file()
    rows = [json.loads(ln) for ln in (tmp_path / "work" / "unet-4" / "log.jsonl").read_text().splitlines()]
    assert all("mse" in r and r["mse"] != r["loss"] for r in rows)  # weighted loss trained, plain MSE beside it
    assert all("mse" not in json.loads(ln) for ln in (tmp_path / "work" / "unet-3" / "log.jsonl").read_text().splitlines())
    assert load_world_pipeline(tmp_path / "model").unet is not None


def test_cli_continuation_stages_parse_or_say_what_to_give():
    assert parse_stage("6000:3e-4") == {"steps": 6000, "lr": 3e-4}
    assert parse_stage("2000:1e-4:offset=0.1:vzero") == {"steps": 2000, "lr": 1e-4, "noise_offset": 0.1, "vzero": True}
    assert parse_stage("1500:2e-4:vzero:detail=10") == {"steps": 1500, "lr": 2e-4, "vzero": True, "detail_weight": 10.0}
    for bad in ("6000", "6000:x", "0:1e-4", "10:1e-4:offset=-1", "1:2:3", "1:2:vzero:vzero", "1:2:offset=x", "1:nan", "1:1e-4:offset=inf",
                "1:1e-4:detail=-1", "1:1e-4:detail=x", "1:1e-4:detail=1:detail=2"):
        with pytest.raises(SpfbenchError, match="--unet-more .*(STEPS:LR|positive)"):
            parse_stage(bad)
    for text in ("2000:0.0001:offset=0.1", "2000:0.0001:vzero", "6000:0.0003", "1500:0.0002:vzero:detail=10"):
        assert stage_text(parse_stage(text)) == text


def test_vzero_trains_for_velocity_at_zero_terminal_snr_and_samples_with_it(tmp_path, micro_vae):
    from diffusers import DDPMScheduler

    from spfbench.generation import GenerationSettings, generate, make_scheduler

    cfg = scheduler_config(vzero=True)
    sched = DDPMScheduler.from_config(cfg)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-8)  # x_T carries nothing of x_0
    assert scheduler_config()["prediction_type"] == "epsilon"
    _unet(tmp_path / "a", micro_vae, steps=2)
    cont = _unet(tmp_path / "v", micro_vae, steps=2, init=tmp_path / "a" / "checkpoint.pt", vzero=True)
    assert cont["done"]
    pipe = checkpoint_pipeline(tmp_path / "v" / "checkpoint.pt", micro_vae)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    ims = generate(pipe, ["A man, smiling, with a red background, in a blue shirt"], [0], GenerationSettings(sampler="ddim", steps=2))
    assert np.isfinite(np.asarray(ims[0], dtype=float)).all()
    with pytest.raises(SpfbenchError, match="zero terminal SNR.*choose one of: dpmpp-2m, ddim, euler"):
        make_scheduler(pipe.scheduler.config, "pndm")
    with pytest.raises(SpfbenchError, match="zero terminal SNR, which dpmpp-2m-karras .*Karras sigmas.* choose one of: dpmpp-2m, ddim"):
        make_scheduler(pipe.scheduler.config, "dpmpp-2m-karras")
    # the loss target: v = sqrt(a) eps - sqrt(1 - a) x0, and at the last timestep x_t is pure noise, v = -x0
    x0, eps, t = torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4), torch.tensor([0, 500, 999])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(sched.get_velocity(x0, eps, t), a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-6)
    assert torch.allclose(sched.get_velocity(x0, eps, t)[2], -x0[2], atol=1e-6)
    assert make_scheduler(pipe.scheduler.config, "dpmpp-2m").config.rescale_betas_zero_snr
    r = evaluate(pipe, n=2, batch_size=2)  # its default sampler is one that works for it
    assert r["settings"]["sampler"] == "dpmpp-2m" and r["n"] == 2
    # so is a test set's, when the command names none: recorded, and the images are dpmpp-2m's
    from spfbench.models import ModelInfo
    from spfbench.testset import TestsetBuilder, load_testset

    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    built = TestsetBuilder(tmp_path / "ts", preset="world", n=2, settings=GenerationSettings(steps=2), device="cpu").run(
        progress=False, pipeline=(pipe, ModelInfo(preset="world", source="test", native_size=native)))
    assert built.complete and built.meta["generation"]["sampler"] == "dpmpp-2m"
    _, triples = load_testset(tmp_path / "ts")
    want = generate(pipe, [triples[0].base_caption], [triples[0].seed], GenerationSettings(sampler="dpmpp-2m", steps=2), output_type="np")
    got = np.asarray(Image.open(tmp_path / "ts" / triples[0].original), dtype=float) / 255
    assert np.abs(got - want[0]).max() <= 1 / 255 + 1e-6
    # the loss target differs from an epsilon run's: same data, same RNG, other weights
    eps = _unet(tmp_path / "e", micro_vae, steps=2, init=tmp_path / "a" / "checkpoint.pt")
    assert not torch.equal(next(iter(eps["unet"].parameters())), next(iter(cont["unet"].parameters())))


def test_switching_to_vzero_restarts_ema_and_adam_but_keeps_the_weights(tmp_path, micro_vae):
    _unet(tmp_path / "a", micro_vae, steps=2, ema_decay=0.999)
    first = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    v = _unet(tmp_path / "v", micro_vae, steps=1, init=tmp_path / "a" / "checkpoint.pt", vzero=True, ema_decay=0.999, warmup=0)
    ck = torch.load(tmp_path / "v" / "checkpoint.pt", weights_only=True)
    assert ck["args"]["init"]["objective_changed"] is True
    # Adam restarted: one step of fresh moments (bias corrected) counts 1, not 3
    assert all(s["step"] == 1 for s in ck["opt"]["state"].values())
    # EMA restarted from the loaded raw weights: after one update at warm-up decay 1/10 it is 0.1 x loaded + 0.9 x new
    raw0, raw1 = first["unet"], ck["unet"]
    names = list(raw0)
    k = next(i for i, n in enumerate(names) if not torch.equal(raw0[n], raw1[n]))
    expect = raw0[names[k]].lerp(raw1[names[k]], 0.9)
    assert torch.allclose(ck["ema"][k], expect, atol=1e-6)
    assert torch.equal(v["unet"].state_dict()[names[k]], ck["ema"][k])
    # a later stage with the same loss counts its EMA's age from the switch, not from the first run
    w = _unet(tmp_path / "w", micro_vae, steps=1, init=tmp_path / "v" / "checkpoint.pt", vzero=True, ema_decay=0.999)
    assert w["done"]
    init = torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=True)["args"]["init"]
    assert init["steps_before"] == 3 and init["ema_steps_before"] == 1


def test_continue_a_saved_model_folder_weights_only(tmp_path, cli):
    # a micro model trained like the shipped one: epsilon, then a v-prediction (zero terminal SNR) stage
    train(tmp_path / "model", tmp_path / "work", vae_n=16, vae_steps=2, vae_batch_size=8, unet_n=16, unet_steps=2,
          batch_size=8, eval_n=0, continuations=[{"steps": 1, "lr": 1e-3, "vzero": True}], overrides=MICRO, **QUIET)
    kw = dict(batch_size=8, n=16, eval_n=0, overrides=MICRO, **QUIET)

    def weights(d):
        pipe = load_world_pipeline(tmp_path / d)
        return {f"{k}.{n}": t for k, m in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder), ("vae", pipe.vae))
                for n, t in m.state_dict().items()}

    # lr 0: the continuation saves the very weights it started from; the card gains the stage
    card = continue_model(tmp_path / "model", tmp_path / "same", tmp_path / "w0", steps=2, lr=0.0, **kw)
    a, b = weights("model"), weights("same")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stages = card["training"]["unet"]["stages"]
    assert len(stages) == 3 and stages[-1]["continues"].startswith(f"{tmp_path / 'model'}: weights only")
    assert card["training"]["unet"]["steps"] == 5 and stages[-1]["vzero"] is True  # the model's own objective
    assert load_world_pipeline(tmp_path / "same").scheduler.config.prediction_type == "v_prediction"
    ck = torch.load(tmp_path / "w0" / "unet-continue" / "checkpoint.pt", weights_only=True)
    assert ck["args"]["init"] == {"model": str((tmp_path / "model").resolve()), "steps_before": 3, "objective_changed": True}
    assert ck["args"]["vzero"] is True
    cache = torch.load(tmp_path / "w0" / "unet-continue" / "latents.pt", weights_only=True)  # encoded with the folder's VAE
    vae = load_world_pipeline(tmp_path / "model").vae.float()
    assert cache["key"]["vae_sum"] == float(sum(p.detach().double().sum() for p in vae.parameters()))  # = vae_checksum(vae)
    # lr > 0: it trains; killed and rerun, it resumes to the uninterrupted run's weights
    continue_model(tmp_path / "model", tmp_path / "more", tmp_path / "w1", steps=2, lr=1e-2, **kw)
    c = weights("more")
    assert not all(torch.equal(a[k], c[k]) for k in a if k.startswith("unet."))
    assert all(torch.equal(a[k], c[k]) for k in a if k.startswith("vae."))
    run = dict(n=16, steps=2, batch_size=8, lr=1e-2, warmup=100, ckpt_every=1, overrides=MICRO, init=tmp_path / "model", vzero=True, **QUIET)
    full = train_unet(tmp_path / "w5", tmp_path / "model" / "vae", **run)
    assert not train_unet(tmp_path / "w6", tmp_path / "model" / "vae", stop_at=1, **run)["done"]
    resumed = train_unet(tmp_path / "w6", tmp_path / "model" / "vae", **run)
    assert all(torch.equal(x, y) for x, y in zip(full["unet"].state_dict().values(), resumed["unet"].state_dict().values()))
    # errors: not a model folder; the folder itself as --out; a folder of another architecture (before any encoding)
    with pytest.raises(SpfbenchError, match="no world model folder"):
        continue_model(tmp_path / "work", tmp_path / "x", tmp_path / "w2", steps=2, **kw)
    with pytest.raises(SpfbenchError, match="--out is the folder being continued"):
        continue_model(tmp_path / "model", tmp_path / "model", tmp_path / "w2", steps=2, **kw)
    with pytest.raises(SpfbenchError, match="does not hold this architecture's weights"):
        continue_model(tmp_path / "model", tmp_path / "x", tmp_path / "w3", steps=2, **{**kw, "overrides": None})
    assert not (tmp_path / "x").exists() and not (tmp_path / "w3" / "unet-continue" / "latents.pt").exists()
    for args, msg in [(["--model", tmp_path / "work"], "no world model folder"), (["--device", "gpu"], "'gpu' is not a device")]:
        code, _, err = cli("world", "continue-model", "--out", tmp_path / "x", "--work", tmp_path / "w4", "--steps", "1", *args)
        assert code == 2 and msg in err.splitlines()[-1], err
    for bad in (-1.0, math.inf):
        with pytest.raises(SpfbenchError, match="detail_weight must be a finite number >= 0"):
            continue_model(tmp_path / "model", tmp_path / "x", tmp_path / "w7", steps=1, detail_weight=bad, **kw)
    assert not (tmp_path / "w7" / "unet-continue").exists()
    for flag in ("--detail-weight", "--noise-offset"):
        code, _, err = cli("world", "continue-model", "--out", tmp_path / "x", "--work", tmp_path / "w4", "--steps", "1", flag, "-2")
        assert code == 2 and err.splitlines() == [f"error: {flag} must be a finite number >= 0, got -2"], err
    assert not (tmp_path / "x").exists() and not (tmp_path / "w4").exists()


def test_cli_continue_passes_the_detail_weight_to_the_card(tmp_path, monkeypatch, cli):
    train(tmp_path / "model", tmp_path / "work", vae_n=16, vae_steps=2, vae_batch_size=8, unet_n=16, unet_steps=1,
          batch_size=8, eval_n=0, continuations=[], overrides=MICRO, **QUIET)
    card = continue_model(tmp_path / "model", tmp_path / "d", tmp_path / "wd", steps=1, batch_size=8, n=16, eval_n=0, overrides=MICRO,
                          detail_weight=4.0, **QUIET)
    assert card["training"]["unet"]["stages"][-1]["detail_weight"] == 4.0
    assert torch.load(tmp_path / "wd" / "unet-continue" / "checkpoint.pt", weights_only=True)["args"]["detail_weight"] == 4.0
    seen = {}
    monkeypatch.setattr(recipe, "continue_model", lambda *a, **k: seen.update(k))
    # the CLI's flag reaches it (the micro architecture cannot be given on the command line)
    code, _, err = cli("world", "continue-model", "--model", tmp_path / "model", "--out", tmp_path / "c", "--work", tmp_path / "wc",
                       "--steps", "1", "--detail-weight", "2.5")
    assert code == 0, err
    assert seen["detail_weight"] == 2.5
    assert seen["command"] == (f"spfbench world continue-model --model {tmp_path / 'model'} --out {tmp_path / 'c'} --work {tmp_path / 'wc'}"
                               " --steps 1 --detail-weight 2.5")
