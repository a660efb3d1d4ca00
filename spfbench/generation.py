"""The one generation function every part of spfbench uses (originals and customized images alike).

Noise contract (docs/testset.md): item i's initial latent is ``randn(1, C, H/f, W/f)`` drawn in
float32 on the CPU from ``torch.Generator("cpu").manual_seed(seed_i)``, then moved to the device
and dtype. It depends on the item's seed and the image size only: never on the batch size, the batch
neighbours or the device. Stochastic samplers (``euler-a``) draw their step noise from the same
per-item generator, continuing after the initial latent, so they keep the contract too. A
customized image and its original therefore start from identical noise.
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import asdict, dataclass

import torch

from .errors import SpfbenchError

# sampler name -> (diffusers scheduler class name, extra config). Built from the model's own
# scheduler config, so betas and prediction type stay the model's.
SAMPLERS: dict[str, tuple[str, dict]] = {
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False, "algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
}
PROTOCOL_SAMPLER = "dpmpp-2m-karras"  # the protocol's sampler (docs/testset.md), for every model it can sample


@dataclass(frozen=True)
class GenerationSettings:
    """How an image is sampled. Defaults follow Realistic Vision V4.0's model card (docs/testset.md)."""

    sampler: str | None = None  # None: the model's default (:func:`default_sampler`)
    steps: int = 25
    guidance_scale: float = 7.0
    height: int | None = None  # None: the model's native size
    width: int | None = None
    negative_prompt: str = ""

    def validate(self) -> "GenerationSettings":
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise SpfbenchError(f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if self.steps <= 0:
            raise SpfbenchError(f"steps must be positive, got {self.steps}")
        if not 0 <= self.guidance_scale < math.inf:  # <= 1 is no guidance (diffusers); below 0 means nothing
            raise SpfbenchError(f"guidance must be a finite number >= 0 (1 or less: no classifier-free guidance), got {self.guidance_scale}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v % 8):
                raise SpfbenchError(f"{name} must be a positive multiple of 8, got {v}")
        return self

    def resolved(self, native_size: int, scheduler_config) -> "GenerationSettings":
        """The same settings with the image size and the sampler filled in from the model: its native
        size and its own scheduler config (:func:`model_scheduler_config`)."""
        sampler = self.sampler or default_sampler(scheduler_config)
        return GenerationSettings(**{**asdict(self), "sampler": sampler, "height": self.height or native_size,
                                     "width": self.width or native_size})

    def to_dict(self) -> dict:
        return asdict(self)


def make_scheduler(base_config, sampler: str):
    import diffusers

    if sampler not in SAMPLERS:
        raise SpfbenchError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    cls_name, extra = SAMPLERS[sampler]
    cls = getattr(diffusers, cls_name)
    if base_config.get("rescale_betas_zero_snr"):
        def fits(c, e):  # Karras sigmas would start at sigma 4096 (a_T = 2**-24); diffusers 0.42's DPM-Solver steps past them
            return "rescale_betas_zero_snr" in inspect.signature(getattr(diffusers, c).__init__).parameters and not e.get("use_karras_sigmas")

        if not fits(cls_name, extra):
            ok = ", ".join(k for k, (c, e) in SAMPLERS.items() if fits(c, e))
            raise SpfbenchError(f"this model's noise schedule is rescaled to zero terminal SNR, which {sampler} ({cls_name}"
                                f"{' with Karras sigmas' if extra.get('use_karras_sigmas') else ''}) cannot sample; choose one of: {ok}")
    return cls.from_config(base_config, **extra)


def default_sampler(scheduler_config) -> str:
    """The sampler a model gets when none is named: the protocol's (:data:`PROTOCOL_SAMPLER`), or
    ``dpmpp-2m`` (trailing timesteps from the config) when its schedule is rescaled to zero terminal
    SNR, where Karras sigmas do not apply."""
    return "dpmpp-2m" if scheduler_config.get("rescale_betas_zero_snr") else PROTOCOL_SAMPLER


# pipeline -> (the model's own scheduler config, the sampler set): a memo keyed weakly by the pipeline, so nothing
# is stored on it and the entry goes with it
_SAMPLERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_scheduler_config(pipe):
    """The model's own scheduler config, whichever sampler :func:`use_sampler` has set since."""
    return _SAMPLERS[pipe][0] if pipe in _SAMPLERS else pipe.scheduler.config


def settings_for(pipe, settings: GenerationSettings) -> GenerationSettings:
    """``settings`` resolved against this pipeline: its native size and its own scheduler config."""
    return settings.resolved(pipe.unet.config.sample_size * pipe.vae_scale_factor, model_scheduler_config(pipe))


def use_sampler(pipe, sampler: str) -> None:
    """Set ``pipe.scheduler`` to ``sampler``, built from the model's scheduler config (kept aside once)."""
    if pipe in _SAMPLERS and _SAMPLERS[pipe][1] == sampler:
        return
    base = model_scheduler_config(pipe)
    pipe.scheduler = make_scheduler(base, sampler)
    _SAMPLERS[pipe] = (base, sampler)


def latent_shape(pipe, height: int, width: int) -> tuple[int, int, int]:
    f = pipe.vae_scale_factor
    return (pipe.unet.config.in_channels, height // f, width // f)


def noise_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed))


def initial_noise(seed: int, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Generator]:
    """Item noise ``(1, *shape)`` float32 on CPU, and its generator (positioned after the draw)."""
    g = noise_generator(seed)
    return torch.randn((1, *shape), generator=g, dtype=torch.float32), g


def generate(
    pipe,
    prompts: list[str] | None,
    seeds: list[int],
    settings: GenerationSettings,
    *,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    output_type: str = "pil",
):
    """Generate one image per (prompt, seed). Methods that condition differently pass ``prompt_embeds``.

    Returns a list of PIL images (``output_type="pil"``) or the pipeline's array output.
    """
    n = len(seeds)
    if prompts is not None and len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} seeds")
    if (prompts is None) == (prompt_embeds is None):
        raise ValueError("pass exactly one of prompts or prompt_embeds")
    settings.validate()
    s = settings_for(pipe, settings)
    use_sampler(pipe, s.sampler)
    shape = latent_shape(pipe, s.height, s.width)
    noises, generators = zip(*(initial_noise(seed, shape) for seed in seeds))
    latents = torch.cat(noises).to(device=pipe.device, dtype=pipe.unet.dtype)
    kwargs = {}
    if negative_prompt_embeds is None and s.negative_prompt:
        kwargs["negative_prompt"] = [s.negative_prompt] * n
    with torch.inference_mode():
        out = pipe(
            prompt=prompts,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            height=s.height,
            width=s.width,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance_scale,
            latents=latents,
            generator=list(generators),
            output_type=output_type,
            **kwargs,
        )
    return out.images
