"""The one training loop every method shares (accelerate; DDP under ``accelerate launch``).

Run folder::

    OUT/run.json                     identity of the run: method, config, base model, data fingerprint
    OUT/log.jsonl                    one line per logged optimizer step (step, loss, lr, method numbers)
    OUT/checkpoints/checkpoint-N/    trainable weights (+ EMA) as safetensors, optimizer and LR scheduler
                                     state (torch.save of tensors and numbers; read with weights_only=True)
    OUT/artifact/                    method.json + the method's trained weights

Exact resume: the data order of epoch e is a permutation drawn from (seed, e); the noise, timesteps and
VAE samples of micro-batch m of optimizer step s (process r) come from a generator seeded by
(seed, s, m, r). A run resumed from checkpoint N therefore skips the batches already seen and continues
bit-for-bit as the uninterrupted run would. A non-finite loss stops the run with a clear message and
leaves the last good checkpoint untouched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spfbench.data import location as data_location
from spfbench.engine import atomic_save_safetensors, atomic_torch_save
from spfbench.errors import SpfbenchError
from spfbench.io import atomic_write_json

from .base import ARTIFACT_META, Models, TrainedMethod

FORMAT_VERSION = 1
# config fields that may change between a run and its resumption (how long, how often, how logged)
RESUMABLE_CHANGES = {"max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "log_every"}
# fields that change how fast, never what is computed: a run resumes and a finished one is reused across them
SPEED_ONLY = {"dataloader_num_workers", "report_to", "validation_every", "validation_prompts", "validation_steps",
              "validation_guidance"}


class TrainingDiverged(SpfbenchError):
    pass


@dataclass
class TrainResult:
    out: Path
    artifact: Path
    steps: int
    resumed_from: int | None
    losses: list[float]
    reused: bool = False  # the folder already held this finished run: nothing was loaded or trained


def seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class EpochSampler(torch.utils.data.Sampler):
    """Epoch e visits the items in a permutation drawn from (seed, e): the order survives a restart."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(seed_of(self.seed, "epoch", self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    atomic_save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata)


