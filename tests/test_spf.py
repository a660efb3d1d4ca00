"""SPF-Portrait's stage-2 trainer and its ablations (tiny preset, toy data, CPU)."""

import json

import pytest
import torch

import trainers
from spfbench.data import PortraitDataset, collate
from spfbench.generation import GenerationSettings, generate
from spfbench.models import load_pipeline
from trainers.base import Models, diffusion_loss, encode_batch, encode_text
from trainers.loop import Trainer, training_scheduler
from trainers.spf import REFERENCE

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models, shared cores

M_HAT = {"m_hat_mean", "m_hat_q10", "m_hat_q50", "m_hat_q90", "m_hat_q99"}  # spf_diagnostics.map_summary of M-hat
ABLATIONS = {"spf-no-text": {"loss_text"}, "spf-no-fine": {"loss_fine"}, "spf-no-enh": {"loss_enhanced"}, "spf-no-sfcm": M_HAT}
ALL_PARTS = {"loss_diffusion", "loss_enhanced", "loss_text", "loss_fine", "loss_total"} | M_HAT


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from spfbench.toydata import make_toy_data

    out = tmp_path_factory.mktemp("toy") / "data"
    make_toy_data(out, 4, seed=0, size=64)
    return out


@pytest.fixture(scope="module")
def batch(toy):
    ds = PortraitDataset(toy, resolution=64)
    return collate([ds[0], ds[1]])


def fresh_models():
    pipe, _ = load_pipeline("tiny", device="cpu", dtype=torch.float32)
    return Models(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, training_scheduler(pipe))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_reference_path_reproduces_the_original_model(batch):
    original = fresh_models().unet
    for name in ("spf", "spf-no-sfcm"):  # explicit probabilities (SFCM) / SDPA-only capture
        models = fresh_models()
        method = trainers.create(name)
        method.setup(models)
        ref = models.extra[REFERENCE]
        assert not ref.training and not any(p.requires_grad for p in ref.parameters())
        latents, _ = encode_batch(models, batch, gen())
        emb = encode_text(models, batch["base_caption"])
        t = torch.tensor([10, 700])
        x = models.noise_scheduler.add_noise(latents, torch.randn(latents.shape, generator=gen(1)), t)
        with torch.no_grad():
            want = original(x, t, emb).sample
            got = ref(x, t, emb).sample
        assert len(method.ref_store) > 0  # the capture ran on the reference path
        if name == "spf-no-sfcm":  # q / k capture only: SDPA as AttnProcessor2_0, bit-identical
            assert torch.equal(got, want)
        else:  # explicit probabilities for the SFCM: equal to fp32 rounding (docs/attention.md)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_stage2_steps_train_only_the_response_attn2_and_leave_the_reference_untouched(batch):
    original = {k: v.clone() for k, v in fresh_models().unet.state_dict().items()}
    models = fresh_models()
    method = trainers.create("spf", {"learning_rate": 1e-3})
    params = method.setup(models)
    assert params and all(p.requires_grad for p in params)
    trained = {n for n, p in models.unet.named_parameters() if p.requires_grad}
    assert trained and all(".attn2." in n for n in trained)
    assert {n for n in trained} == {n for n, _ in models.unet.named_parameters() if ".attn2." in n}
    opt = torch.optim.AdamW(params, lr=1e-3)
    for step in range(2):
        loss, numbers = method.loss(models, batch, gen(step))
        loss.backward()
        assert all(p.grad is not None for p in params)
        opt.step()
        opt.zero_grad()
    after = models.unet.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, original[k])}
    assert changed and all(".attn2." in k for k in changed)
    ref = models.extra[REFERENCE].state_dict()
    assert all(torch.equal(ref[k], original[k]) for k in original)
    assert set(method.trainable_state(models)) == {k for k in after if ".attn2." in k}


def test_zero_lambdas_give_the_response_path_diffusion_loss(batch):
    models = fresh_models()
    method = trainers.create("spf", {"lambda1": 0, "lambda2": 0, "lambda3": 0})
    method.setup(models)
    loss, numbers = method.loss(models, batch, gen(3))
    assert {"loss_enhanced", "loss_text", "loss_fine"} <= set(numbers)  # still computed and logged
    g = gen(3)
    latents, text = encode_batch(models, batch, g)
    want = diffusion_loss(models, latents, text, g)
    assert torch.equal(loss.detach(), want.detach())


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_each_ablation_switches_off_exactly_its_part(batch, name):
    models = fresh_models()
    method = trainers.create(name)
    method.setup(models)
    loss, numbers = method.loss(models, batch, gen(0))
    assert torch.isfinite(loss)
    assert set(numbers) == ALL_PARTS - ABLATIONS[name]
    if name == "spf-no-text":
        assert not method.res_store.save_key and not method.ref_store.save_key
    if name == "spf-no-sfcm":
        assert not method.ref_store.save_probs  # no explicit attention without the map


