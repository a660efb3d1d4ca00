"""LoRA, AdaLoRA and the LoRA rank sweep (tiny preset, CPU, no network)."""

import json
from types import SimpleNamespace

import pytest
import torch

import trainers
from spfbench.errors import SpfbenchError
from spfbench.generation import GenerationSettings, generate
from spfbench.models import load_pipeline
from trainers.adalora import AdaLora, AdaLoraConfig, load_adapter, orthogonal_regularizer, peft_adalora_config
from trainers.base import Models, diffusion_loss, encode_batch
from trainers.lora import Lora, LoraConfig, adapter_init_rng

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models, shared cores

SETTINGS = GenerationSettings(steps=3)
CAPTIONS, SEEDS = ["A woman, smiling, a hat", "A man, glasses"], [7, 8]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from spfbench.toydata import make_toy_data

    root = tmp_path_factory.mktemp("toy")
    make_toy_data(root / "train", 4, seed=0, size=64)
    make_toy_data(root / "val", 2, seed=1, size=64)
    return root


def fresh():
    from trainers.loop import training_scheduler

    pipe, _ = load_pipeline("tiny", device="cpu")
    models = Models(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, training_scheduler(pipe))
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    return pipe, models


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "caption": list(CAPTIONS)}


def snapshot(pipe) -> dict:
    return {f"{part}.{k}": v.detach().clone() for part in ("unet", "vae", "text_encoder")
            for k, v in getattr(pipe, part).state_dict().items()}


def assert_base_unchanged(pipe, before: dict) -> None:
    """Every non-adapter tensor bit-identical (peft renames a wrapped layer's weight to base_layer.weight)."""
    after = {k.replace(".base_layer.", "."): v for k, v in snapshot(pipe).items() if ".lora_" not in k and ".ranknum." not in k}
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def train(method, models, steps, *, params=None, flush_each_step=False):
    """The loop's order on one fixed batch: loss, backward, clip, after_backward(step), step, zero_grad.
    The generator is reseeded every step: same noise and timesteps, an overfit target."""
    params = method.setup(models) if params is None else params
    opt = torch.optim.AdamW(params, lr=method.config.learning_rate, weight_decay=0.0)
    batch, log = fixed_batch(), []
    for step in range(steps):
        loss, numbers = method.loss(models, batch, torch.Generator().manual_seed(123))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        method.after_backward(models, step)
        opt.step()
        if flush_each_step:
            method.flush()  # what the next loss() call does first; here to observe each step's allocation
            numbers = {**numbers, "budget_after": method.rank_budget()}
        opt.zero_grad(set_to_none=True)
        log.append({"loss": loss.item(), **numbers})
    return log


def images(pipe):
    return generate(pipe, CAPTIONS, SEEDS, SETTINGS, output_type="np")


# ------------------------------------------------------------------------------------------------- LoRA