class Trainer:
    def __init__(
        self,
        method: TrainedMethod,
        data: str | Path,
        out: str | Path,
        *,
        preset: str = "realistic-vision-v4",
        model: str | None = None,
        vae: str | None = None,
        weights_seed: int = 0,
        device: str | None = None,
    ):
        from spfbench import validate

        self.method, self.data, self.out = method, Path(data), Path(out)
        validate.output_folder(self.out)
        validate.device(device, launcher=True)
        self.cfg = method.config
        self.model_kwargs = {"preset": preset, "model": model, "vae": vae, "seed": weights_seed}
        self.device = device

    # -- identity of a run: a rerun resumes only if these match ------------------------------------
    def identity(self, model_info: dict, fingerprint: str) -> dict:
        resumable = (set(RESUMABLE_CHANGES) | SPEED_ONLY) - set(self.method.schedule_fields)
        if self.cfg.lr_scheduler not in ("constant", "constant_with_warmup"):
            resumable.discard("max_train_steps")  # the learning-rate schedule is laid out over it
        cfg = {k: v for k, v in self.cfg.to_dict().items() if k not in resumable}
        return {"format_version": FORMAT_VERSION, "method": self.method.name, "config": cfg, "model": model_info,
                "data_fingerprint": fingerprint}

    def _check_run_folder(self, identity: dict) -> None:
        path = self.out / "run.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("identity") != identity:
                what = [k for k in identity if old.get("identity", {}).get(k) != identity[k]]
                raise SpfbenchError(
                    f"{self.out} holds a run of a different {', '.join(what)} (method {old.get('identity', {}).get('method')});"
                    " use another --out (nothing was changed)"
                )

    def request(self, fingerprint: str) -> dict:
        """What was asked of a run, known before any model loads: a finished run with the same request
        is reused as it is (``spfbench run`` reuses artifacts whose config and data match)."""
        config = {k: v for k, v in self.cfg.to_dict().items() if k not in SPEED_ONLY}
        return {"format_version": FORMAT_VERSION, "method": self.method.name, "config": config,
                "model": self.model_kwargs, "data_fingerprint": fingerprint}

    def finished(self, fingerprint: str) -> TrainResult | None:
        path, artifact = self.out / "run.json", self.out / "artifact"
        if not path.is_file() or not (artifact / ARTIFACT_META).is_file():
            return None
        record = json.loads(path.read_text())
        if record.get("status") != "complete" or record.get("request") != self.request(fingerprint):
            return None
        return TrainResult(self.out, artifact, int(record["steps"]), int(record["steps"]), [], reused=True)

    def checkpoints(self) -> list[tuple[int, Path]]:
        folder = self.out / "checkpoints"
        found = []
        for p in folder.glob("checkpoint-*") if folder.is_dir() else []:
            if (p / "state.json").is_file() and p.name.split("-")[-1].isdigit():
                found.append((int(p.name.split("-")[-1]), p))
        return sorted(found)

    def _validate(self, pipe, accelerator, prompts: list[str], step: int) -> None:
        """Images of the validation prompts with the model as trained so far (fixed seeds ``seed + i``), to
        ``OUT/validation/step-N/I.png`` and to the trackers. Nothing it does reaches the training: the images
        are drawn from their own seeded generators, the UNet goes back to train mode."""
        import numpy as np

        from spfbench.generation import GenerationSettings, generate
        from spfbench.io import atomic_write_bytes, encode_png

        cfg = self.cfg
        unet = pipe.unet
        was_training = unet.training
        unet.eval()
        try:
            with accelerator.autocast():
                images = generate(pipe, list(prompts), [cfg.seed + i for i in range(len(prompts))],
                                  GenerationSettings(steps=cfg.validation_steps, guidance_scale=cfg.validation_guidance))
        finally:
            unet.train(was_training)
        folder = self.out / "validation" / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            atomic_write_bytes(folder / f"{i}.png", encode_png(img))
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(im, caption=p) for im, p in zip(images, prompts)]}, step=step)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> TrainResult:
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler
        from tqdm.auto import tqdm

        from spfbench.data import PortraitDataset, collate, dataset_fingerprint
        from spfbench.models import load_pipeline

        cfg = self.cfg
        fingerprint = dataset_fingerprint(self.data)  # validates the data first: bad input fails before any model loads
        done = self.finished(fingerprint)
        if done is not None:
            return done
        # One process may train several methods in turn (``spfbench run``), each with its own precision and
        # accumulation: forget the previous accelerator's settings, keep the process group (PartialState).
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        log_with = None if cfg.report_to == "none" else cfg.report_to
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            cpu=self.device == "cpu",
            **({"log_with": log_with, "project_dir": str(self.out / "trackers")} if log_with else {}),
        )
        weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]

        pipe, info = load_pipeline(device=accelerator.device, dtype=torch.float32, **self.model_kwargs)
        identity = self.identity(info.to_dict(), fingerprint)
        self._check_run_folder(identity)
        resolution = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        dataset = PortraitDataset(self.data, resolution=resolution, random_flip=cfg.random_flip, seed=cfg.seed)
        self.method.bind_dataset(dataset)

        models, params = training_models(pipe, info.preset, self.method)
        if not params:
            raise SpfbenchError(f"method {self.method.name} left nothing to train")
        if cfg.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
        if cfg.channels_last:
            models.unet.to(memory_format=torch.channels_last)
        datasets = [dataset]  # the one the method holds (bind_dataset) and, when cached, the one the loader reads
        if cfg.cache_encodings:
            dataset = self._cached(dataset, models, info, accelerator, progress)
            datasets.append(dataset)

        sampler = EpochSampler(len(dataset), cfg.seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train_batch_size, sampler=sampler, collate_fn=collate, drop_last=False,
                                             num_workers=cfg.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda")
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
                                      **({"fused": True} if cfg.fused_adamw else {}))
        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                     num_training_steps=cfg.max_train_steps * accelerator.num_processes)
        ema = None
        if cfg.use_ema:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(params, decay=cfg.ema_decay)
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(models.unet, optimizer, loader, lr_scheduler)
        models.unet = unet
        if cfg.compile_unet:  # in place: parameter names and state dicts stay the plain UNet's
            accelerator.unwrap_model(models.unet).compile()
        if ema is not None:
            ema.to(accelerator.device)

        # resume from the newest complete checkpoint
        step, resumed_from = 0, None
        ckpts = self.checkpoints()
        if ckpts:
            resumed_from, path = ckpts[-1]
            step = self._load_checkpoint(path, models, optimizer, lr_scheduler, ema, identity)
        if accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / "run.json", {"identity": identity, "config": cfg.to_dict(), "status": "running"})
        if log_with:
            accelerator.init_trackers(self.method.name, config=_tracker_config(cfg),
                                      init_kwargs={"wandb": {"dir": str(self.out / "trackers")}})
        validation_prompts = cfg.validation_prompts or [r.caption for r in dataset.records[:4]]

        batches_per_epoch = len(loader)
        micro = cfg.gradient_accumulation_steps
        losses: list[float] = []
        bar = tqdm(total=cfg.max_train_steps, initial=step, desc=f"train {self.method.name}", disable=not (progress and accelerator.is_main_process))
        done_micro = step * micro
        epoch, skip = divmod(done_micro, batches_per_epoch)
        log = open(self.out / "log.jsonl", "a") if accelerator.is_main_process else None
        t_last = time.perf_counter()
        tf32_before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        if cfg.allow_tf32 and accelerator.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            while step < cfg.max_train_steps:
                epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
                # accelerate's loaders set their sampler's epoch from their own iteration count when
                # iterated: give them the true epoch (a resumed run's loaders start counting at 0)
                epoch_loader.set_epoch(epoch)
                sampler.set_epoch(epoch)
                for d in datasets:  # flips (random_flip) are drawn per (seed, epoch, item), in both alike
                    d.set_epoch(epoch)
                skip = 0
                m_index = 0
                for batch in epoch_loader:
                    gen_device = accelerator.device if accelerator.device.type == "cuda" else torch.device("cpu")
                    g = torch.Generator(gen_device).manual_seed(seed_of(cfg.seed, "step", step, m_index % micro, accelerator.process_index))
                    with accelerator.accumulate(models.unet):
                        loss, numbers = self.method.loss(models, batch, g)
                        if not torch.isfinite(loss.detach()).all():
                            last = self.checkpoints()
                            raise TrainingDiverged(
                                f"{self.method.name}: the loss is {loss.item()} at step {step + 1}; stopped. Last good checkpoint:"
                                f" {last[-1][1] if last else 'none'} (lower the learning rate or use bf16/fp32, then rerun to resume)"
                            )
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            if cfg.max_grad_norm:
                                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                            self.method.after_backward(models, step)
                        optimizer.step()
                        lr_scheduler.step()
                        if accelerator.sync_gradients:
                            self.method.after_step(models, step)
                        optimizer.zero_grad(set_to_none=True)
                    m_index += 1
                    losses.append(loss.detach().item())
                    if not accelerator.sync_gradients:
                        continue
                    step += 1
                    if ema is not None:
                        ema.step(params)
                    bar.update(1)
                    if log is not None and step % cfg.log_every == 0:
                        now = time.perf_counter()
                        entry = {"step": step, "loss": losses[-1], "lr": lr_scheduler.get_last_lr()[0],
                                 "seconds": round(now - t_last, 4), **numbers}
                        log.write(json.dumps(entry) + "\n")
                        log.flush()
                        t_last = now
                        if log_with:
                            accelerator.log({k: v for k, v in entry.items() if k != "step" and isinstance(v, (int, float))}, step=step)
                    if cfg.validation_every and step % cfg.validation_every == 0 and accelerator.is_main_process:
                        self._validate(pipe, accelerator, validation_prompts, step)
                    if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
                        self._save_checkpoint(step, models, optimizer, lr_scheduler, ema, identity, accelerator)
                    if step >= cfg.max_train_steps:
                        break
                epoch += 1
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_before
            if log_with:
                accelerator.end_training()
            bar.close()
            if log is not None:
                log.close()

        accelerator.wait_for_everyone()
        artifact = self.out / "artifact"
        if accelerator.is_main_process:
            unwrapped = Models(accelerator.unwrap_model(models.unet), models.vae, models.text_encoder, models.tokenizer,
                               models.noise_scheduler, weight_dtype, models.extra)
            if ema is not None:
                ema.copy_to(params)
            tmp = self.out / ".artifact.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self.method.save_artifact(unwrapped, tmp)
            atomic_write_json(tmp / ARTIFACT_META, {"method": self.method.name, "config": cfg.to_dict(), "steps": step,
                                                     "model": info.to_dict(), "data": data_location(self.data),
                                                     "data_fingerprint": fingerprint, "notes": self.method.training_notes()})
            shutil.rmtree(artifact, ignore_errors=True)
            tmp.rename(artifact)
            atomic_write_json(self.out / "run.json", {"identity": identity, "config": cfg.to_dict(), "status": "complete", "steps": step,
                                                      "request": self.request(fingerprint)})
        accelerator.wait_for_everyone()
        return TrainResult(self.out, artifact, step, resumed_from, losses)

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save_checkpoint(self, step, models, optimizer, lr_scheduler, ema, identity, accelerator) -> None:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        unwrapped = Models(accelerator.unwrap_model(models.unet), models.vae, models.text_encoder, models.tokenizer,
                           models.noise_scheduler, models.weight_dtype, models.extra)
        folder = self.out / "checkpoints"
        tmp = folder / f".checkpoint-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _save_tensors(tmp / "trainable.safetensors", self.method.trainable_state(unwrapped))
        atomic_torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        atomic_torch_save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        if ema is not None:
            atomic_torch_save(ema.state_dict(), tmp / "ema.pt")
        atomic_write_json(tmp / "state.json", {"step": step, "identity": identity})
        final = folder / f"checkpoint-{step}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        limit = self.cfg.checkpoints_total_limit
        if limit:
            for _, old in self.checkpoints()[:-limit]:
                shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, path: Path, models, optimizer, lr_scheduler, ema, identity) -> int:
        from safetensors.torch import load_file

        state = json.loads((path / "state.json").read_text())
        if state.get("identity") != identity:
            raise SpfbenchError(f"checkpoint {path} belongs to a different run (method, config, model or data); use another --out")
        self.method.load_trainable_state(_unwrap(models), load_file(path / "trainable.safetensors", device=str(models.device)))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", map_location="cpu", weights_only=True))
        if ema is not None and (path / "ema.pt").is_file():
            ema.load_state_dict(torch.load(path / "ema.pt", map_location="cpu", weights_only=True))
        return int(state["step"])

    def _cached(self, dataset, models, info, accelerator, progress):
        # the main process computes the cache; the others then open what it wrote
        if accelerator.is_main_process:
            build_encoding_cache(dataset, models, self.method, self.out / "cache", model=info.to_dict(), progress=progress)
        accelerator.wait_for_everyone()
        return build_encoding_cache(dataset, models, self.method, self.out / "cache", model=info.to_dict(), progress=False)


