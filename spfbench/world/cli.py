"""``spfbench world ...``: Portrait World's commands (typer), attached to the suite's command line.

Sets and captions (``data``, ``captions``), the per-attribute report of a run (``attributes``), and the
trainings of the world's own models: the original model (``train-model``, ``continue-model``,
``finetune-decoder``, ``evaluate-model``), the attribute reader (``train-reader``) and the world CLIP
(``train-clip``). Bad input raises :class:`~spfbench.errors.SpfbenchError` before any work, which the
suite's entry point prints as one ``error:`` line. Definitions: docs/world.md.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Optional

import typer

from ..errors import SpfbenchError
from .clip import DEFAULT_WEIGHTS as CLIP_WEIGHTS
from .components import CARD, DEFAULT_OUT, DEFAULT_WORK
from .reader import DEFAULT_WEIGHTS as READER_WEIGHTS
from .reader import HIDDEN as READER_HIDDEN
from .reader import WIDTHS as READER_WIDTHS
from .recipe import CONTINUATIONS, stage_text

app = typer.Typer(help="Portrait World (docs/world.md): rendered portraits with ground-truth attributes, CPU scale.", no_args_is_help=True)


def _command(ctx: typer.Context) -> str:
    """The command line as given (the options set on it), for the card of what it trains."""
    words = ["spfbench", "world", ctx.info_name]
    for p in ctx.command.params:
        if getattr(ctx.get_parameter_source(p.name), "name", None) != "COMMANDLINE":  # typer's own click's ParameterSource
            continue
        opt, value = max(p.opts, key=len), ctx.params[p.name]
        if getattr(p, "is_flag", False):
            words.append(opt)
        else:
            for v in value if getattr(p, "multiple", False) else [value]:
                words += [opt, str(v)]
    return shlex.join(words)


def _non_negative(option: str, value: float) -> float:
    if not 0 <= value < math.inf:
        raise SpfbenchError(f"{option} must be a finite number >= 0, got {value:g}")
    return value


# ------------------------------------------------------------------------------------------ sets


@app.command("data")
def world_data(
    out: Path = typer.Option(..., "--out", help="Imagefolder to write (metadata.jsonl with the ground-truth `attributes` column)."),
    split: str = typer.Option("finetune", help="pretrain (base distribution, no target), finetune (the polluted set), heldout."),
    n: int = typer.Option(1000, "--n", help="Number of renders."),
    seed: int = typer.Option(0, help="Seed stream (same seed: the same attributes and images)."),
    size: int = typer.Option(64, help="Image side in pixels."),
) -> None:
    """Render a Portrait World set (resumable)."""
    from .datasets import make_world_set

    r = make_world_set(out, split, n, seed=seed, size=size)
    typer.echo(f"world {split} set: {r}")


@app.command("captions")
def world_captions(
    out: Path = typer.Option(..., "--out", help="JSONL for `spfbench build-testset --captions`."),
    n: int = typer.Option(100, "--n", help="Number of triples."),
    seed: int = typer.Option(0, help="Seed stream of the base captions."),
) -> None:
    """Test-set caption rows of the world: held-out base captions, world target texts round-robin."""
    from .datasets import write_world_captions

    typer.echo(f"written {write_world_captions(out, n, seed)} ({n} rows)")


@app.command("attributes")
def world_attributes(
    run: Path = typer.Argument(..., help="A `spfbench run` folder on a world test set."),
) -> None:
    """Which attributes moved: per-attribute kept rates, value shares and per-target hits (RUN/attributes.{md,json})."""
    from .analysis import write_attribute_report

    write_attribute_report(run)
    typer.echo((run / "attributes.md").read_text(), nl=False)
    typer.echo(f"written: {run / 'attributes.md'}, {run / 'attributes.json'}")


# ------------------------------------------------------------------------------------------ the original model


@app.command("train-model")
def train_model(
    ctx: typer.Context,
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="The model folder to save (diffusers, with its card)."),
    work: Path = typer.Option(DEFAULT_WORK, "--work", help="Checkpoints, latent cache, logs (resumable)."),
    vae_n: int = typer.Option(10000, "--vae-n", help="Renders the VAE trains on."),
    vae_steps: int = typer.Option(2500, "--vae-steps"),
    vae_batch_size: int = typer.Option(16, "--vae-batch-size"),
    unet_n: int = typer.Option(30000, "--unet-n", help="Pretrain renders the UNet trains on."),
    unet_steps: int = typer.Option(4000, "--unet-steps"),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(5e-4, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(2, "--threads"),
    eval_n: int = typer.Option(200, "--eval-n", help="Held-out captions the saved model is evaluated on (0: none)."),
    device: Optional[str] = typer.Option(None, "--device", help="Where the UNet stages train (default: cpu; e.g. cuda)."),
    unet_more: Optional[list[str]] = typer.Option(
        None, "--unet-more", metavar="STEPS:LR[:offset=X][:vzero][:detail=W]",
        help="Continue the finished UNet run (repeatable, one stage each, in work/unet-2, unet-3, ...; cosine from LR to 10%; "
        "offset=X: offset noise, vzero: v-prediction at zero terminal SNR, detail=W: latents weighted 1 + W x their share of face "
        f"and hair pixels in the loss); default: {' '.join(f'--unet-more {stage_text(c)}' for c in CONTINUATIONS)}, the shipped model's."),
) -> None:
    """Train the world's original model: VAE, then text encoder + UNet and its continuations; save the pipeline folder."""
    from .recipe import parse_stage, train

    stages = [parse_stage(s) for s in unet_more] if unet_more else CONTINUATIONS
    train(out, work, vae_n, vae_steps, vae_batch_size, unet_n, unet_steps, batch_size, lr, seed, threads, eval_n, stages,
          command=_command(ctx), device=device)