def test_spf_full_loss_has_every_part(batch):
    models = fresh_models()
    method = trainers.create("spf")
    method.setup(models)
    loss, numbers = method.loss(models, batch, gen(0))
    assert set(numbers) == ALL_PARTS
    assert numbers["loss_text"] > 0 and numbers["loss_fine"] > 0 and 0 <= numbers["loss_enhanced"] <= 2
    total = numbers["loss_diffusion"] + 0.6 * numbers["loss_enhanced"] + 0.2 * numbers["loss_text"] + 0.1 * numbers["loss_fine"]
    assert loss.item() == pytest.approx(total, rel=1e-5)
    assert len(method._gamma) == 2  # gamma computed once per caption pair, cached


def test_two_stage_run_gives_an_artifact_that_loads_and_generates(toy, tmp_path):
    from safetensors.torch import load_file

    naive = trainers.create("naive", {"max_train_steps": 2, "train_batch_size": 2, "learning_rate": 1e-3})
    s1 = Trainer(naive, toy, tmp_path / "stage1", preset="tiny", device="cpu").run(progress=False)
    spf = trainers.create("spf", {"max_train_steps": 2, "train_batch_size": 2, "learning_rate": 1e-3,
                                  "stage1_artifact": str(s1.artifact)})
    r = Trainer(spf, toy, tmp_path / "stage2", preset="tiny", device="cpu").run(progress=False)
    assert r.steps == 2
    meta = json.loads((r.artifact / "method.json").read_text())
    assert meta["method"] == "spf" and meta["config"]["stage1_artifact"] == str(s1.artifact)
    log = [json.loads(line) for line in (tmp_path / "stage2" / "log.jsonl").read_text().splitlines()]
    assert {"loss_diffusion", "loss_text", "loss_fine", "loss_enhanced", "m_hat_mean"} <= set(log[-1])

    from trainers.spf import ATTN2_FILE

    # the artifact holds what stage 2 trained (attn2) and points to stage 1 for the rest
    stage1 = load_file(s1.artifact / "unet/diffusion_pytorch_model.safetensors")
    attn2 = load_file(r.artifact / ATTN2_FILE)
    assert attn2 and all(".attn2." in k for k in attn2) and not (r.artifact / "unet").exists()
    assert any(not torch.equal(v, stage1[k]) for k, v in attn2.items())  # stage 2 moved cross-attention
    size = lambda d: sum(p.stat().st_size for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert size(r.artifact) < size(s1.artifact) / 3

    pipe, _ = load_pipeline("tiny", device="cpu")
    assert trainers.load_artifact(r.artifact, pipe).name == "spf"
    assert all(torch.equal(v, attn2[k] if k in attn2 else stage1[k]) for k, v in pipe.unet.state_dict().items())
    images = generate(pipe, ["A woman, smiling, wearing a hat"], [0], GenerationSettings(steps=2))
    assert len(images) == 1 and images[0].size == (64, 64)
    # the stage-1 artifact gone: one line saying so
    import shutil

    from spfbench.errors import SpfbenchError

    shutil.move(str(s1.artifact), str(tmp_path / "elsewhere"))
    with pytest.raises(SpfbenchError, match="stage1_artifact .*no unet"):
        trainers.load_artifact(r.artifact, load_pipeline("tiny", device="cpu")[0])


def test_cli_trains_spf(cli, toy, tmp_path):
    code, out, err = cli("train", "--method", "spf", "--data", toy, "--out", tmp_path / "o", "--preset", "tiny",
                         "--max-steps", "2", "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "o" / "artifact" / "response_attn2.safetensors").is_file()  # on the base model: no stage 1
    # the documented two-stage procedure: a naive run, then stage 2 from its artifact via --config
    code, out, err = cli("train", "--method", "naive", "--data", toy, "--out", tmp_path / "s1", "--preset", "tiny",
                         "--max-steps", "1", "--device", "cpu", "--no-progress")
    assert code == 0, err
    (tmp_path / "spf.json").write_text(json.dumps({"stage1_artifact": str(tmp_path / "s1" / "artifact")}))
    code, out, err = cli("train", "--method", "spf-no-sfcm", "--data", toy, "--out", tmp_path / "s2", "--preset", "tiny",
                         "--max-steps", "1", "--device", "cpu", "--no-progress", "--config", tmp_path / "spf.json")
    assert code == 0, err
    meta = json.loads((tmp_path / "s2" / "artifact" / "method.json").read_text())
    assert meta["method"] == "spf-no-sfcm" and meta["config"]["stage1_artifact"].endswith("artifact")
    code, out, err = cli("methods")
    assert code == 0 and all(n in out for n in ("spf", *ABLATIONS))


def test_config_is_validated(tmp_path):
    from spfbench.errors import SpfbenchError

    with pytest.raises(SpfbenchError, match="stage1_artifact"):
        trainers.create("spf", {"stage1_artifact": str(tmp_path)})
    with pytest.raises(SpfbenchError, match="lambda2"):
        trainers.create("spf", {"lambda2": -1})
    with pytest.raises(SpfbenchError, match="unknown option"):
        trainers.create("spf-no-sfcm", {"nope": 1})
    assert trainers.create("spf-no-sfcm").config.use_sfcm is False


def test_checkpointed_enhancement_gives_the_same_loss_and_gradients(batch, monkeypatch):
    import torch.utils.checkpoint as ckpt

    calls = []
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda fn, *a, **k: (calls.append(fn.__name__), real(fn, *a, **k))[1])
    grads = []
    for checkpointed in (False, True):
        models = fresh_models()
        method = trainers.create("spf", {"checkpoint_enhanced": checkpointed})
        params = method.setup(models)
        loss, numbers = method.loss(models, batch, gen(5))
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in params]))
    (l0, g0), (l1, g1) = grads
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g0, g1))
    assert any(a.abs().sum() > 0 for a in g0)
    assert calls == ["embed_prediction"]  # the decode + CLIP pass ran under checkpointing only when asked