def test_lora_trains_only_its_adapter_and_reloads_with_its_alpha(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe, models = fresh()
    before = snapshot(pipe)
    method = Lora(LoraConfig(rank=4, alpha=8, learning_rate=1e-2))
    params = method.setup(models)
    lora_names = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert len(params) == len(lora_names) == 14 * 4 * 2 and all(".lora_A." in n or ".lora_B." in n for n in lora_names)
    init = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert all(torch.count_nonzero(v) == 0 for n, v in init.items() if ".lora_B." in n)  # gaussian init: B = 0

    log = train(method, models, 20, params=params)
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    assert_base_unchanged(pipe, before)
    after = {n: p.detach() for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert all(not torch.equal(after[n], init[n]) for n in init)

    # checkpoint state round trip
    state = method.trainable_state(models)
    assert set(state) == {n.replace(".default", "") for n in lora_names}
    with torch.no_grad():
        for p in params:
            p.zero_()
    method.load_trainable_state(models, state)
    assert all(torch.equal(after[n], state[n.replace(".default", "")]) for n in after)
    with pytest.raises(SpfbenchError, match="does not match the adapter"):
        method.load_trainable_state(models, {k: v for k, v in list(state.items())[1:]})

    # artifact: diffusers format, alpha in its metadata; a fresh pipeline reproduces the trained images
    pipe.unet.eval()
    trained = images(pipe)
    method.save_artifact(models, tmp_path / "art")
    assert (tmp_path / "art" / "pytorch_lora_weights.safetensors").is_file()
    loaded, _ = load_pipeline("tiny", device="cpu")
    base_images = images(loaded)
    Lora.apply_artifact(loaded, tmp_path / "art", method.config)
    cfg = loaded.unet.peft_config["lora"]
    assert (cfg.r, cfg.lora_alpha) == (4, 8)
    assert abs(images(loaded) - trained).max() < 1e-5
    assert abs(base_images - trained).max() > 1e-3  # the LoRA changes the images at all

    # control: the same weights without the metadata load at scale 1 instead of 2, a different model
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    StableDiffusionPipeline.save_lora_weights(tmp_path / "bare", unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(pipe.unet)))
    control, _ = load_pipeline("tiny", device="cpu")
    control.load_lora_weights(tmp_path / "bare")
    assert abs(images(control) - trained).max() > 1e-3
    with pytest.raises(SpfbenchError, match="differs from the trained"):
        Lora.apply_artifact(load_pipeline("tiny", device="cpu")[0], tmp_path / "bare", method.config)


def test_lora_config_defaults_and_validation():
    cfg = LoraConfig()
    assert (cfg.rank, cfg.lora_alpha, cfg.init, cfg.learning_rate) == (4, 4.0, "gaussian", 1e-4)
    assert cfg.target_modules == ["to_k", "to_q", "to_v", "to_out.0"]
    assert LoraConfig.from_dict({"rank": 16}).lora_alpha == 16
    for bad, msg in [({"rank": 0}, "rank must be"), ({"rank": "4,8"}, "rank must be"), ({"alpha": 0}, "alpha must be"),
                     ({"init": "pissa"}, "init must be"), ({"target_modules": []}, "target_modules")]:
        with pytest.raises(SpfbenchError, match=msg):
            LoraConfig.from_dict(bad)
    assert isinstance(trainers.create("lora", {"rank": 8}), Lora)


# ---------------------------------------------------------------------------------------------- AdaLoRA

ADA = dict(init_r=4, target_r=2, max_train_steps=16, tinit=2, tfinal=4, deltaT=1, learning_rate=2e-2, orth_reg_weight=0.1)


def peft_orth_reg(peft_model) -> float:
    """peft's own regulariser: AdaLoraModel.forward adds orth_reg_weight * reg to an output's .loss."""
    tuner = peft_model.base_model
    unet = tuner.model
    unet.forward = lambda *a, **k: SimpleNamespace(loss=torch.zeros(()))
    try:
        out = tuner(None)
    finally:
        del unet.forward
    return out.loss.item() / tuner.peft_config["default"].orth_reg_weight


def test_adalora_prunes_on_schedule_trains_only_its_adapter_and_round_trips(tmp_path):
    pipe, models = fresh()
    before = snapshot(pipe)
    method = AdaLora(AdaLoraConfig(**ADA))
    params = method.setup(models)
    assert pipe.unet.__class__.__name__ == "UNet2DConditionModel" and models.unet is pipe.unet
    trainable = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert len(trainable) == 56 * 3 and all(any(f".lora_{m}.default" in n for m in "AEB") for n in trainable)
    init = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad}

    # the regulariser is peft's, computed independently three ways
    reg = orthogonal_regularizer(pipe.unet).item()
    mods = [m for m in pipe.unet.modules() if hasattr(m, "lora_E") and "default" in m.lora_E]
    by_hand = []
    for m in mods:
        a, b = m.lora_A["default"].detach(), m.lora_B["default"].detach()
        by_hand += [torch.linalg.norm(a @ a.T - torch.eye(a.shape[0])), torch.linalg.norm(b.T @ b - torch.eye(b.shape[1]))]
    assert len(mods) == 56
    assert reg == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-6)
    assert reg == pytest.approx(peft_orth_reg(method.peft_model), rel=1e-6)

    log = train(method, models, ADA["max_train_steps"], params=params, flush_each_step=True)
    assert log[0]["loss"] == pytest.approx(log[0]["loss_diffusion"] + 0.1 * log[0]["loss_orth"], rel=1e-5)
    assert log[-1]["loss_diffusion"] < 0.97 * log[0]["loss_diffusion"] and log[-1]["loss"] < log[0]["loss"]
    assert_base_unchanged(pipe, before)
    changed = {n: not torch.equal(p.detach(), init[n]) for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert all(c for n, c in changed.items() if ".lora_E." not in n)  # A and B all train
    pattern = method.rank_pattern()
    # E starts at 0: it has moved exactly in the modules that keep a triplet (some lose all of them)
    assert {n: c for n, c in changed.items() if ".lora_E." in n} == {f"{k}.default": any(v) for k, v in pattern.items()}
    assert 0 < sum(any(v) for v in pattern.values()) < 56

    # the budget: init_r per module through tinit, peft's cubic schedule down to target_r per module at
    # step total - tfinal, then fixed; pruned singular values are exactly zero
    alloc = method.tuner.rankallocator
    init_bgt, target_bgt, T, tinit, tfinal = 56 * 4, 56 * 2, 16, 2, 4
    budgets = [e["budget_after"] for e in log]
    assert (alloc.init_bgt, alloc.target_bgt) == (init_bgt, target_bgt)
    assert budgets[: tinit + 1] == [init_bgt] * (tinit + 1)
    for s in range(tinit + 1, T - tfinal):
        assert budgets[s] == alloc.budget_schedule(s)[0]
    assert all(a >= b for a, b in zip(budgets, budgets[1:])) and init_bgt > budgets[tinit + 1] > target_bgt
    assert budgets[T - tfinal:] == [target_bgt] * tfinal  # forced at step T - tfinal, then kept
    for m_name, m in pipe.unet.named_modules():
        if m in mods:
            keep = torch.tensor(pattern[f"{m_name}.lora_E"])
            assert torch.count_nonzero(m.lora_E["default"].detach()[~keep]) == 0
    assert [e["rank_budget"] for e in log[1:]] == budgets[:-1]  # logged: the budget the step trained with

    # checkpoint state: weights, the allocator's smoothed scores and the rank pattern
    state = method.trainable_state(models)
    weights = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if p.requires_grad:
                p.zero_()
    method.tuner.peft_config["default"].rank_pattern = None
    method.load_trainable_state(models, state)
    assert all(torch.equal(p.detach(), weights[n]) for n, p in pipe.unet.named_parameters() if p.requires_grad)
    assert method.rank_pattern() == pattern
    with pytest.raises(SpfbenchError, match="does not match the adapter"):
        method.load_trainable_state(models, {k: v for k, v in state.items() if ".lora_E." not in k})

    # artifact: peft's save_pretrained with the rank pattern; loaded and merged into a plain UNet
    pipe.unet.eval()
    trained = images(pipe)
    method.save_artifact(models, tmp_path / "art")
    saved = json.loads((tmp_path / "art" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == T
    assert sum(sum(v) for v in saved["rank_pattern"].values()) == target_bgt
    probe = load_adapter(load_pipeline("tiny", device="cpu")[0].unet, tmp_path / "art")
    kept = {f"{n}.lora_E": m.r["default"] for n, m in probe.base_model.model.named_modules() if hasattr(m, "lora_E")}
    assert kept == {k: sum(v) for k, v in pattern.items()}  # the saved rank pattern is applied on load

    loaded, _ = load_pipeline("tiny", device="cpu")
    base_images = images(loaded)
    AdaLora.apply_artifact(loaded, tmp_path / "art", method.config)
    assert type(loaded.unet).__name__ == "UNet2DConditionModel"
    assert not any("lora" in n for n, _ in loaded.unet.named_parameters())
    assert abs(images(loaded) - trained).max() < 1e-5
    assert abs(base_images - trained).max() > 1e-4

    # the same update as a plain LoRA that diffusers' load_lora_weights reads, with each module's kept rank
    plain, _ = load_pipeline("tiny", device="cpu")
    plain.load_lora_weights(tmp_path / "art", weight_name="pytorch_lora_weights.safetensors", adapter_name="ada")
    ranks = {n: m.r["ada"] for n, m in plain.unet.named_modules() if hasattr(m, "lora_A") and "ada" in m.r}
    assert ranks == {k[: -len(".lora_E")]: sum(v) for k, v in pattern.items() if any(v)}  # fully pruned modules absent
    assert all(m.scaling["ada"] == 1.0 for m in plain.unet.modules() if hasattr(m, "scaling") and "ada" in m.scaling)
    assert abs(images(plain) - trained).max() < 1e-4
    # its weights: dW of every module equals the merged model's, independently of the images
    merged = dict(loaded.unet.named_parameters())
    base_w = dict(load_pipeline("tiny", device="cpu")[0].unet.named_parameters())
    plain.fuse_lora(adapter_names=["ada"])
    plain.unload_lora_weights()
    for n, p in plain.unet.named_parameters():
        assert torch.allclose(p, merged[n], atol=1e-6), n
    moved = [n for n in merged if not torch.equal(merged[n], base_w[n])]
    assert moved and all(any(n.startswith(k[: -len(".lora_E")]) for k, v in pattern.items() if any(v)) for n in moved)


def test_adalora_allocation_matches_peft_documented_order():
    """Our hooks (after_backward before optimizer.step, allocation deferred) give bit-identical weights and rank
    pattern to peft's order: backward, optimizer.step, update_and_allocate(step), zero_grad."""
    from peft import get_peft_model

    cfg = AdaLoraConfig(**{**ADA, "max_train_steps": 8, "tinit": 1, "tfinal": 2})
    _, models = fresh()
    ours = AdaLora(cfg)
    train(ours, models, 8)
    ours.flush()

    _, ref_models = fresh()
    unet = ref_models.unet
    unet.requires_grad_(False)
    with adapter_init_rng(cfg.seed):
        peft_model = get_peft_model(unet, peft_adalora_config(cfg))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    batch = fixed_batch()
    for step in range(8):
        g = torch.Generator().manual_seed(123)
        latents, text = encode_batch(ref_models, batch, g)
        loss = diffusion_loss(ref_models, latents, text, g) + cfg.orth_reg_weight * orthogonal_regularizer(unet)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        peft_model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)

    a = {n: p for n, p in models.unet.named_parameters() if p.requires_grad}
    b = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert ours.tuner.peft_config["default"].rank_pattern == peft_model.peft_config["default"].rank_pattern


def test_adalora_setup_freezes_peft_ranknum_and_refuses_other_trainables(monkeypatch):
    """peft 0.21.0 (seen on the GPU machine) leaves each layer's constant ``ranknum`` trainable: setup must
    freeze it, not refuse to run; any other non-adapter parameter left trainable is still an error."""
    import peft

    real = peft.get_peft_model

    def leaky(model, config, **kw):
        out = real(model, config, **kw)
        for n, p in model.named_parameters():
            if ".ranknum." in n:
                p.requires_grad_(True)
        return out

    monkeypatch.setattr(peft, "get_peft_model", leaky)
    pipe, models = fresh()
    params = AdaLora(AdaLoraConfig(**ADA)).setup(models)
    ranknum = [p for n, p in pipe.unet.named_parameters() if ".ranknum." in n]
    assert len(ranknum) == 56 and not any(p.requires_grad for p in ranknum)
    assert len(params) == 56 * 3 and not any(p is q for p in params for q in ranknum)

    def leaky_conv(model, config, **kw):
        out = real(model, config, **kw)
        model.conv_in.weight.requires_grad_(True)
        return out

    monkeypatch.setattr(peft, "get_peft_model", leaky_conv)
    with pytest.raises(SpfbenchError, match="unexpected trainable parameter conv_in.weight"):
        AdaLora(AdaLoraConfig(**ADA)).setup(fresh()[1])


def test_adalora_config_defaults_and_validation():
    cfg = AdaLoraConfig()
    assert (cfg.init_r, cfg.target_r, cfg.deltaT, cfg.beta1, cfg.beta2, cfg.orth_reg_weight, cfg.lora_alpha) == (12, 8, 1, 0.85, 0.85, 0.5, 8)
    assert (cfg.total_step, cfg.resolved_tinit, cfg.resolved_tfinal) == (1000, 100, 200)
    p = peft_adalora_config(AdaLoraConfig(max_train_steps=50))
    assert (p.total_step, p.tinit, p.tfinal) == (50, 5, 10)
    for bad, msg in [({"max_train_steps": 10, "tinit": 5, "tfinal": 5}, "no rank-reduction phase"),
                     ({"target_r": 16}, "must not exceed"), ({"beta1": 1.0}, "beta1"), ({"orth_reg_weight": -1}, "orth_reg_weight"),
                     ({"deltaT": 0}, "deltaT")]:
        with pytest.raises(SpfbenchError, match=msg):
            AdaLoraConfig.from_dict(bad)


# ------------------------------------------------------------------------------------------------- loop


def test_adalora_through_the_loop_resumes_exactly_and_loads(toy, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from trainers.loop import Trainer

    def method():
        return trainers.create("adalora", {"init_r": 2, "target_r": 1, "max_train_steps": 6, "tinit": 1, "tfinal": 2,
                                           "checkpointing_steps": 2, "train_batch_size": 2, "learning_rate": 1e-2})

    def run(out):
        return Trainer(method(), toy / "train", out, preset="tiny", device="cpu").run(progress=False)

    whole = run(tmp_path / "whole")
    calls, real_loss = {"n": 0}, AdaLora.loss

    def dying(self, models, batch, generator):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 4 (checkpoint-2 exists; the rank budget is shrinking)
            raise KeyboardInterrupt
        return real_loss(self, models, batch, generator)

    monkeypatch.setattr(AdaLora, "loss", dying)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "split")
    monkeypatch.setattr(AdaLora, "loss", real_loss)
    split = run(tmp_path / "split")
    assert split.resumed_from == 2 and split.steps == 6
    a = load_file(whole.artifact / "adapter" / "adapter_model.safetensors")
    b = load_file(split.artifact / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (json.loads((whole.artifact / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
            == json.loads((split.artifact / "adapter" / "adapter_config.json").read_text())["rank_pattern"])
    log = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 7)) and all("loss_orth" in e and "rank_budget" in e for e in log)

    pipe, _ = load_pipeline("tiny", device="cpu")
    assert trainers.load_artifact(whole.artifact, pipe).method is AdaLora
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"


# ------------------------------------------------------------------------------------------------ sweep


def test_lora_rank_sweep_trains_each_rank_and_records_the_best(toy, tmp_path):
    from trainers.sweep import HeldOutLoss, lora_rank_sweep, parse_ranks, read_sweep, resolve_artifact

    assert parse_ranks("32, 4,8,16,4") == [4, 8, 16, 32]
    with pytest.raises(SpfbenchError, match="positive integers"):
        parse_ranks("4,x")
    common = dict(config={"max_train_steps": 2, "learning_rate": 1e-2, "train_batch_size": 2}, preset="tiny", device="cpu",
                  progress=False, n_timesteps=2)
    with pytest.raises(SpfbenchError, match="needs held-out data"):
        lora_rank_sweep("1,2", toy / "train", tmp_path / "s", val_data=None, **common)
    with pytest.raises(SpfbenchError, match="is the training data"):
        lora_rank_sweep("1,2", toy / "train", tmp_path / "s", val_data=toy / "train", **common)

    result = lora_rank_sweep("2,1", toy / "train", tmp_path / "s", val_data=toy / "val", **common)
    record = read_sweep(tmp_path / "s")
    scores = {e["rank"]: e["score"] for e in record["ranks"]}
    assert record["criterion"] == "heldout_denoising_loss" and set(scores) == {1, 2}
    assert record["best_rank"] == result.best_rank == min(scores, key=lambda r: (scores[r], r))
    assert record["val_items"] == 2 and len(record["timesteps"]) == 2 and record["base_model_loss"] > 0
    assert all((tmp_path / "s" / f"rank-{r}" / "artifact" / "method.json").is_file() for r in (1, 2))
    assert len(set(scores.values()) | {record["base_model_loss"]}) == 3  # each rank's LoRA changes the score

    # the recorded score is the held-out loss of the artifact loaded into a fresh pipeline
    pipe, _ = load_pipeline("tiny", device="cpu")
    heldout = HeldOutLoss(pipe, toy / "val", n_timesteps=2)
    assert heldout(pipe.unet) == pytest.approx(record["base_model_loss"], rel=1e-6)
    trainers.load_artifact(result.best_artifact, pipe)
    assert heldout(pipe.unet) == pytest.approx(scores[result.best_rank], rel=1e-6)
    assert resolve_artifact(tmp_path / "s") == result.best_artifact and resolve_artifact(result.best_artifact) == result.best_artifact
