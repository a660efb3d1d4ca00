"""LoRA rank sweep: Table 1's "LoRA (Best Rank)".

:func:`lora_rank_sweep` trains one LoRA per rank with the shared loop (``OUT/rank-R/``, each an ordinary
run folder that resumes like any other) and writes ``OUT/sweep.json`` with every rank's score and the
chosen one.

Criterion (lower is better): the **held-out denoising loss** -- the mean diffusion MSE of the trained
UNet on a validation set that is not trained on, at fixed, evenly spaced timesteps and fixed noise per
(item, timestep), the VAE latent mean and the complete caption. Every rank is scored on exactly the
same (latent, noise, timestep, text) tuples, so the comparison carries no sampling noise. Ties go to the
smaller rank. Why this one:

* it uses no test-set triple and none of the benchmark's metrics, so choosing the rank does not tune
  the baseline on the numbers it is then judged by;
* it needs no extra model (no CLIP, no face or segmentation network) and costs a few UNet forwards per
  item and rank;
* it measures what a rank controls -- capacity to learn the customization data versus over-fitting
  the training images -- on held-out portraits of the same kind.

It does not measure preservation of the base model's behaviour; a caller who wants a metric-based
choice (e.g. CLIP-T against preservation on validation triples) passes ``score_fn(rank, artifact) ->
float`` (lower is better) and the record says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from spfbench.errors import SpfbenchError
from spfbench.io import atomic_write_json

from .base import Models, diffusion_target, encode_text
from .lora import Lora, LoraConfig

SWEEP_FILE = "sweep.json"
DEFAULT_RANKS = (4, 8, 16, 32)
EVAL_TIMESTEPS = 10
CRITERION = "heldout_denoising_loss"


@dataclass
class SweepResult:
    out: Path
    best_rank: int
    best_artifact: Path
    scores: dict[int, float]


def parse_ranks(text: str | list | tuple) -> list[int]:
    """``"4,8,16,32"`` (or a list) -> sorted distinct positive ranks."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        ranks = sorted({int(str(r).strip()) for r in items if str(r).strip()})
    except ValueError:
        raise SpfbenchError(f"ranks must be positive integers separated by commas, got {text!r}") from None
    if not ranks or ranks[0] < 1:
        raise SpfbenchError(f"ranks must be positive integers separated by commas, got {text!r}")
    return ranks


def eval_timesteps(num_train_timesteps: int, n: int) -> list[int]:
    """``n`` timesteps at the centres of ``n`` equal slices of [0, T)."""
    return sorted({min(num_train_timesteps - 1, int((k + 0.5) * num_train_timesteps / n)) for k in range(n)})


class HeldOutLoss:
    """The fixed evaluation set: latents, text embeddings, noises and timesteps computed once with the base
    model; :meth:`__call__` scores a UNet on them."""

    def __init__(self, pipe, val_data: str | Path, *, n_timesteps: int = EVAL_TIMESTEPS, max_items: int | None = None,
                 seed: int = 0, batch_size: int = 8):
        from spfbench.data import PortraitDataset

        from .loop import seed_of, training_scheduler

        self.scheduler = training_scheduler(pipe)
        resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
        dataset = PortraitDataset(val_data, resolution=resolution)
        n = len(dataset) if max_items is None else min(max_items, len(dataset))
        self.timesteps = eval_timesteps(self.scheduler.config.num_train_timesteps, n_timesteps)
        self.batch_size = batch_size
        models = Models(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, self.scheduler)
        device, dtype = pipe.device, pipe.vae.dtype
        self.items = []  # (latent, text, noise, t) per (item, timestep)
        with torch.no_grad():
            for i in range(n):
                item = dataset[i]
                latent = pipe.vae.encode(item["pixel_values"][None].to(device, dtype)).latent_dist.mean.float()
                latent = latent * pipe.vae.config.scaling_factor
                text = encode_text(models, [item["caption"]])
                for t in self.timesteps:
                    g = torch.Generator().manual_seed(seed_of(seed, "heldout", i, t))
                    noise = torch.randn(latent.shape, generator=g).to(latent)
                    self.items.append((latent, text, noise, t))
        if not self.items:
            raise SpfbenchError(f"{val_data}: no validation items")

    @torch.no_grad()
    def __call__(self, unet) -> float:
        sched, total, count = self.scheduler, 0.0, 0
        for s in range(0, len(self.items), self.batch_size):
            chunk = self.items[s:s + self.batch_size]
            latents = torch.cat([c[0] for c in chunk])
            text = torch.cat([c[1] for c in chunk]).to(unet.dtype)
            noise = torch.cat([c[2] for c in chunk])
            t = torch.tensor([c[3] for c in chunk], device=latents.device)
            noisy = sched.add_noise(latents, noise, t)
            target = diffusion_target(sched, latents, noise, t)
            pred = unet(noisy.to(unet.dtype), t, text).sample.float()
            err = ((pred - target.float()) ** 2).mean(dim=(1, 2, 3))
            total += err.sum().item()
            count += err.numel()
        return total / count


