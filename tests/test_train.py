"""The shared training loop and the naive method (tiny preset, toy data, CPU)."""

import json

import pytest
import torch

import trainers
from spfbench.errors import SpfbenchError
from spfbench.generation import GenerationSettings, generate
from spfbench.models import load_pipeline
from trainers.base import Models, diffusion_loss, encode_batch
from trainers.loop import Trainer, TrainingDiverged
from trainers.naive import Naive

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models, shared cores

STEPS = 4


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from spfbench.toydata import make_toy_data

    out = tmp_path_factory.mktemp("toy") / "data"
    make_toy_data(out, 6, seed=0, size=64)
    return out


def naive(**cfg):
    return trainers.create("naive", {"max_train_steps": STEPS, "train_batch_size": 2, "checkpointing_steps": 2, **cfg})


def run(method, data, out, **kw):
    return Trainer(method, data, out, preset="tiny", device="cpu").run(progress=False)


def unet_state(folder):
    from safetensors.torch import load_file

    return load_file(folder / "artifact" / "unet" / "diffusion_pytorch_model.safetensors")


def test_naive_trains_only_the_unet_and_its_artifact_generates_like_the_trained_model(toy, tmp_path):
    r = run(naive(), toy, tmp_path / "run")
    assert r.steps == STEPS and r.resumed_from is None
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, STEPS + 1))
    meta = json.loads((r.artifact / "method.json").read_text())
    assert meta["method"] == "naive" and meta["steps"] == STEPS and meta["config"]["max_train_steps"] == STEPS

    base, _ = load_pipeline("tiny", device="cpu")
    trained = unet_state(tmp_path / "run")
    changed = [k for k, v in base.unet.state_dict().items() if not torch.equal(v, trained[k])]
    assert len(changed) > 0.5 * len(trained)  # the whole UNet trains

    settings = GenerationSettings(steps=3)
    fresh, _ = load_pipeline("tiny", device="cpu")
    assert trainers.load_artifact(r.artifact, fresh).method is Naive
    for k, v in base.vae.state_dict().items():  # VAE and text encoder are the base model's
        assert torch.equal(v, fresh.vae.state_dict()[k])
    captions, seeds = ["A woman, smiling, a hat"], [7]
    a = generate(fresh, captions, seeds, settings, output_type="np")
    base.unet.load_state_dict(trained)
    b = generate(base, captions, seeds, settings, output_type="np")
    assert abs(a - b).max() < 1e-5


def test_naive_artifact_is_fp16_unless_asked_and_loads_exactly_what_it_saved(tmp_path):
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from trainers.naive import NaiveConfig

    pipe, _ = load_pipeline("tiny", device="cpu")
    with torch.no_grad():  # weights off the fp16 grid, as trained ones are
        for p in pipe.unet.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 1e-3)
    live = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    sizes = {}
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        folder = tmp_path / precision
        Naive(NaiveConfig(save_precision=precision)).save_artifact(SimpleNamespace(unet=pipe.unet), folder)
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        sizes[precision] = weights.stat().st_size
        assert {v.dtype for v in load_file(weights).values()} == {dtype}
        assert all(torch.equal(v, live[k]) for k, v in pipe.unet.state_dict().items())  # the live model is not rounded
        fresh, _ = load_pipeline("tiny", device="cpu")
        Naive.apply_artifact(fresh, folder, NaiveConfig())
        loaded = fresh.unet.state_dict()
        assert fresh.unet.dtype == torch.float32
        assert all(torch.equal(loaded[k], v.to(dtype).float()) for k, v in live.items())
        if precision != "fp32":
            assert any(not torch.equal(loaded[k], v) for k, v in live.items())
    assert Naive.Config().save_precision == "fp16"
    assert 0.49 < sizes["fp16"] / sizes["fp32"] < 0.51 and abs(sizes["bf16"] - sizes["fp16"]) < 4096  # (header strings differ)

    with torch.no_grad():
        next(pipe.unet.parameters()).view(-1)[0] = 1e6  # beyond fp16's 65504
    with pytest.raises(SpfbenchError, match="overflows fp16.*bf16"):
        Naive(NaiveConfig()).save_artifact(SimpleNamespace(unet=pipe.unet), tmp_path / "big")
    Naive(NaiveConfig(save_precision="bf16")).save_artifact(SimpleNamespace(unet=pipe.unet), tmp_path / "big")
    with pytest.raises(SpfbenchError, match="save_precision must be one of"):
        NaiveConfig(save_precision="fp8").validate()