def test_auto_clip_is_the_world_clip_for_the_world_preset(tiny_pipe):
    """clip_preset auto: Portrait World's own CLIP when the base model is the world preset (SFCM's gamma and
    L_enhanced then use the CLIP the world's CLIP-T uses), the small random CLIP for the tiny UNet."""
    from spfbench.world.clip import load_world_clip

    p = tiny_pipe
    world = Models(p.unet, p.vae, p.text_encoder, p.tokenizer, training_scheduler(p), preset="world")
    clip = trainers.create("spf").clip(world)
    ref, _, _ = load_world_clip()
    name, param = next(iter(ref.state_dict().items()))
    assert torch.equal(clip.model.state_dict()[name].float(), param.float())
    tiny = Models(p.unet, p.vae, p.text_encoder, p.tokenizer, training_scheduler(p), preset="tiny")
    assert trainers.create("spf").clip(tiny).model.visual.image_size != ref.visual.image_size  # 32 px random CLIP


def test_clip_weights_train_in_another_clip_than_the_metrics(tiny_pipe, tmp_path):
    """clip_weights: gamma and L_enhanced use that file's CLIP (a world CLIP of another seed here), not the
    metrics' one; the encoding cache's key tells the two apart; a missing file is refused at config time."""
    from spfbench.errors import SpfbenchError
    from spfbench.metrics.base import Backbones
    from spfbench.world.clip import load_world_clip, save_world_clip, world_clip_model

    other = save_world_clip(world_clip_model(seed=1), tmp_path / "clip-seed1.safetensors")
    p = tiny_pipe
    world = Models(p.unet, p.vae, p.text_encoder, p.tokenizer, training_scheduler(p), preset="world")
    shipped, mine = trainers.create("spf"), trainers.create("spf", {"clip_weights": str(other)})
    want = load_world_clip(other)[0].state_dict()
    got = mine.clip(world).model.state_dict()
    assert all(torch.equal(got[k].float(), want[k].float()) for k in want)
    assert not torch.equal(shipped.clip(world).model.visual.conv1.weight, mine.clip(world).model.visual.conv1.weight)
    # the metrics' CLIP is still the shipped one: CLIP-T is scored in another space than SPF trained in
    metric_clip = Backbones("world", device="cpu").get("clip-vit-l-14").model
    assert torch.equal(metric_clip.visual.conv1.weight, shipped.clip(world).model.visual.conv1.weight)
    caption, target = "A woman, with a red background, in a white T-shirt", "a hat"
    assert not torch.allclose(shipped.gamma(world, caption, target), mine.gamma(world, caption, target))
    assert json.loads(shipped.encoding_extras(world).key)["clip"] != json.loads(mine.encoding_extras(world).key)["clip"]
    with pytest.raises(SpfbenchError, match="clip_weights .*no such file"):
        trainers.create("spf", {"clip_weights": str(tmp_path / "missing.safetensors")})