def lora_rank_sweep(
    ranks: list[int] | str,
    data: str | Path,
    out: str | Path,
    *,
    val_data: str | Path | None,
    config: dict | None = None,
    preset: str = "realistic-vision-v4",
    model: str | None = None,
    vae: str | None = None,
    weights_seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    n_timesteps: int = EVAL_TIMESTEPS,
    max_val_items: int | None = None,
    score_fn: Callable[[int, Path], float] | None = None,
) -> SweepResult:
    """Train a LoRA per rank into ``OUT/rank-R/`` and pick the best (see the module docstring).

    ``config`` holds the other LoRA options (the same for every rank; ``rank`` is set per run; ``alpha``
    null keeps alpha = rank). ``val_data`` is the held-out set (any format :mod:`spfbench.data` reads);
    it is required unless ``score_fn`` gives the criterion.
    """
    from spfbench.data import dataset_fingerprint, location as data_location
    from spfbench.models import load_pipeline

    from .loop import Trainer

    ranks = parse_ranks(ranks)
    out = Path(out)
    base = dict(config or {})
    if "rank" in base:
        raise SpfbenchError("the sweep sets rank per run: give ranks, not config['rank']")
    configs = {r: LoraConfig.from_dict({**base, "rank": r}, source="lora sweep config") for r in ranks}
    if score_fn is None:
        if val_data is None:
            raise SpfbenchError("the rank sweep needs held-out data (--val-data): a set of portraits not trained on")
        if dataset_fingerprint(val_data) == dataset_fingerprint(data):
            raise SpfbenchError(f"held-out data {val_data} is the training data {data}; give portraits not trained on")

    runs = {}
    for r in ranks:
        trainer = Trainer(Lora(configs[r]), data, out / f"rank-{r}", preset=preset, model=model, vae=vae,
                          weights_seed=weights_seed, device=device)
        result = trainer.run(progress=progress)
        runs[r] = result

    scores: dict[int, float] = {}
    base_score = None
    if score_fn is not None:
        for r in ranks:
            scores[r] = float(score_fn(r, runs[r].artifact))
        criterion, details = "score_fn", {"score_fn": getattr(score_fn, "__qualname__", repr(score_fn))}
    else:
        pipe, _ = load_pipeline(preset=preset, model=model, vae=vae, seed=weights_seed, device=device, dtype=torch.float32)
        pipe.unet.eval()
        heldout = HeldOutLoss(pipe, val_data, n_timesteps=n_timesteps, max_items=max_val_items, seed=configs[ranks[0]].seed)
        base_score = heldout(pipe.unet)
        for r in ranks:
            Lora.apply_artifact(pipe, runs[r].artifact, configs[r])
            scores[r] = heldout(pipe.unet)
            pipe.unload_lora_weights()
        criterion = CRITERION
        details = {"val_data": data_location(val_data), "val_fingerprint": dataset_fingerprint(val_data),
                   "val_items": len(heldout.items) // len(heldout.timesteps), "timesteps": heldout.timesteps,
                   "noise": "per (item, timestep) from seed (config seed, 'heldout', item, t)", "latents": "VAE mean",
                   "base_model_loss": base_score}

    best = min(ranks, key=lambda r: (scores[r], r))  # ties: the smaller rank
    record = {
        "criterion": criterion,
        "lower_is_better": True,
        "tie_break": "smaller rank",
        **details,
        "data": data_location(data),
        "ranks": [
            {"rank": r, "alpha": configs[r].lora_alpha, "score": scores[r], "steps": runs[r].steps,
             "artifact": str(runs[r].artifact.relative_to(out))}
            for r in ranks
        ],
        "best_rank": best,
        "best_artifact": str(runs[best].artifact.relative_to(out)),
        "config": {k: v for k, v in configs[best].to_dict().items() if k != "rank"},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SWEEP_FILE, record)
    return SweepResult(out, best, runs[best].artifact, scores)


def read_sweep(out: str | Path) -> dict:
    path = Path(out) / SWEEP_FILE
    if not path.is_file():
        raise SpfbenchError(f"{out} holds no {SWEEP_FILE} (not a finished LoRA rank sweep)")
    return json.loads(path.read_text())


def resolve_artifact(folder: str | Path) -> Path:
    """``folder`` itself when it is an artifact; the chosen rank's artifact when it is a finished sweep."""
    from .base import ARTIFACT_META

    folder = Path(folder)
    if not (folder / ARTIFACT_META).is_file() and (folder / SWEEP_FILE).is_file():
        return folder / read_sweep(folder)["best_artifact"]
    return folder