def test_interrupted_and_resumed_run_ends_with_the_same_weights(toy, tmp_path, monkeypatch):
    run(naive(), toy, tmp_path / "whole")

    calls = {"n": 0}
    real_loss = Naive.loss

    def dying(self, models, batch, generator):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 3: checkpoint-2 exists
            raise KeyboardInterrupt
        return real_loss(self, models, batch, generator)

    monkeypatch.setattr(Naive, "loss", dying)
    with pytest.raises(KeyboardInterrupt):
        run(naive(), toy, tmp_path / "split")
    monkeypatch.setattr(Naive, "loss", real_loss)
    assert [s for s, _ in Trainer(naive(), toy, tmp_path / "split").checkpoints()] == [2]
    r = run(naive(), toy, tmp_path / "split")
    assert r.resumed_from == 2 and r.steps == STEPS
    whole, split = unet_state(tmp_path / "whole"), unet_state(tmp_path / "split")
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(toy, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = Naive.loss

    def poisoned(self, models, batch, generator):
        calls["n"] += 1
        loss, numbers = real_loss(self, models, batch, generator)
        return (loss * float("nan") if calls["n"] == 3 else loss), numbers

    monkeypatch.setattr(Naive, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3.*checkpoint-2"):
        run(naive(), toy, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    monkeypatch.setattr(Naive, "loss", real_loss)
    r = run(naive(), toy, tmp_path / "run")  # resumes from the good checkpoint
    assert r.resumed_from == 2
    assert not ckpt.exists() or {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_loss_falls_on_an_overfit_batch(toy):
    from spfbench.data import PortraitDataset, collate

    pipe, _ = load_pipeline("tiny", device="cpu")
    models = Models(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    method = Naive(Naive.Config(learning_rate=1e-3))
    params = method.setup(models)
    opt = torch.optim.AdamW(params, lr=1e-3)
    batch = collate([PortraitDataset(toy, resolution=64)[i] for i in range(2)])
    losses = []
    for _ in range(25):
        g = torch.Generator().manual_seed(0)  # same noise and timesteps every step: a fixed target
        latents, text = encode_batch(models, batch, g)
        loss = diffusion_loss(models, latents, text, g)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_input_is_refused_and_changes_nothing(toy, tmp_path, cli):
    code, _, err = cli("train", "--method", "dreambooth", "--data", toy, "--out", tmp_path / "x", "--preset", "tiny")
    assert code == 2 and "unknown method 'dreambooth'" in err and "spfbench methods" in err
    (tmp_path / "cfg.json").write_text(json.dumps({"learning_rat": 1e-4}))
    code, _, err = cli("train", "--method", "naive", "--data", toy, "--out", tmp_path / "x", "--preset", "tiny", "--config", tmp_path / "cfg.json")
    assert code == 2 and "unknown option(s) learning_rat" in err
    (tmp_path / "bad.json").write_text("{nope")
    code, _, err = cli("train", "--method", "naive", "--data", toy, "--out", tmp_path / "x", "--preset", "tiny", "--config", tmp_path / "bad.json")
    assert code == 2 and "not valid JSON" in err
    assert not (tmp_path / "x").exists()

    run(naive(max_train_steps=2), toy, tmp_path / "run")
    before = {str(p): p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    other = trainers.create("naive", {"max_train_steps": 2, "learning_rate": 3e-5})
    with pytest.raises(SpfbenchError, match="holds a run of a different config"):
        run(other, toy, tmp_path / "run")
    assert {str(p): p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    with pytest.raises(SpfbenchError, match="not a method artifact"):
        trainers.load_artifact(tmp_path, load_pipeline("tiny", device="cpu")[0])


def test_cli_make_toy_data_train_and_methods(tmp_path, cli):
    code, out, err = cli("make-toy-data", "--out", tmp_path / "d", "--n", 4)
    assert code == 0, err
    code, out, err = cli("train", "--method", "naive", "--data", tmp_path / "d", "--out", tmp_path / "o", "--preset", "tiny",
                         "--max-steps", 2, "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert "naive: 2 steps" in out and (tmp_path / "o" / "artifact" / "method.json").is_file()
    code, out, _ = cli("methods")
    assert code == 0 and all(name in out for name in trainers.REGISTRY)


def test_cli_trains_each_method_and_the_lora_rank_sweep(tmp_path, cli):
    code, _, err = cli("make-toy-data", "--out", tmp_path / "d", "--n", 4)
    assert code == 0, err
    code, _, err = cli("make-toy-data", "--out", tmp_path / "v", "--n", 2, "--seed", 1)
    assert code == 0, err
    common = ["--data", tmp_path / "d", "--preset", "tiny", "--max-steps", 2, "--device", "cpu", "--no-progress"]
    for method in ("lora", "adalora"):
        code, out, err = cli("train", "--method", method, "--out", tmp_path / method, *common)
        assert code == 0, err
        assert (tmp_path / method / "artifact" / "method.json").is_file()
        fresh, _ = load_pipeline("tiny", device="cpu")
        assert trainers.load_artifact(tmp_path / method / "artifact", fresh).name == method
    # a run folder of another method is refused, its files untouched
    before = {str(p): p.read_bytes() for p in (tmp_path / "lora").rglob("*") if p.is_file()}
    code, _, err = cli("train", "--method", "naive", "--out", tmp_path / "lora", *common)
    assert code == 2 and "holds a run of a different method" in err
    assert {str(p): p.read_bytes() for p in (tmp_path / "lora").rglob("*") if p.is_file()} == before

    code, out, err = cli("train", "--method", "lora", "--out", tmp_path / "sweep", "--rank", "2,4", "--val-data", tmp_path / "v", *common)
    assert code == 0, err
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert f"best rank {sweep['best_rank']}" in out and [r["rank"] for r in sweep["ranks"]] == [2, 4]
    best = min(sweep["ranks"], key=lambda r: (r["score"], r["rank"]))
    assert sweep["best_rank"] == best["rank"] and sweep["criterion"] == "heldout_denoising_loss"
    code, _, err = cli("train", "--method", "naive", "--out", tmp_path / "x", "--rank", "4", *common)
    assert code == 2 and "--rank applies to the lora method" in err


def test_accelerate_launch_trains_with_two_processes(toy, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "spfbench", "train", "--method", "lora", "--data", str(toy),
           "--out", str(tmp_path / "ddp"), "--preset", "tiny", "--max-steps", "3", "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3]  # one log, written by the main process
    assert [s for s, _ in Trainer(naive(), toy, tmp_path / "ddp").checkpoints()] == [3]
    fresh, _ = load_pipeline("tiny", device="cpu")
    assert trainers.load_artifact(tmp_path / "ddp" / "artifact", fresh).name == "lora"


def test_cached_encodings_train_like_encoding_every_step(toy, tmp_path):
    plain = run(naive(max_train_steps=3), toy, tmp_path / "plain")
    cached = run(naive(max_train_steps=3, cache_encodings=True), toy, tmp_path / "cached")
    assert list((tmp_path / "cached" / "cache").rglob("*.safetensors"))
    # the same VAE posterior sampled with the same generator draws; only batching of the encoders differs
    assert cached.losses == pytest.approx(plain.losses, rel=1e-4, abs=1e-6)
    assert not list((tmp_path / "plain").glob("cache"))


@pytest.mark.parametrize("cached", [False, True])
def test_the_dataset_a_method_holds_follows_the_epochs_the_loop_trains(toy, tmp_path, cached):
    """A method that reads more than the batch (SPF's target masks, TokenCompose's masks) looks items up in
    the dataset it was handed; with random_flip its flips must be the ones of the batches the loop draws,
    cached encodings or not (6 items at batch 2: steps 1-3 are epoch 0, step 4 epoch 1)."""
    method = naive(max_train_steps=4, random_flip=True, cache_encodings=cached, checkpointing_steps=100)
    seen: dict = {"epochs": []}
    method.bind_dataset = lambda ds: seen.setdefault("ds", ds)
    plain_loss = method.loss

    def loss(models, batch, g):
        seen["epochs"].append(seen["ds"].epoch)
        return plain_loss(models, batch, g)

    method.loss = loss
    run(method, toy, tmp_path / "run")
    assert seen["epochs"] == [0, 0, 0, 1]


def test_bad_data_is_refused_before_any_model_loads(toy, tmp_path, cli, monkeypatch):
    import shutil

    import spfbench.models

    monkeypatch.setattr(spfbench.models, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    broken = tmp_path / "broken"
    shutil.copytree(toy, broken)
    png = sorted(broken.rglob("*.png"))[0]
    png.write_bytes(png.read_bytes()[:100])
    code, _, err = cli("train", "--method", "naive", "--data", broken, "--out", tmp_path / "o", "--preset", "tiny")
    assert code == 2 and png.name in err and "\n" not in err.strip()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    code, _, err = cli("train", "--method", "naive", "--data", empty, "--out", tmp_path / "o", "--preset", "tiny")
    assert code == 2 and "empty" in err.lower()
    assert not (tmp_path / "o").exists()


def test_loop_options_bf16_accumulation_ema_and_checkpointing_run_and_load(toy, tmp_path):
    cfg = {"mixed_precision": "bf16", "gradient_accumulation_steps": 2, "use_ema": True, "ema_decay": 0.5,
           "gradient_checkpointing": True, "max_train_steps": 2, "train_batch_size": 1}
    r = run(trainers.create("naive", cfg), toy, tmp_path / "run")
    assert r.steps == 2 and len(r.losses) == 4  # two micro-batches per optimizer step
    ckpt = Trainer(naive(), toy, tmp_path / "run").checkpoints()[-1][1]
    assert (ckpt / "ema.pt").is_file()
    ema = torch.load(ckpt / "ema.pt", weights_only=True)
    trained = unet_state(tmp_path / "run")
    base, _ = load_pipeline("tiny", device="cpu")
    # the artifact holds the EMA weights: between the base and the last trained weights, equal to neither
    key = next(k for k in trained if k.endswith("attn2.to_k.weight"))
    from safetensors.torch import load_file

    live = load_file(ckpt / "trainable.safetensors")  # the checkpoint holds the live (non-averaged) weights
    assert not torch.equal(trained[key], base.unet.state_dict()[key]) and not torch.equal(trained[key], live[key])
    assert ema["optimization_step"] == 2
    fresh, _ = load_pipeline("tiny", device="cpu")
    trainers.load_artifact(r.artifact, fresh)
    img = generate(fresh, ["A man, a hat"], [1], GenerationSettings(steps=2), output_type="np")
    assert img.shape == (1, 64, 64, 3)


def test_speed_levers_train_like_the_default_within_tolerance(toy, tmp_path, monkeypatch):
    """docs/training.md "Speed levers": fused AdamW and channels-last change the arithmetic's order only
    (losses within rel 1e-4 over 4 steps); DataLoader workers change nothing (identical losses), and a
    finished run is reused across a change of workers (a speed-only field); compile_unet compiles the UNet
    in place (its parameter names stay the plain UNet's); TF32 is switched on for CUDA only and restored."""
    base = run(naive(), toy, tmp_path / "base")
    for field, value in (("fused_adamw", True), ("channels_last", True)):
        other = run(naive(**{field: value}), toy, tmp_path / field)
        assert other.losses == pytest.approx(base.losses, rel=1e-4, abs=1e-6), field
    workers = run(naive(dataloader_num_workers=2), toy, tmp_path / "workers")
    assert workers.losses == base.losses
    again = run(naive(dataloader_num_workers=0), toy, tmp_path / "workers")
    assert again.reused
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    run(naive(compile_unet=True, allow_tf32=True), toy, tmp_path / "compiled")
    assert compiled == ["UNet2DConditionModel"]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32
    assert set(unet_state(tmp_path / "compiled")) == set(unet_state(tmp_path / "base"))
    with pytest.raises(Exception, match="dataloader_num_workers"):
        naive(dataloader_num_workers=-1)


def test_report_to_tensorboard_logs_every_number_and_validation_images_without_changing_training(toy, tmp_path):
    """accelerate's TensorBoard tracker gets the loss, the learning rate and every loss part at every logged
    step, and the validation images at their steps (read back from the event file); the same run without
    trackers or validation trains identically (they change no result, and a finished run is reused)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain = run(naive(), toy, tmp_path / "plain")
    tracked = run(naive(report_to="tensorboard", validation_every=2, validation_steps=2,
                        validation_prompts=["A woman, smiling, a hat", "A man, glasses"]), toy, tmp_path / "tb")
    assert tracked.losses == plain.losses
    events = list((tmp_path / "tb" / "trackers").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx(plain.losses, rel=1e-6)
    logged = {k for line in (tmp_path / "tb" / "log.jsonl").read_text().splitlines() for k in json.loads(line)} - {"step"}
    assert {"loss", "lr"} <= logged and logged <= set(acc.Tags()["scalars"])  # every number of the JSONL log
    images = acc.Images("validation")
    assert sorted({e.step for e in images}) == [2, 4]
    assert sorted(p.name for p in (tmp_path / "tb" / "validation").iterdir()) == ["step-000002", "step-000004"]
    assert len(list((tmp_path / "tb" / "validation" / "step-000004").glob("*.png"))) == 2
    again = run(naive(report_to="none"), toy, tmp_path / "tb")  # trackers are not part of what was trained
    assert again.reused
    with pytest.raises(Exception, match="report_to"):
        naive(report_to="mlflow")
    with pytest.raises(Exception, match="validation_prompts"):
        naive(validation_prompts=[])


def test_report_to_wandb_offline(toy, tmp_path, monkeypatch):
    """wandb (an optional extra) in offline mode: the run writes its offline run folder with the history."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(naive(max_train_steps=2, report_to="wandb"), toy, tmp_path / "wb")
    runs = list((tmp_path / "wb" / "trackers").rglob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))