def test_tiny_clip_weights_load_a_state_dict(tmp_path):
    """--weights clip-KEY=FILE under the tiny preset loads that tiny CLIP (strictly); the real preset passes
    the file to open_clip as its checkpoint (not run here: no weights)."""
    from safetensors.torch import save_file
    from spfbench.metrics.base import Backbones
    from spfbench.metrics.clip import tiny_clip

    model = tiny_clip(seed=3)[0]
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    name = Backbones("tiny", device="cpu").weight_name("clip-vit-l-14")
    got = Backbones("tiny", device="cpu", weights={name: str(path)}).get("clip-vit-l-14")
    assert torch.equal(got.model.visual.conv1.weight, model.visual.conv1.weight)
    default = Backbones("tiny", device="cpu").get("clip-vit-l-14")
    assert not torch.equal(default.model.visual.conv1.weight, model.visual.conv1.weight)
    assert Backbones("world", device="cpu").weight_name("clip-vit-b-32") == "clip-world"
    assert Backbones("real", device="cpu").weight_name("clip-vit-b-32") == "clip-vit-b-32"


def test_each_readings_alignment_scale_relative_to_l_diff(batch):
    """The readings of eq. 3/4's norm (docs/spf.md, "Readings"): per-element MSE averaged over layers (the
    default) against the paper's ||.||^2 summed over layers. Same draws, same drifted response path: L_diff is
    the same, and the literal fine loss is the default's times between L * E_min and L * E_max, E_j the
    per-sample element count of layer j's Q (so on SD1.5 at 512 px, E up to 8 x 4096 x 40, the literal
    alignment outweighs L_diff by orders of magnitude, while the default stays a small fraction of it)."""
    from trainers.attention import AttentionStore, install_capture

    def drifted():
        models = fresh_models()
        with torch.no_grad():
            g = torch.Generator().manual_seed(5)
            for p in models.unet.parameters():
                p.add_(0.05 * p.std().nan_to_num(0) * torch.randn(p.shape, generator=g))
        return models

    numbers = {}
    for reading in ({"norm": "mse", "layer_reduction": "mean"}, {"norm": "l2sq", "layer_reduction": "sum"},
                    {"norm": "l2", "layer_reduction": "sum"}):
        models = drifted()  # before setup: the reference path is a copy of these weights
        method = trainers.create("spf", {"use_sfcm": False, "diagnostics_every": 0, **reading})
        method.setup(models)
        with torch.no_grad():  # make the response path differ from the reference: perturb its attn2 only
            g = torch.Generator().manual_seed(6)
            for n, p in models.unet.named_parameters():
                if ".attn2." in n:
                    p.add_(0.2 * p.std().nan_to_num(0) * torch.randn(p.shape, generator=g))
        _, numbers[reading["norm"]] = method.loss(models, batch, gen(0))
    mse, l2sq, l2 = numbers["mse"], numbers["l2sq"], numbers["l2"]
    assert mse["loss_diffusion"] == l2sq["loss_diffusion"] == l2["loss_diffusion"]
    store = AttentionStore(query=True, probs=False)
    models = fresh_models()
    install_capture(models.unet, store)
    latents, text = encode_batch(models, batch, gen(0))
    with torch.no_grad():
        models.unet(latents, torch.tensor([10, 10]), text)
    sizes = [store[n].query[0].numel() for n in store.names()]
    n_layers = len(sizes)
    ratio = l2sq["loss_fine"] / mse["loss_fine"]
    assert n_layers * min(sizes) * 0.999 <= ratio <= n_layers * max(sizes) * 1.001, (ratio, sizes)
    assert l2["loss_fine"] ** 2 <= l2sq["loss_fine"] * n_layers * 1.001  # Cauchy-Schwarz over layers (batch of 2: Jensen)
    # scale against L_diff (lambda3 = 0.1): the default alignment is a small fraction, the literal one is not
    assert 0.1 * mse["loss_fine"] < 0.05 * mse["loss_diffusion"]
    assert 0.1 * l2sq["loss_fine"] > 100 * 0.1 * mse["loss_fine"]


