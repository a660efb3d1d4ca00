"""The interface every customization method implements, and what they share.

A method (:class:`Method`) is a name, a config dataclass of its hyper-parameters (saved beside its artifact,
like peft's configs), ``fit`` (data -> artifact folder) and the artifact side below. A method the one training
loop (:mod:`trainers.loop`) trains is a :class:`TrainedMethod`, with these hooks (``original``, which trains
nothing, has none):

* ``setup(models)``: freeze what stays fixed, add adapters, and return the parameters to train;
* ``loss(models, batch, generator)``: the training loss of one micro-batch (and numbers to log);
* ``after_backward(models, step)`` / ``after_step(models, step)``: work on optimizer-sync steps after
  ``backward`` (before the optimizer step) and after the optimizer step (before ``zero_grad``: AdaLoRA's
  rank allocation); nothing by default;
* ``trainable_state(models)`` / ``load_trainable_state(models, state)``: what a checkpoint stores;
* ``encoding_extras(models)``: per-item constants the encoding cache stores for the method (optional).

and three for the artifact: ``save_artifact(models, folder)``, ``apply_artifact(pipe, folder, config)``, which
loads the trained weights into a pipeline, and ``generate_images(pipe, triples, settings, config)``, the
customized images (and notes) through the foundation's :func:`spfbench.generation.generate` (same seed and
noise, the complete caption, unless a method conditions differently). :func:`trainers.load_artifact` wraps
the three in an :class:`Artifact` object, the one thing generation code holds.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, NamedTuple

import torch

from spfbench.errors import SpfbenchError

ARTIFACT_META = "method.json"
REPORT_TO = ("none", "tensorboard", "wandb")


@dataclass
class TrainConfig:
    """Hyper-parameters of the shared loop; each method's config extends it with its own."""

    learning_rate: float = 1e-5
    lr_scheduler: str = "constant"  # diffusers.optimization.get_scheduler names
    lr_warmup_steps: int = 0
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000  # optimizer steps
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    use_ema: bool = False
    ema_decay: float = 0.9999
    seed: int = 0
    resolution: int | None = None  # None: the model's native size
    random_flip: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 2
    cache_encodings: bool = False  # VAE latents and text embeddings computed once (frozen VAE/text encoder only)
    log_every: int = 1
    # speed levers (issue 23; docs/training.md "Speed levers": each measured by benchmarks/bench_levers.py, off
    # by default until measured to help without changing results beyond the documented tolerance)
    allow_tf32: bool = False  # CUDA: TF32 matmuls and convolutions while training (restored after); no effect on CPU
    fused_adamw: bool = False  # torch's fused AdamW kernel (CUDA and CPU) instead of the foreach one
    channels_last: bool = False  # the UNet's convolutions in channels-last memory format
    compile_unet: bool = False  # torch.compile the UNet's forward (nn.Module.compile; first steps pay compilation)
    dataloader_num_workers: int = 0  # worker processes decoding the batches (pinned memory on CUDA); results unchanged
    # training visibility (docs/training.md "Trackers and validation images"); none of these changes a result
    report_to: str = "none"  # none | tensorboard | wandb: accelerate's trackers get every logged number
    validation_every: int = 0  # every N optimizer steps, images of the validation prompts (0: never)
    validation_prompts: list[str] | None = None  # None: the first 4 complete captions of the training set
    validation_steps: int = 25  # sampler steps of the validation images
    validation_guidance: float = 7.0  # their classifier-free guidance

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SpfbenchError(f"{source}: unknown option(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(sorted(known))}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise SpfbenchError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps", "log_every"):
            if getattr(self, name) < 1:
                raise SpfbenchError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dataloader_num_workers < 0:
            raise SpfbenchError(f"dataloader_num_workers must be 0 or more, got {self.dataloader_num_workers}")
        if self.report_to not in REPORT_TO:
            raise SpfbenchError(f"report_to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if self.validation_every < 0 or self.validation_steps < 1:
            raise SpfbenchError("validation_every must be 0 (off) or more and validation_steps at least 1")
        if self.validation_prompts is not None and (not isinstance(self.validation_prompts, list) or not self.validation_prompts
                                                    or not all(isinstance(p, str) and p.strip() for p in self.validation_prompts)):
            raise SpfbenchError("validation_prompts must be a non-empty list of non-empty strings (or null: the data's first captions)")
        if self.learning_rate <= 0:
            raise SpfbenchError(f"learning_rate must be positive, got {self.learning_rate}")


class EncodingExtras(NamedTuple):
    """Per-item constants a method adds to the encoding cache (``TrainConfig.cache_encodings``), beside
    the VAE posterior and the complete caption's encoding: computed once per item when the cache is built
    and then found in every batch under their keys (the method's ``loss`` reads them when present)."""

    # what the tensors depend on (the models that compute them, a version): part of the cache's model key,
    # so another CLIP or text encoder gets a fresh cache
    key: str
    # pixel_values (B, 3, R, R) float32 on CPU -> {name: tensor (B, ...)}; with random_flip also run on the
    # flipped pixels (the batch then holds the variant of the item's flip, as for the latents)
    image: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None
    # the items' records (spfbench.data.PortraitRecord: base_caption, target_text, ...) -> {name: tensor (B, ...)}
    record: Callable[[list], dict[str, torch.Tensor]] | None = None


@dataclass
class Models:
    """The pipeline's parts the loop and the methods work on. ``unet`` is what the optimizer trains
    (possibly wrapped by accelerate); ``vae`` and ``text_encoder`` stay frozen unless a method says
    otherwise."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    weight_dtype: torch.dtype = torch.float32
    extra: dict = field(default_factory=dict)  # method-owned modules (e.g. SPF's frozen reference UNet)
    preset: str | None = None  # the base model's preset (spfbench.models), when known

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


class Method(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type[TrainConfig]] = TrainConfig
    # config fields a resumed run may not change because the method's schedule depends on them
    schedule_fields: ClassVar[tuple[str, ...]] = ()
    # config field -> method whose artifact folder fills it when it is unset: ``spfbench run`` fits that
    # method first (once, shared with its own Table 1 row) and passes its artifact (SPF's stage 1: naive)
    requires: ClassVar[dict[str, str]] = {}

    def __init__(self, config: TrainConfig | None = None):
        self.config = config or self.Config()
        self.config.validate()

    @classmethod
    @abstractmethod
    def fit(cls, config: dict, data, out: Path, *, progress: bool = True, source: str = "config", **trainer_kwargs) -> Path:
        """Fit into the run folder ``out`` (resumed or reused when it already holds this run) and return the
        artifact folder (``method.json`` plus whatever :meth:`apply_artifact` reads)."""

    # -- artifact ---------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def apply_artifact(cls, pipe, folder: Path, config: TrainConfig) -> None:
        """Load the trained weights of ``folder`` into ``pipe`` (a freshly loaded base pipeline)."""

    @classmethod
    def generate_images(cls, pipe, triples, settings, config: TrainConfig) -> tuple[list, list[dict] | None]:
        """The customized images of ``triples`` and, when a method has something to say, a note per triple (Magnet:
        which object/attribute pairs it edited or why it fell back; ``None``: nothing). Default: the complete
        caption, each triple's own seed. ``config``: the artifact's (what a method needs at generation time)."""
        from spfbench.generation import generate

        return generate(pipe, [t.target_caption for t in triples], [t.seed for t in triples], settings), None


class TrainedMethod(Method):
    """A method the shared loop (:mod:`trainers.loop`) trains: its hooks, and ``fit`` through the loop."""

    @classmethod
    def fit(cls, config: dict, data, out: Path, *, progress: bool = True, source: str = "config", **trainer_kwargs) -> Path:
        """Train on ``data`` into the run folder ``out`` (resumed or reused when it already holds this run)
        and return the artifact folder. ``trainer_kwargs`` go to :class:`trainers.loop.Trainer` (preset,
        model, vae, weights_seed, device). Methods that fit differently (a rank sweep, no training) override."""
        from .loop import Trainer

        method = cls(cls.Config.from_dict(dict(config), source=source))
        return Trainer(method, data, out, **trainer_kwargs).run(progress=progress).artifact

    # -- training hooks ---------------------------------------------------------------------------
    def bind_dataset(self, dataset) -> None:
        """The loop hands over the training set (a :class:`spfbench.data.PortraitDataset`) before
        ``setup``: methods that read more than the batch (TokenCompose's masks) keep it."""

    @abstractmethod
    def setup(self, models: Models) -> list[torch.nn.Parameter]:
        """Freeze what stays fixed, add adapters; return the parameters the optimizer trains."""

    def training_notes(self) -> list[str]:
        """What a reader of the results must know about this fit (a loss that never applied, a fallback),
        one line each; recorded in the artifact's ``method.json`` and shown beside the method's Table 1 row."""
        return []

    def loss(self, models: Models, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Default: the diffusion loss on the complete captions."""
        latents, text = encode_batch(models, batch, generator)
        loss = diffusion_loss(models, latents, text, generator)
        return loss, {"loss_diffusion": loss.detach().item()}

    def encoding_extras(self, models: Models) -> EncodingExtras | None:
        """Per-item constants for the encoding cache (called after ``setup``, only with ``cache_encodings``);
        None (default): the cache holds the latents and the complete caption's encoding only."""
        return None

    def after_backward(self, models: Models, step: int) -> None:
        """Called on optimizer-sync steps after ``backward`` and gradient clipping, before ``optimizer.step``."""

    def after_step(self, models: Models, step: int) -> None:
        """Called on optimizer-sync steps after ``optimizer.step``, before ``zero_grad`` (``step``: 0-based
        index of the step just taken); peft's AdaLoRA allocates ranks here."""

    @abstractmethod
    def trainable_state(self, models: Models) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must hold to resume exactly (the trained weights)."""

    @abstractmethod
    def load_trainable_state(self, models: Models, state: dict[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def save_artifact(self, models: Models, folder: Path) -> None:
        """Write the trained weights into ``folder`` (``method.json`` is written by the loop)."""



class Artifact:
    """A fitted method ready to generate: its weights applied to ``pipe`` (:func:`trainers.load_artifact`), its
    config, and ``generate(triples, settings) -> (images, notes)``. Everything generation needs lives here,
    never on the pipeline or the method class."""

    def __init__(self, method: type[Method], config: TrainConfig, pipe, folder: Path | None = None):
        self.method, self.config, self.pipe, self.folder = method, config, pipe, folder

    @property
    def name(self) -> str:
        return self.method.name

    @classmethod
    def load(cls, folder: Path, pipe, method: type[Method], meta: dict) -> "Artifact":
        """``method``'s artifact at ``folder`` (``meta``: its ``method.json``) applied to ``pipe``."""
        config = method.Config.from_dict(meta["config"], source=str(folder))
        method.apply_artifact(pipe, folder, config)
        return cls(method, config, pipe, folder)

    def generate(self, triples, settings) -> tuple[list, list[dict] | None]:
        images, notes = self.method.generate_images(self.pipe, triples, settings, self.config)
        if notes is not None and len(notes) != len(images):
            raise SpfbenchError(f"{self.name}: {len(notes)} generation notes for {len(images)} images")
        return images, notes


# -- shared pieces ----------------------------------------------------------------------------------


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids


def encode_text(models: Models, captions: list[str]) -> torch.Tensor:
    ids = tokenize(models.tokenizer, captions).to(models.device)
    with torch.no_grad():
        return models.text_encoder(ids)[0]


def encode_batch(models: Models, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE latents (scaled) and text embeddings of the complete captions, from the cache when present."""
    if "latent_mean" in batch:  # cached VAE encodings (TrainConfig.cache_encodings)
        mean, std = batch["latent_mean"].to(models.device), batch["latent_std"].to(models.device)
        noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean)
        latents = (mean + std * noise) * models.vae.config.scaling_factor
    else:
        pixels = batch["pixel_values"].to(models.device, models.weight_dtype)
        with torch.no_grad():
            dist = models.vae.encode(pixels).latent_dist
            latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator, device=generator.device).to(dist.mean)
        latents = latents.float() * models.vae.config.scaling_factor
    if "encoder_hidden_states" in batch:
        text = batch["encoder_hidden_states"].to(models.device)
    else:
        text = encode_text(models, batch["caption"])
    return latents, text


def diffusion_target(sched, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v_prediction)."""
    if sched.config.prediction_type == "epsilon":
        return noise
    if sched.config.prediction_type == "v_prediction":
        return sched.get_velocity(latents, noise, t)
    raise SpfbenchError(f"unsupported prediction type {sched.config.prediction_type!r} (epsilon or v_prediction)")


def diffusion_loss(models: Models, latents: torch.Tensor, text: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MSE between the UNet's prediction and the target of the scheduler's prediction type."""
    sched = models.noise_scheduler
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=generator.device)
    t = t.to(latents.device)
    noisy = sched.add_noise(latents, noise, t)
    target = diffusion_target(sched, latents, noise, t)
    pred = models.unet(noisy, t, text).sample
    return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")


def read_artifact_meta(folder: Path) -> dict:
    path = Path(folder) / ARTIFACT_META
    if not path.is_file():
        raise SpfbenchError(f"{folder} is not a method artifact ({ARTIFACT_META} missing)")
    return json.loads(path.read_text())


def write_untrained_artifact(method: str, config: TrainConfig, folder: Path) -> Path:
    """An artifact of a method that trains nothing (Magnet on a given UNet, the `original` row): only
    ``method.json``, written atomically."""
    from spfbench.io import atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / ARTIFACT_META, {"method": method, "config": config.to_dict(), "steps": 0})
    return folder
