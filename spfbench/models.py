"""Base text-to-image models: named presets that build a diffusers ``StableDiffusionPipeline``.

Every model has two lives (docs/models.md):

* real weights: ``realistic-vision-v4`` (the paper's base model, default) and ``sd15`` from their hub
  ids, or any local diffusers folder / single-file ``.safetensors`` checkpoint given as ``model=``.
  Components load one by one, so a missing file gives one error naming the component, its hub id
  and how to point at a local copy. With ``HF_HUB_OFFLINE=1`` nothing is downloaded.
* random weights built from the configs in ``spfbench/configs/``: ``tiny`` (64 px, CPU-fast, for
  tests) and ``sd15-random`` (the full SD1.5 architecture, for speed and memory work on a GPU).
  Weights are seeded, so the same seed gives the same model everywhere.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import MissingWeightsError, SpfbenchError

CONFIG_DIR = Path(__file__).parent / "configs"
WORLD_MODEL_DIR = Path(__file__).parent / "world" / "weights" / "model"  # Portrait World's original model (docs/world.md)
DEFAULT_PRESET = "realistic-vision-v4"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    repo_id: str | None = None  # real weights: hub id of the diffusers-layout repo
    vae_repo_id: str | None = None  # real weights: VAE taken from another repo (root folder)
    config: str | None = None  # random weights: folder under spfbench/configs/
    native_size: int = 512
    # the classifier-free guidance scale a command uses when none is given: the protocol's 7 (Realistic
    # Vision's card, docs/testset.md); the world's 3 (docs/world.md, "Guidance and the bar")
    guidance_scale: float = 7.0


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "realistic-vision-v4",
            "Realistic Vision V4.0 (SD1.5 fine-tune; the paper's base model) with the sd-vae-ft-mse VAE",
            repo_id="SG161222/Realistic_Vision_V4.0_noVAE",
            vae_repo_id="stabilityai/sd-vae-ft-mse",
        ),
        Preset("sd15", "Stable Diffusion v1.5", repo_id="stable-diffusion-v1-5/stable-diffusion-v1-5"),
        Preset("tiny", "tiny SD-shaped model, seeded random weights, 64 px (CPU tests)", config="tiny", native_size=64),
        Preset("sd15-random", "full SD1.5 architecture, seeded random weights (GPU speed/memory work)", config="sd15"),
        Preset("world", "Portrait World's original model: 64 px SD-architecture model trained on world renders", native_size=64,
               guidance_scale=3.0),
    ]
}

# The weight files each real preset needs: (component, repo, file, approximate size).
UNET_FILE = "diffusion_pytorch_model.safetensors"
REAL_FILES = {
    "realistic-vision-v4": [
        ("unet", "SG161222/Realistic_Vision_V4.0_noVAE", "unet/" + UNET_FILE, "3.44 GB"),
        ("text_encoder", "SG161222/Realistic_Vision_V4.0_noVAE", "text_encoder/model.safetensors", "492 MB"),
        ("vae", "stabilityai/sd-vae-ft-mse", UNET_FILE, "335 MB"),
    ],
    "sd15": [
        ("unet", "stable-diffusion-v1-5/stable-diffusion-v1-5", "unet/" + UNET_FILE, "3.44 GB"),
        ("text_encoder", "stable-diffusion-v1-5/stable-diffusion-v1-5", "text_encoder/model.safetensors", "492 MB"),
        ("vae", "stable-diffusion-v1-5/stable-diffusion-v1-5", "vae/" + UNET_FILE, "335 MB"),
    ],
}


SHORT_NAMES = {"realistic-vision-v4": "Realistic Vision V4.0", "sd15": "Stable Diffusion v1.5"}


@dataclass
class ModelInfo:
    """Where a pipeline's weights came from; recorded in every output that depends on them."""

    preset: str
    source: str  # hub id, local path, or "random-init"
    revision: str | None = None  # requested revision (hub) or None
    resolved_revision: str | None = None  # the hub snapshot actually loaded, when known
    vae_source: str | None = None
    seed: int | None = None  # random presets: the weight seed
    native_size: int = 512
    components: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SpfbenchError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SpfbenchError(f"bad --device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpfbenchError(f"--device {device} asked for, but no CUDA device is available here; use --device cpu")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise SpfbenchError(f"unknown --dtype {dtype!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def load_pipeline(
    preset: str = DEFAULT_PRESET,
    *,
    model: str | None = None,
    vae: str | None = None,
    revision: str | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
):
    """Build the ``StableDiffusionPipeline`` of a preset. Returns ``(pipe, ModelInfo)``.

    ``model`` (real presets only) overrides the weights: a hub id, a local diffusers folder, or a
    single-file ``.safetensors`` checkpoint. ``vae`` overrides the VAE (hub id or local folder).
    ``seed`` seeds the random weights of the ``tiny`` and ``sd15-random`` presets.
    """
    p = get_preset(preset)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    if p.name == "world":
        if vae:
            raise SpfbenchError("preset 'world' has its own VAE; --vae applies to the hub presets only")
        pipe, info = _world_pipeline(p, model)
    elif p.config is not None:
        if model or vae:
            raise SpfbenchError(f"preset {preset!r} has random weights; --model/--vae apply to real presets only")
        pipe, info = _random_pipeline(p, seed, dev)
    else:
        pipe, info = _real_pipeline(p, model, vae, revision)
    _move(pipe, dev, dt)
    pipe.set_progress_bar_config(disable=True)
    return pipe, info


def _move(pipe, device: torch.device, dtype: torch.dtype) -> None:
    # nn.Module.to rather than ModelMixin.to: the latter warns about fp32-kept modules even when that
    # list is empty (diffusers 0.42), and these models are never quantized.
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            torch.nn.Module.to(m, device=device, dtype=dtype)


# --------------------------------------------------------------------------- random weights


def random_components(config: str, seed: int, device: torch.device | str = "cpu") -> dict:
    """UNet, VAE and CLIP text encoder from ``spfbench/configs/<config>``, weights seeded by ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = CONFIG_DIR / config
    comps = {}
    # fork_rng: the caller's global RNG state is untouched. Each component has its own derived seed,
    # so adding a component never changes the others' weights.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        comps["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        torch.manual_seed(seed + 1)
        comps["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        torch.manual_seed(seed + 2)
        comps["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
    for m in comps.values():
        m.eval()
    return comps


def _random_pipeline(p: Preset, seed: int, device: torch.device):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from .clip_tokenizer import clip_tokenizer

    # The full SD1.5 size is initialised straight on the GPU when there is one (seconds, not minutes).
    init_device = device if (p.config == "sd15" and device.type == "cuda") else "cpu"
    comps = random_components(p.config, seed, init_device)
    scheduler = PNDMScheduler.from_pretrained(CONFIG_DIR / p.config / "scheduler")
    pipe = StableDiffusionPipeline(
        **comps,
        tokenizer=clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    info = ModelInfo(preset=p.name, source="random-init", seed=seed, native_size=p.native_size)
    info.components = {k: f"{p.config} config, seed {seed + i}" for i, k in enumerate(["unet", "vae", "text_encoder"])}
    return pipe, info


def _world_pipeline(p: Preset, model: str | None):
    """The shipped Portrait World model (or a folder trained the same way, ``--model``): a local diffusers folder."""
    folder = Path(model) if model else WORLD_MODEL_DIR
    if not (folder / "model_index.json").is_file():
        raise MissingWeightsError(
            f"missing weights: the Portrait World original model is not at {folder}; train it with"
            f" `spfbench world train-model --out {folder}` (docs/world.md, \"Original model\")"
        )
    return _real_pipeline(p, str(folder), None, None)


# --------------------------------------------------------------------------- real weights


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _missing(component: str, preset: str, where: str, detail: str, hub: bool) -> MissingWeightsError:
    if hub:
        how = (
            f"it is not in the Hugging Face cache"
            + (" and downloads are off (HF_HUB_OFFLINE=1)" if _offline() else " and could not be downloaded")
            + f"; fetch it where there is internet (`hf download {where.split(' ')[0]}`) and copy the cache"
            " (~/.cache/huggingface, or set HF_HOME), or pass --model PATH (a local diffusers folder or a"
            " single-file .safetensors checkpoint)"
        )
    else:
        how = "pass --model with a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a single-file .safetensors checkpoint"
    return MissingWeightsError(f"missing weights: {component} of {preset} ({where}): {detail}; {how}")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300].rstrip(". ")


def _load(cls, source: str, subfolder: str | None, revision: str | None, component: str, preset: str, hub: bool):
    where = f"{source} {subfolder or ''}".strip() if hub else str(Path(source) / (subfolder or ""))
    try:
        kw = {"subfolder": subfolder} if subfolder else {}
        if hub and revision:
            kw["revision"] = revision
        return cls.from_pretrained(source, **kw)
    except (OSError, ValueError) as e:
        raise _missing(component, preset, where, _first_line(e), hub) from None


def _resolved_revision(repo_id: str, revision: str | None) -> str | None:
    """The hub snapshot (commit) the cache holds for ``repo_id`` at ``revision``, as loaded."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "unet/config.json", revision=revision or "main")
    m = re.search(r"snapshots[/\\]([0-9a-f]{40})", hit) if isinstance(hit, str) else None
    return m.group(1) if m else None


def _real_pipeline(p: Preset, model: str | None, vae: str | None, revision: str | None):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = model or p.repo_id
    if model and Path(model).is_file():
        return _single_file_pipeline(p, Path(model), vae)
    local = Path(source).is_dir()
    if model and not local and (model.startswith((".", "/", "~")) or model.endswith((".safetensors", ".ckpt"))):
        raise SpfbenchError(f"--model {model!r}: no such file or folder")
    hub = not local
    rev = revision if hub else None
    comps = {
        "unet": _load(UNet2DConditionModel, source, "unet", rev, "UNet", p.name, hub),
        "text_encoder": _load(CLIPTextModel, source, "text_encoder", rev, "text encoder", p.name, hub),
        "tokenizer": _load(CLIPTokenizer, source, "tokenizer", rev, "tokenizer", p.name, hub),
    }
    _check_tokenizer(comps["tokenizer"], comps["text_encoder"], p.name, source)
    vae_source = vae or (None if model else p.vae_repo_id)
    if vae_source:
        vhub = not Path(vae_source).is_dir()
        comps["vae"] = _load(AutoencoderKL, vae_source, None, None, "VAE", p.name, vhub)
    else:
        comps["vae"] = _load(AutoencoderKL, source, "vae", rev, "VAE", p.name, hub)
    scheduler = _load_scheduler(source, rev, p.name, hub)
    pipe = StableDiffusionPipeline(
        **comps, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    info = ModelInfo(
        preset=p.name,
        source=str(Path(source).resolve()) if local else source,
        revision=rev,
        resolved_revision=_resolved_revision(source, rev) if hub else None,
        vae_source=vae_source,
        native_size=comps["unet"].config.sample_size * pipe.vae_scale_factor,
    )
    return pipe, info


def _load_scheduler(source: str, revision: str | None, preset: str, hub: bool):
    """The model's own scheduler config (betas, prediction type); the sampler is chosen at generation."""
    import diffusers

    config = _load(diffusers.DDPMScheduler, source, "scheduler", revision, "scheduler config", preset, hub).config
    cls = getattr(diffusers, config.get("_class_name", ""), diffusers.DDPMScheduler)
    return cls.from_config(config)


def _check_tokenizer(tokenizer, text_encoder, preset: str, source: str) -> None:
    # transformers 5 returns a 2-token CLIPTokenizer, without an error, when vocab.json/merges.txt are
    # missing: every word would become the same id. Refuse it instead.
    n, expected = len(tokenizer), text_encoder.config.vocab_size
    if n != expected:
        raise _missing(
            "tokenizer",
            preset,
            f"{source} tokenizer",
            f"the tokenizer has {n} tokens but the text encoder expects {expected} (vocab.json/merges.txt missing?)",
            hub=not Path(source).is_dir(),
        )


def _single_file_pipeline(p: Preset, path: Path, vae: str | None):
    """A single-file SD1.x checkpoint, converted by diffusers with our embedded SD1.5 configs (offline)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    from .clip_tokenizer import clip_tokenizer

    if path.suffix.lower() != ".safetensors":
        raise SpfbenchError(
            f"--model {path}: only .safetensors single-file checkpoints are loaded (pickled .ckpt files can run"
            " arbitrary code); convert it first, e.g. with diffusers' convert_original_stable_diffusion_to_diffusers.py"
        )
    kw = {}
    if vae:
        kw["vae"] = _load(AutoencoderKL, vae, None, None, "VAE", p.name, not Path(vae).is_dir())
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(CONFIG_DIR / "sd15"),
            tokenizer=clip_tokenizer(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=True,
            **kw,
        )
    # SingleFileComponentError (a plain Exception): a component's weights are not in the file at all.
    except (OSError, ValueError, KeyError, RuntimeError, SingleFileComponentError) as e:
        why = _first_line(e)
        if "meta tensor" in why:  # diffusers builds on the meta device: a weight the file lacks has no data
            why = "weights are missing from the file"
        raise SpfbenchError(f"--model {path}: not a loadable SD1.x single-file checkpoint: {why}") from None
    for name in ("unet", "vae", "text_encoder"):  # the text encoder loads even with weights left on meta
        empty = [k for k, t in getattr(pipe, name).state_dict().items() if t.is_meta]
        if empty:
            raise SpfbenchError(
                f"--model {path}: not a loadable SD1.x single-file checkpoint: {len(empty)} {name} weights are"
                f" missing from the file (first: {empty[0]})"
            )
    info = ModelInfo(preset=p.name, source=str(path.resolve()), vae_source=vae, native_size=512)
    return pipe, info


# --------------------------------------------------------------------------- weights table


def weight_rows() -> list[dict]:
    """One row per weight file the base-model presets can use, with local presence (``spfbench weights``)."""
    from huggingface_hub import try_to_load_from_cache

    rows = []
    for preset, files in REAL_FILES.items():
        for component, repo, filename, size in files:
            hit = try_to_load_from_cache(repo, filename)
            rows.append(
                {
                    "group": "base model",
                    "name": f"{preset}/{component}",
                    "what": f"{SHORT_NAMES[preset]} {component}",
                    "source": f"hf://{repo}/{filename}",
                    "size": size,
                    "present": isinstance(hit, str) and Path(hit).is_file(),
                    "path": hit if isinstance(hit, str) else None,
                }
            )
    return rows


def describe_presets() -> list[dict]:
    out = []
    for p in PRESETS.values():
        weights = "random (seeded)" if p.config else p.repo_id or str(WORLD_MODEL_DIR.relative_to(Path(__file__).parent.parent))
        out.append({"name": p.name, "weights": weights, "description": p.description})
    return out


def config_json(config: str, component: str) -> dict:
    folder = CONFIG_DIR / config / component
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((folder / name).read_text())