def encoding_cache_key(dataset, models: Models, method: TrainedMethod, model: dict) -> str:
    """The ``model_key`` of the loop's encoding cache: the base model's identity, the compute dtype, the
    resolution and, when the method stores per-item constants (``TrainedMethod.encoding_extras``), their key."""
    spec = {"model": model, "dtype": str(models.weight_dtype), "resolution": dataset.resolution}
    extras = method.encoding_extras(models)
    if extras is not None:
        spec["extras"] = {"method": method.name, "key": extras.key}
    return json.dumps(spec, sort_keys=True)


def build_encoding_cache(dataset, models: Models, method: TrainedMethod, cache_dir: Path, *, model: dict, progress: bool = True):
    """``TrainConfig.cache_encodings``: the VAE posterior (mean, std) of every item (and of its flip with
    random_flip), the complete caption's encoding, and the method's ``encoding_extras``, computed once into
    ``cache_dir`` (:func:`spfbench.data.cache_encodings`; reused when present). Returns the
    :class:`spfbench.data.CachedDataset`."""
    from spfbench.data import cache_encodings

    from .base import encode_text as enc

    extras = method.encoding_extras(models)
    reserved = {"latent_mean", "latent_std"}

    def encode_image(pixels):  # the latent distribution: training samples from it as without the cache
        with torch.no_grad():
            dist = models.vae.encode(pixels.to(models.device, models.weight_dtype)).latent_dist
        out = {"latent_mean": dist.mean.float(), "latent_std": dist.std.float()}
        if extras is not None and extras.image is not None:
            more = extras.image(pixels)
            if reserved & set(more):
                raise SpfbenchError(f"{method.name}: encoding_extras returns {', '.join(sorted(reserved & set(more)))}, a loop key")
            out.update(more)
        return out

    def encode_text(captions):
        return enc(models, captions).float()

    key = encoding_cache_key(dataset, models, method, model)
    record = extras.record if extras is not None else None
    return cache_encodings(dataset, encode_image, encode_text, cache_dir, model_key=key, progress=progress, encode_record=record)