@app.command("continue-model")
def continue_model(
    ctx: typer.Context,
    model: Path = typer.Option(DEFAULT_OUT, "--model", help="The folder to continue (default: the shipped model)."),
    out: Path = typer.Option(..., "--out", help="The new model folder."),
    work: Path = typer.Option(..., "--work", help="Checkpoint, latent cache, log (resumable)."),
    steps: int = typer.Option(..., "--steps"),
    lr: float = typer.Option(3e-4, "--lr"),
    batch_size: int = typer.Option(64, "--batch-size"),
    unet_n: int = typer.Option(30000, "--unet-n"),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(2, "--threads"),
    noise_offset: float = typer.Option(0.0, "--noise-offset"),
    detail_weight: float = typer.Option(
        0.0, "--detail-weight", help="Weigh each latent pixel 1 + W x its share of face and hair pixels in the loss (default 0: plain MSE)."),
    objective: str = typer.Option("model", "--objective", help="The loss: model (its own), epsilon, or vzero (v-prediction at zero terminal SNR)."),
    eval_n: int = typer.Option(200, "--eval-n"),
    device: Optional[str] = typer.Option(None, "--device", help="Where the UNet trains (default: cpu; e.g. cuda)."),
    text_encoder: Optional[str] = typer.Option(
        None, "--text-encoder", metavar="world-clip|PATH",
        help="Replace the folder's text encoder by a world CLIP's text tower (world-clip: the shipped one; PATH: a world CLIP "
        ".safetensors), frozen while the UNet trains, as SD1.5's CLIP; default: a folder trained against a frozen encoder (the "
        "shipped one) keeps it frozen, any other trains its own jointly."),
) -> None:
    """Train a saved model folder further (weights only) and save it elsewhere."""
    from .recipe import continue_model as run

    vzeros = {"model": None, "epsilon": False, "vzero": True}
    if objective not in vzeros:
        raise SpfbenchError(f"--objective must be one of {', '.join(vzeros)}, got {objective!r}")
    _non_negative("--noise-offset", noise_offset)
    _non_negative("--detail-weight", detail_weight)
    run(model, out, work, steps, lr, batch_size, unet_n, seed, threads, vzeros[objective], noise_offset, eval_n, device,
        command=_command(ctx), detail_weight=detail_weight, text_encoder=text_encoder)