def test_sfcm_normalize_none_subtracts_raw_attention_from_raw_noise_difference(batch):
    """``sfcm_normalize="none"`` (the default; eq. 5-7 as written): M is the raw channel-mean |eps_ref - eps_res|
    and each A_base[i] the raw layer-mean probability, so M-hat = clamp(M_raw - sum (1 - gamma) A_raw, 0, 1);
    under min-max both are rescaled per map, and with four phrases of max 1 the exclusion covers M."""
    import torch.nn.functional as F

    from trainers import spf_losses as L

    models = fresh_models()
    method = trainers.create("spf", {"diagnostics_every": 0})
    assert method.config.sfcm_normalize == "none"
    method.setup(models)
    g = torch.Generator().manual_seed(3)
    eps_ref = torch.randn(2, 4, 8, 8, generator=g)
    eps_res = eps_ref + 0.3 * torch.randn(2, 4, 8, 8, generator=g)
    probs = [torch.softmax(torch.randn(2, 2, 64, 77, generator=g), -1), torch.softmax(torch.randn(2, 2, 16, 77, generator=g), -1)]
    bases, targets = list(batch["base_caption"]), list(batch["target_text"])
    parts = method.sfcm_parts(models, bases, targets, eps_ref, eps_res, probs, (8, 8))
    raw_m = F.interpolate((eps_ref - eps_res).abs().mean(1, keepdim=True), size=(64, 64), mode="bilinear",
                          align_corners=False)[:, 0]
    torch.testing.assert_close(parts.m, raw_m, atol=1e-5, rtol=1e-4)
    assert parts.phrase_maps.amax() < 0.2  # raw probabilities over 77 tokens, not min-max'd to 1
    excl = torch.einsum("bp,bpxy->bxy", (1 - parts.gamma.clamp(0, 1)) * parts.phrase_mask, parts.phrase_maps)
    torch.testing.assert_close(parts.exclusion, excl)
    torch.testing.assert_close(parts.m_hat, (raw_m - excl).clamp(0, 1), atol=1e-5, rtol=1e-4)
    minmax = trainers.create("spf", {"sfcm_normalize": "minmax", "diagnostics_every": 0})
    minmax.setup(fresh_models())
    mm = minmax.sfcm_parts(models, bases, targets, eps_ref, eps_res, probs, (8, 8))
    assert parts.m_hat.mean() > 5 * mm.m_hat.mean()  # the raw reading leaves a map; the min-max one ~ erases it
    with pytest.raises(Exception, match="sfcm_normalize"):
        trainers.create("spf", {"sfcm_normalize": "softmax"})


# -- per-item constants: E_I(x0) and E_base (issue 23) -------------------------------------------------

def _flip_seed(pairs):
    """A random_flip seed under which, in epoch 0, the first item of each pair is flipped and the second not."""
    from spfbench.data import flip_decision

    return next(s for s in range(1000) if all(flip_decision(s, 0, a) and not flip_decision(s, 0, b) for a, b in pairs))


class EncoderCalls:
    """Records what the SD text encoder and the CLIP image tower are asked to encode (forward pre-hooks)."""

    def __init__(self, models, clip):
        self.text_ids, self.image_calls = [], []
        self.handles = [
            models.text_encoder.register_forward_pre_hook(lambda m, args: self.text_ids.extend(args[0].tolist())),
            clip.model.visual.register_forward_pre_hook(
                lambda m, args: self.image_calls.append((args[0].shape[0], torch.is_grad_enabled()))),
        ]

    def encoded(self, models, captions) -> list[bool]:
        """Which of ``captions`` the text encoder was fed."""
        from trainers.base import tokenize

        return [row in self.text_ids for row in tokenize(models.tokenizer, captions).tolist()]

    def gt_images(self) -> int:  # images embedded without gradients: the ground truth (the prediction has them)
        return sum(n for n, grad in self.image_calls if not grad)

    def close(self):
        for h in self.handles:
            h.remove()


def spf_on(ds, config=None):
    models = fresh_models()
    method = trainers.create("spf", config or {})
    method.setup(models)
    method.bind_dataset(ds)
    return models, method