def _unwrap(models: Models) -> Models:
    unet = getattr(models.unet, "module", models.unet)
    return Models(unet, models.vae, models.text_encoder, models.tokenizer, models.noise_scheduler, models.weight_dtype, models.extra, models.preset)


def _tracker_config(cfg) -> dict:
    """The config as trackers take it (scalars only; lists as text)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in cfg.to_dict().items()}


WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # mixed_precision -> compute dtype


def training_models(pipe, preset: str | None, method: TrainedMethod, *, keep_caller_rng: bool = False) -> tuple[Models, list]:
    """The loop's set-up of a freshly loaded pipeline for ``method``: :class:`Models` in the run's compute dtype
    (``mixed_precision``), VAE and text encoder frozen and cast to it (as diffusers' examples), then
    ``method.setup`` under the run's seed (adapters' random initialisations depend on it only). Returns the
    models and the parameters to train. ``keep_caller_rng``: seed inside a forked RNG (a caller that is not
    the training loop, e.g. turning a checkpoint into an artifact, keeps its own random streams)."""
    from accelerate.utils import set_seed

    weight_dtype = WEIGHT_DTYPES[method.config.mixed_precision]
    models = Models(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, training_scheduler(pipe), weight_dtype,
                    preset=preset)
    models.vae.requires_grad_(False)
    models.text_encoder.requires_grad_(False)
    for frozen in (models.vae, models.text_encoder):
        torch.nn.Module.to(frozen, dtype=weight_dtype)
    devices = [models.device] if models.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=keep_caller_rng):
        set_seed(method.config.seed)
        params = method.setup(models)
    return models, params


def training_scheduler(pipe):
    """The DDPM noise schedule of the model's own scheduler config (betas, prediction type)."""
    from diffusers import DDPMScheduler

    from spfbench.generation import model_scheduler_config

    return DDPMScheduler.from_config(model_scheduler_config(pipe))