@app.command("finetune-decoder")
def finetune_decoder(
    ctx: typer.Context,
    model: Path = typer.Option(DEFAULT_OUT, "--model", help="The folder whose decoder to fine-tune (default: the shipped model)."),
    out: Path = typer.Option(..., "--out", help="The new model folder."),
    work: Path = typer.Option(..., "--work", help="Checkpoint and log (resumable)."),
    steps: int = typer.Option(..., "--steps"),
    lr: float = typer.Option(2e-4, "--lr"),
    batch_size: int = typer.Option(16, "--batch-size"),
    n: int = typer.Option(10000, "--n", help="Renders of the VAE mix to train on."),
    detail_weight: float = typer.Option(10.0, "--detail-weight", help="L1 weight 1 + W on the pixels of faces, hair and targets (as train_vae)."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(2, "--threads"),
    eval_n: int = typer.Option(200, "--eval-n"),
    reader: Optional[Path] = typer.Option(None, "--reader", help="The attribute reader that validates the VAE before and after (default: the shipped one)."),
) -> None:
    """Fine-tune a saved model folder's VAE decoder (encoder frozen) and save it elsewhere."""
    from .vae import finetune_decoder as run

    _non_negative("--detail-weight", detail_weight)
    run(model, out, work, steps, batch_size, n, lr, detail_weight, seed=seed, threads=threads, eval_n=eval_n, reader=reader,
        command=_command(ctx))


@app.command("evaluate-model")
def evaluate_model(
    model: Path = typer.Option(DEFAULT_OUT, "--model"),
    n: int = typer.Option(200, "--n", help="Held-out captions to generate for."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(2, "--threads"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result here too."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Evaluate this UNet training checkpoint (its EMA weights) instead of --model."),
    vae: Path = typer.Option(DEFAULT_WORK / "vae", "--vae", help="The VAE the checkpoint was trained on (with --checkpoint)."),
    card: bool = typer.Option(False, "--card", help="Write the result into --model's card as its evaluation (e.g. after the reader was retrained)."),
) -> None:
    """Generate for held-out captions and read the images back with the attribute reader."""
    import json

    if card and checkpoint:
        raise SpfbenchError("--card writes a model folder's card; a --checkpoint has none (drop one of them)")
    if card and not (model / CARD).is_file():
        raise SpfbenchError(f"no world model card at {model / CARD}; --card needs a folder saved by train-model, continue-model or finetune-decoder")
    import torch

    from ..io import atomic_write_json, atomic_write_text
    from .evaluate import evaluate
    from .pipeline import checkpoint_pipeline, load_world_pipeline

    torch.set_num_threads(threads)
    pipe = checkpoint_pipeline(checkpoint, vae) if checkpoint else load_world_pipeline(model)
    res = evaluate(pipe, n, seed, progress=True)
    if card:
        saved = json.loads((model / CARD).read_text())
        saved["evaluation"] = res
        atomic_write_json(model / CARD, saved)
    text = json.dumps(res, indent=2)
    typer.echo(text)
    if json_out:
        atomic_write_text(json_out, text + "\n")


# ------------------------------------------------------------------------------------------ reader, CLIP


@app.command("train-reader")
def train_reader(
    out: Path = typer.Option(READER_WEIGHTS, "--out", help="The reader's .safetensors (its card: the same name, .json)."),
    n_train: int = typer.Option(20000, "--n-train"),
    n_val: int = typer.Option(1500, "--n-val"),
    epochs: int = typer.Option(7, "--epochs"),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(2, "--threads"),
    vae: Optional[Path] = typer.Option(None, "--vae", help="A world model (or VAE) folder: train and validate on its reconstructions too."),
    vae_share: float = typer.Option(0.5, "--vae-share", help="With --vae: the probability that a training draw is the reconstruction."),
    widths: str = typer.Option(",".join(map(str, READER_WIDTHS)), "--widths", help="Channels of the four convolution stages."),
    hidden: int = typer.Option(READER_HIDDEN, "--hidden", help="Width of the shared hidden layer."),
) -> None:
    """Train the Portrait World attribute reader."""
    try:
        width_list = tuple(int(w) for w in widths.split(","))
    except ValueError:
        raise SpfbenchError(f"--widths takes comma-separated integers, got {widths!r}") from None
    from .reader import train_reader as run

    run(out, n_train, n_val, epochs, seed, threads=threads, vae=vae, vae_share=vae_share, widths=width_list, hidden=hidden)


@app.command("train-clip")
def train_clip(
    out: Path = typer.Option(CLIP_WEIGHTS, "--out", help="The world CLIP's .safetensors (its card: the same name, .json)."),
    n_images: int = typer.Option(24000, "--n-images"),
    steps: int = typer.Option(1500, "--steps"),
    batch_size: int = typer.Option(256, "--batch-size"),
    lr: float = typer.Option(2e-3, "--lr"),
    aux_weight: float = typer.Option(1.0, "--aux-weight", help="Weight of the auxiliary per-attribute classification loss (0: off)."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(2, "--threads"),
    n_eval: int = typer.Option(500, "--n-eval"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="File keeping the rendered training images between runs."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this world CLIP (.safetensors) instead of random weights."),
    freeze_text: bool = typer.Option(False, "--freeze-text", help="With --init: train the image tower only (text tower and temperature unchanged)."),
) -> None:
    """Train the Portrait World CLIP."""
    from .clip_training import train_world_clip

    train_world_clip(out, n_images, steps, batch_size, seed, lr=lr, aux_weight=aux_weight, threads=threads, n_eval=n_eval, cache=cache,
                     init=init, freeze_text=freeze_text)