def test_cached_and_uncached_steps_compute_the_same_losses(toy, tmp_path):
    """With cache_encodings the batch carries E_I(x0) of the item's pixels (its flip's with random_flip) and
    E_base: the step computes what the uncached step computes from the pixels, up to float rounding of the
    encoders' batch composition; before, the cached ground truth was the VAE decode of the latent mean."""
    from spfbench.errors import SpfbenchError
    from trainers import spf_losses as L
    from trainers.loop import build_encoding_cache
    from trainers.spf import GT_EMBEDDING, TEXT_BASE

    ds = PortraitDataset(toy, resolution=64, random_flip=True, seed=_flip_seed([(0, 1)]))
    assert ds.flipped(0) and not ds.flipped(1)
    models_u, plain = spf_on(ds)
    loss_u, num_u = plain.loss(models_u, collate([ds[0], ds[1]]), gen(3))

    models_c, cached_method = spf_on(ds)
    cached = build_encoding_cache(ds, models_c, cached_method, tmp_path / "cache", model={"preset": "tiny"}, progress=False)
    batch_c = collate([cached[0], cached[1]])
    assert "pixel_values" not in batch_c and {GT_EMBEDDING, TEXT_BASE} <= set(batch_c)
    loss_c, num_c = cached_method.loss(models_c, batch_c, gen(3))
    assert set(num_c) == set(num_u)
    for k in num_u:
        assert num_c[k] == pytest.approx(num_u[k], rel=1e-4, abs=1e-6), k
    assert loss_c.item() == pytest.approx(loss_u.item(), rel=1e-4)

    # what the cache holds, computed independently, one item at a time
    clip = cached_method.clip(models_c)
    size = clip.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)

    def embed(pixels):
        with torch.no_grad():
            return clip.model.encode_image(L.clip_preprocess(pixels[None], size=size))[0]

    for b, i in enumerate((0, 1)):
        torch.testing.assert_close(batch_c[GT_EMBEDDING][b], embed(ds[i]["pixel_values"]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch_c[TEXT_BASE][b], encode_text(models_c, [ds.records[i].base_caption])[0],
                                   rtol=1e-4, atol=1e-5)
    # controls, each 100 x the tolerance above: the flipped item got its flip's embedding, and the old cached
    # ground truth (the VAE decode of the posterior mean) is another image on the tiny model
    unflipped = ds.pixels(0, flip=False)
    assert (batch_c[GT_EMBEDDING][0] - embed(unflipped)).abs().max() > 1e-3
    with torch.no_grad():
        decoded = models_c.vae.decode(cached[0]["latent_mean"][None]).sample[0].float()
    assert (batch_c[GT_EMBEDDING][0] - embed(decoded)).abs().max() > 1e-3
    no_gt = {k: v for k, v in batch_c.items() if k != GT_EMBEDDING}
    with pytest.raises(SpfbenchError, match="neither pixel_values nor"):
        cached_method.loss(models_c, no_gt, gen(3))


def test_warm_per_item_caches_give_the_cold_step_and_skip_the_encoders(toy, monkeypatch):
    """Without cache_encodings, E_I(x0) is kept per (dataset index, flipped) and E_base per base caption: a
    batch whose items were seen in other batches is not encoded again and gives the cold step's losses; an
    item whose flip changed is embedded again; the text cache is bounded (least recently used goes first)."""
    from trainers.spf import Spf

    ds = PortraitDataset(toy, resolution=64, random_flip=True, seed=_flip_seed([(1, 2)]))
    x = lambda: collate([ds[1], ds[2]])  # noqa: E731
    bases = [ds.records[i].base_caption for i in (1, 2)]
    assert len(set(r.base_caption for r in ds.records)) == 4  # distinct captions: eviction is observable

    models, cold = spf_on(ds)
    _, num_cold = cold.loss(models, x(), gen(4))

    models, warm = spf_on(ds)
    warm.loss(models, collate([ds[0], ds[1]]), gen(0))
    warm.loss(models, collate([ds[2], ds[3]]), gen(1))
    calls = EncoderCalls(models, warm.clip(models))
    _, num_warm = warm.loss(models, x(), gen(4))
    assert calls.gt_images() == 0 and calls.encoded(models, bases) == [False, False]
    assert any(calls.encoded(models, [ds.records[1].caption]))  # the hooks do see the complete caption's encoding
    assert set(num_warm) == set(num_cold)
    for k in num_cold:
        assert num_warm[k] == pytest.approx(num_cold[k], rel=1e-5, abs=1e-7), k

    # another epoch flips item 1 (and maybe 2): only the items whose flip changed are embedded again
    from spfbench.data import flip_decision

    epoch = next(e for e in range(1, 100) if not flip_decision(ds.seed, e, 1))
    ds.set_epoch(epoch)
    changed = sum(ds.flipped(i) != (i == 1) for i in (1, 2))
    calls.close()
    calls = EncoderCalls(models, warm.clip(models))
    _, num_flip = warm.loss(models, x(), gen(4))
    assert calls.gt_images() == changed >= 1
    models, cold2 = spf_on(ds)
    _, num_flip_cold = cold2.loss(models, x(), gen(4))
    assert num_flip["loss_enhanced"] == pytest.approx(num_flip_cold["loss_enhanced"], rel=1e-5, abs=1e-7)
    assert num_flip["loss_enhanced"] != pytest.approx(num_warm["loss_enhanced"], rel=1e-3)  # the flip does change it
    calls.close()

    # bounded: with room for one caption, a batch of two evicts the first; seeing it again encodes it again
    ds.set_epoch(0)
    monkeypatch.setattr(Spf, "text_cache_size", 1)
    models, small = spf_on(ds)
    small.loss(models, x(), gen(4))
    calls = EncoderCalls(models, small.clip(models))
    small.loss(models, x(), gen(4))
    assert calls.encoded(models, bases) == [True, False]  # base 2 was the most recent: kept; base 1 evicted
    calls.close()


def test_encoding_cache_key_names_the_method_constants(toy):
    """The loop's cache key: a method without extras keeps the plain key (model, dtype, resolution); SPF's
    adds the method, its CLIP and what it stores, so another CLIP, or an ablation storing less, gets a fresh
    cache (spf-no-text stores the same constants: E_base still feeds L_fine's reference path)."""
    from spfbench.data import cache_key
    from trainers.loop import encoding_cache_key

    ds = PortraitDataset(toy, resolution=64)
    models = fresh_models()
    model = {"preset": "tiny"}
    keys = {}
    for label, name, cfg in [("naive", "naive", {}), ("spf", "spf", {}), ("b32", "spf", {"clip_model": "vit-b-32"}),
                             ("no-enh", "spf-no-enh", {}), ("no-text", "spf-no-text", {})]:
        keys[label] = encoding_cache_key(ds, models, trainers.create(name, cfg), model)
    assert "extras" not in json.loads(keys["naive"])
    assert json.loads(keys["spf"])["model"] == json.loads(keys["naive"])["model"]
    assert len({cache_key(ds, k) for k in keys.values()}) == len(keys)  # the method's name is part of it too
    assert json.loads(json.loads(keys["no-text"])["extras"]["key"]) == json.loads(json.loads(keys["spf"])["extras"]["key"])
    assert "spf_clip_gt" not in json.loads(json.loads(keys["no-enh"])["extras"]["key"])["stored"]
    # nothing left to store: no extras at all
    assert trainers.create("spf-no-enh", {"use_text": False, "use_fine": False, "diagnostics_every": 0}).encoding_extras(models) is None


def test_loop_with_cache_encodings_trains_spf_like_without(toy, tmp_path):
    """The loop passes SPF's constants through the encoding cache: the same run with and without
    cache_encodings (random_flip on) logs the same losses, up to the encoders' batch rounding."""
    from safetensors import safe_open

    logs = {}
    for cached in (False, True):
        cfg = {"max_train_steps": 3, "train_batch_size": 2, "learning_rate": 1e-3, "random_flip": True, "seed": 1,
               "cache_encodings": cached}
        out = tmp_path / str(cached)
        Trainer(trainers.create("spf", cfg), toy, out, preset="tiny", device="cpu").run(progress=False)
        logs[cached] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    shard = next((tmp_path / "True" / "cache").rglob("*.safetensors"))
    with safe_open(str(shard), framework="pt") as f:
        assert {"spf_clip_gt", "spf_clip_gt.flipped", "spf_text_base"} <= set(f.keys())
    assert not (tmp_path / "False" / "cache").exists()
    for a, b in zip(logs[False], logs[True], strict=True):
        for k in ("loss_diffusion", "loss_enhanced", "loss_text", "loss_fine", "loss_total"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
