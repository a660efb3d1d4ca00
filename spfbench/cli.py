"""The ``spfbench`` command line (typer). Each command is a thin layer over one module."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import SpfbenchError

app = typer.Typer(
    help="Evaluation and benchmarking suite for text-driven portrait customization (SPF-Portrait protocol).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


DEBUG_ENV = "SPFBENCH_DEBUG"


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error (default: one line)."),
) -> None:
    """Evaluation and benchmarking suite for text-driven portrait customization (SPF-Portrait protocol)."""
    if debug:
        os.environ[DEBUG_ENV] = "1"


def _quiet_libraries() -> None:
    """Libraries' internal deprecation chatter is not the user's business; our own errors are one line."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for module in ("huggingface_hub", "diffusers", "transformers", "accelerate", "torch"):
        for category in (UserWarning, FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=module)


weights_app = typer.Typer(
    help="Table of every weight file the suite can use: what it is, its source, size, and whether it is here.",
    invoke_without_command=True,
)
app.add_typer(weights_app, name="weights")


@weights_app.callback()
def weights(ctx: typer.Context) -> None:
    """Table of every weight file the suite can use: what it is, its source, size, and whether it is here."""
    if ctx.invoked_subcommand is not None:
        return
    from .weights import all_weight_rows, format_table

    rows = all_weight_rows()
    typer.echo(format_table(rows))
    present = sum(r["present"] for r in rows)
    typer.echo(f"\n{present} of {len(rows)} files present locally. Hugging Face cache: {_hf_cache()}")
    from .models import describe_presets

    typer.echo("\npresets:")
    for p in describe_presets():
        typer.echo(f"  {p['name']:<20} {p['weights']:<45} {p['description']}")


@app.command()
def environments() -> None:
    """The environments (spfbench.environments: built-in and plugins): their base-model presets and default metrics."""
    from . import environments as E

    for name in E.names():
        env = E.get(name)
        typer.echo(f"{name}: {env.description}")
        typer.echo(f"  presets: {', '.join(p.name for p in env.presets) or '-'}")
        typer.echo(f"  default metrics: {', '.join(env.default_metrics())}")


@weights_app.command("convert-mps")
def convert_mps(
    src: Path = typer.Argument(..., help="The official MPS_overall_checkpoint.pth (a pickle: it is unpickled once, here)."),
    dst: Path = typer.Argument(..., help="Output .safetensors (e.g. ~/.cache/spfbench/mps/MPS_overall_checkpoint.safetensors)."),
) -> None:
    """Convert the official MPS pickle to safetensors once (keys checked strictly), so scoring never unpickles."""
    from .metrics.mps import convert_mps as convert

    if not src.is_file():
        raise SpfbenchError(f"{src} does not exist")
    if dst.suffix != ".safetensors":
        raise SpfbenchError(f"{dst}: the output must end in .safetensors")
    typer.echo(f"written {convert(src, dst)}")


def _hf_cache() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)


@app.command("build-testset")
def build_testset(
    out: Path = typer.Option(..., "--out", help="Folder of the test set (created; rerun the same command to resume)."),
    preset: str = typer.Option("realistic-vision-v4", help="Base model preset (`spfbench environments`: realistic-vision-v4, sd15, tiny, sd15-random, world, a plugin's)."),
    n: Optional[int] = typer.Option(None, "--n", help="Number of triples (default: 5000, or every row of --captions)."),
    seed: int = typer.Option(0, help="Test set seed: triple i's caption choices and generation seed derive from (seed, i)."),
    captions: Optional[Path] = typer.Option(None, help="CSV/JSONL with base_caption, target_text (optional category, seed, id); replaces the composer."),
    shard: Optional[str] = typer.Option(None, help="I/K: this process builds the I-th of K shares into the same folder."),
    model: Optional[str] = typer.Option(None, help="Real presets: hub id, local diffusers folder, or single-file .safetensors."),
    vae: Optional[str] = typer.Option(None, help="Real presets: VAE hub id or local folder (overrides the preset's)."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit) of the model."),
    weights_seed: int = typer.Option(0, help="Random presets (tiny, sd15-random): seed of the random weights."),
    sampler: Optional[str] = typer.Option(None, help="Sampler: dpmpp-2m-karras, dpmpp-2m, ddim, pndm, euler, euler-a, unipc, deis (default: dpmpp-2m-karras; dpmpp-2m for a zero-terminal-SNR model such as world)."),
    steps: int = typer.Option(25, help="Sampling steps."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (default: the preset's, 7; world: 3)."),
    height: Optional[int] = typer.Option(None, help="Image height (default: the model's native size)."),
    width: Optional[int] = typer.Option(None, help="Image width (default: the model's native size)."),
    negative_prompt: str = typer.Option("", help="Negative prompt (default: none)."),
    batch_size: int = typer.Option(4, help="Images per forward pass (part of the set's identity: it changes the last bits)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    dtype: Optional[str] = typer.Option(None, help="fp32, fp16, bf16 (default: fp16 on cuda, fp32 on cpu)."),
    vocab: str = typer.Option("v1", help="Version of the built-in caption vocabulary."),
    long_captions: str = typer.Option("refuse", help="A target caption over CLIP's 77 tokens (its target text never reaches the model): refuse (default) or truncate (kept, with a warning naming the triple)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Build the (original caption, original portrait, target caption) triples; resumable and shardable."""
    _quiet_libraries()
    from .generation import GenerationSettings
    from .testset import Shard, TestsetBuilder

    sh = Shard.parse(shard)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # accelerate launch / torchrun: every process takes its own share of this shard
        import torch
        from accelerate import PartialState

        # without cpu=True accelerate treats CPU processes as one (DistributedType.NO)
        state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
        sh = sh.split(state.process_index, state.num_processes)
        device = device or str(state.device)
    if guidance is None:
        from .models import get_preset

        guidance = get_preset(preset).guidance_scale
    settings = GenerationSettings(sampler, steps, guidance, height, width, negative_prompt)
    builder = TestsetBuilder(
        out,
        preset=preset,
        n=n,
        seed=seed,
        captions=captions,
        vocab=vocab,
        settings=settings,
        batch_size=batch_size,
        shard=sh,
        model=model,
        vae=vae,
        revision=revision,
        weights_seed=weights_seed,
        device=device,
        dtype=dtype,
        long_captions=long_captions,
        warn=lambda m: typer.echo(m, err=True),
    )
    try:
        r = builder.run(progress=progress)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished images are kept; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    if r.complete:
        typer.echo(f"test set complete: {r.n} triples in {r.out} ({r.generated} generated now); content_sha256 {r.meta['content_sha256'][:16]}")
    else:
        typer.echo(
            f"shard {r.shard} done ({r.generated} generated now); {r.present}/{r.n} originals present in {r.out}."
            " The set is complete when every shard has finished."
        )


@app.command()
def metrics() -> None:
    """List the metric ids (backbone and scale in the id), their Table 1 column and direction."""
    from .metrics import ids, metric_class
    from .metrics import DEFAULT_METRICS

    for mid in ids():
        cls = metric_class(mid)
        arrow = "higher is better" if cls.higher_is_better else "lower is better"
        kind = "per sample" if cls.per_sample else "set level"
        default = "default" if mid in DEFAULT_METRICS else ""
        typer.echo(f"{mid:<24} {cls.column:<9} {arrow:<17} {kind:<11} {default}".rstrip())


def _weights_option(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise SpfbenchError(f"--weights takes NAME=PATH (a name from `spfbench weights`), got {v!r}")
        out[name] = path
    return out


@app.command()
def score(
    testset: Path = typer.Option(..., "--testset", help="A complete test set folder (build-testset)."),
    images: Path = typer.Option(..., "--images", help="Folder of customized images named by triple id (ID.png)."),
    out: Path = typer.Option(..., "--out", help="Output folder: samples.jsonl, summary.json (rerun to resume)."),
    metric: Optional[list[str]] = typer.Option(None, "--metric", help="Metric id (repeatable; default: the eight of Table 1, plus GT-Target and GT-Preserve under --preset world). See `spfbench metrics`."),
    preset: str = typer.Option("real", help="The metrics' environment (`spfbench environments`): real (published weights), tiny (small random models, for tests and CPU smoke runs), full-random (published architectures, seeded random weights: throughput at real size), world (Portrait World: its CLIP and reader; tiny models for the rest) or a plugin's."),
    weights: Optional[list[str]] = typer.Option(None, "--weights", help="NAME=PATH: a local weight file for NAME (names as in `spfbench weights`)."),
    batch_size: int = typer.Option(16, help="Pairs per batch."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N triples (smoke runs)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    dtype: str = typer.Option("fp32", help="Metric backbones' dtype: fp32, fp16, bf16."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Score a folder of customized images against a test set's originals and target texts."""
    _quiet_libraries()
    from .scoring import Scorer, default_metrics, format_summary

    scorer = Scorer(
        testset, images, out, list(metric or default_metrics(preset)), preset=preset, device=device, dtype=dtype,
        batch_size=batch_size, limit=limit, weights=_weights_option(weights or []),
    )
    try:
        summary = scorer.run(progress=progress)
    except KeyboardInterrupt:
        typer.echo("interrupted: scores up to the last checkpoint are kept; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    typer.echo(format_summary(summary))
    typer.echo(f"written: {out / 'samples.jsonl'}, {out / 'summary.json'}")


@app.command("make-toy-data")
def make_toy_data(
    out: Path = typer.Option(..., "--out", help="Folder of the toy portrait set (metadata.jsonl + PNGs)."),
    n: int = typer.Option(16, "--n", help="Number of portraits."),
    seed: int = typer.Option(0, help="Seed of the drawn attributes (same seed: byte-identical files)."),
    size: int = typer.Option(64, help="Image side in pixels (64 = the tiny preset's resolution)."),
) -> None:
    """Write a small procedurally drawn portrait set with matching captions (for the demo and tests)."""
    from .toydata import make_toy_data as make

    result = make(out, n, seed=seed, size=size)
    typer.echo(f"toy portrait set: {n} images in {out}" if result is None else f"toy portrait set: {result}")


@app.command()
def methods() -> None:
    """List the customization methods (names for `spfbench train --method`)."""
    from trainers import REGISTRY, method_class

    for name in REGISTRY:
        typer.echo(f"{name:<14} {method_class(name).description}")


@app.command()
def train(
    method: str = typer.Option(..., "--method", help="Method name (see `spfbench methods`)."),
    data: Path = typer.Option(..., "--data", help="Training set: imagefolder (metadata.jsonl), HF datasets folder or WebDataset shards."),
    out: Path = typer.Option(..., "--out", help="Run folder (checkpoints, log.jsonl, artifact/); rerun to resume."),
    preset: str = typer.Option("realistic-vision-v4", help="Base model preset (`spfbench environments`: realistic-vision-v4, sd15, tiny, sd15-random, world, a plugin's)."),
    model: Optional[str] = typer.Option(None, help="Real presets: hub id, local diffusers folder, or single-file .safetensors."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (overrides the config's max_train_steps)."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON file of the method's hyper-parameters (see its config dataclass)."),
    rank: Optional[str] = typer.Option(None, "--rank", help="lora: a rank, or several (4,8,16,32) for the rank sweep (Table 1's 'LoRA (Best Rank)')."),
    val_data: Optional[Path] = typer.Option(None, "--val-data", help="Rank sweep: held-out portrait set of the selection criterion."),
    weights_seed: int = typer.Option(0, help="Random presets: seed of the random weights."),
    device: Optional[str] = typer.Option(None, help="cpu to force the CPU (default: accelerate's choice)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="tensorboard, wandb or none: accelerate's trackers (overrides the config's report_to)."),
) -> None:
    """Train one method on a portrait set; writes OUT/artifact (loadable by generation) and resumes if rerun."""
    _quiet_libraries()
    import trainers
    from trainers.loop import Trainer

    values = trainers.read_config_file(config) if config else {}
    if report_to is not None:
        values["report_to"] = report_to
    if max_steps is not None:
        values["max_train_steps"] = max_steps
    if rank is not None:
        from trainers.sweep import lora_rank_sweep, parse_ranks

        ranks = parse_ranks(rank)
        if method != "lora":
            raise SpfbenchError(f"--rank applies to the lora method (and its sweep); set {method}'s ranks in --config")
        if len(ranks) > 1:
            r = lora_rank_sweep(ranks, data, out, val_data=val_data, config=values, preset=preset, model=model,
                                weights_seed=weights_seed, device=device, progress=progress)
            scores = ", ".join(f"r{k}: {v:.5f}" for k, v in r.scores.items())
            typer.echo(f"lora rank sweep: best rank {r.best_rank} ({scores}); artifact {r.best_artifact}")
            return
        values["rank"] = ranks[0]
    m = trainers.create(method, values, source=str(config or "command line"))
    trainer = Trainer(m, data, out, preset=preset, model=model, weights_seed=weights_seed, device=device)
    try:
        r = trainer.run(progress=progress)
    except KeyboardInterrupt:
        typer.echo("interrupted: checkpoints are kept; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    resumed = f" (resumed from step {r.resumed_from})" if r.resumed_from is not None else ""
    if r.reused:
        resumed = " (already finished with this config and data: reused)"
    typer.echo(f"{method}: {r.steps} steps{resumed}; artifact {r.artifact}")


@app.command()
def run(
    testset: Path = typer.Option(..., "--testset", help="A complete test set folder (build-testset): its base model and sampler make every image."),
    data: Path = typer.Option(..., "--data", help="Training set of every method (imagefolder, HF datasets folder or WebDataset shards)."),
    out: Path = typer.Option(..., "--out", help="Run folder; rerun the same command to resume (methods can be added later)."),
    method: list[str] = typer.Option(..., "--method", help="Method name (repeatable; `spfbench methods`). Required methods (SPF's stage 1) are fitted too."),
    preset: Optional[str] = typer.Option(None, help="The metrics' environment: real, tiny, full-random, world or a plugin's (default: the test set's base-model environment)."),
    config: Optional[Path] = typer.Option(None, "--config", help='JSON: {"all": {...}, "naive": {...}, "spf": {...}}, each a method\'s hyper-parameters.'),
    limit: Optional[int] = typer.Option(None, help="Only the first N triples (smoke runs)."),
    metric: Optional[list[str]] = typer.Option(None, "--metric", help="Metric id (repeatable; default: the eight of Table 1)."),
    paper: bool = typer.Option(False, "--paper", help="Put the paper's published Table 1 beside ours."),
    retention: bool = typer.Option(False, "--retention", help="Also generate from the base text only and score preservation (paper sec. 4.4, Fig. 9)."),
    curve: Optional[int] = typer.Option(None, "--curve", help="Checkpoint every N steps and plot CLIP-T and HPSv2 over them (Fig. 5)."),
    curve_limit: int = typer.Option(100, help="Triples generated per checkpoint for --curve."),
    weights: Optional[list[str]] = typer.Option(None, "--weights", help="NAME=PATH: a local metric weight file (names as in `spfbench weights`)."),
    batch_size: int = typer.Option(16, help="Scoring batch size (generation uses the test set's own batch size)."),
    device: Optional[str] = typer.Option(None, help="cpu to force the CPU (default: accelerate's choice)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="tensorboard, wandb or none: every method's training to accelerate's trackers (overrides the config's all.report_to)."),
) -> None:
    """Fit every method, generate the customized image of every triple, score it, and write Table 1 and the report."""
    _quiet_libraries()
    from .run import Runner, read_config

    values = read_config(config)
    if report_to is not None:
        values = {**values, "all": {**values.get("all", {}), "report_to": report_to}}
    runner = Runner(testset, data, out, list(method), preset=preset, config=values, limit=limit,
                    metric_ids=list(metric) if metric else None, retention=retention, curve=curve, curve_limit=curve_limit,
                    paper=paper, device=device, score_batch_size=batch_size, weights=_weights_option(weights or []),
                    progress=progress)
    try:
        outcomes = runner.run()
    except KeyboardInterrupt:
        typer.echo("interrupted: finished images, scores and checkpoints are kept; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    from accelerate import PartialState

    if PartialState().is_main_process:
        typer.echo((out / "results.md").read_text())
        failed = [o for o in outcomes.values() if o.status != "complete"]
        for o in failed:
            typer.echo(f"{o.method}: failed at {o.stage}: {o.error}")
        typer.echo(f"written: {out / 'results.csv'}, {out / 'results.tex'}, {out / 'results.json'}")
        typer.echo(f"report: {(out / 'index.html').resolve()}")
        if failed:
            raise typer.Exit(1)


@app.command()
def plan(
    testset: Path = typer.Option(..., "--testset", help="The run's test set (build-testset)."),
    data: Path = typer.Option(..., "--data", help="The run's training set."),
    out: Path = typer.Option(..., "--out", help="Plan folder: plan.{json,md}, calibration runs (calibration/a, calibration/b)."),
    method: list[str] = typer.Option(..., "--method", help="Method name (repeatable), as for `spfbench run`."),
    config: Optional[Path] = typer.Option(None, "--config", help="The run's config file (as for `spfbench run`)."),
    triples: Optional[int] = typer.Option(None, help="Plan for N triples (default: the test set's); more than the test set has adds the build's cost."),
    calibrate_steps: int = typer.Option(3, help="Calibration trains each method 1 and 1 + K optimizer steps; this is K."),
    metric: Optional[list[str]] = typer.Option(None, "--metric", help="Metric id (repeatable; default: the run's defaults)."),
    preset: Optional[str] = typer.Option(None, help="Metric backbones, as for `spfbench run`."),
    weights: Optional[list[str]] = typer.Option(None, "--weights", help="NAME=PATH: a local metric weight file."),
    batch_size: int = typer.Option(16, help="Scoring batch size, as for `spfbench run`."),
    device: Optional[str] = typer.Option(None, help="cpu to force the CPU."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Estimate a run's hours and peak memory per stage (build, fit per method, generate, score per metric) from a calibration on this hardware."""
    _quiet_libraries()
    from .plan import make_plan, markdown
    from .run import read_config

    result = make_plan(testset, data, list(method), out, config=read_config(config), triples=triples, extra_steps=calibrate_steps,
                       metric_ids=list(metric) if metric else None, preset=preset, device=device,
                       weights=_weights_option(weights or []), score_batch_size=batch_size, progress=progress)
    typer.echo(markdown(result))
    typer.echo(f"written: {out / 'plan.json'}, {out / 'plan.md'}; after the run: spfbench plan-check {out} RUN")


@app.command("plan-check")
def plan_check(
    plan_dir: Path = typer.Argument(..., help="A plan folder (spfbench plan --out) or its plan.json."),
    run_dir: Path = typer.Argument(..., help="The run folder it planned (spfbench run --out)."),
) -> None:
    """The plan's estimate beside the run's own timings (measured / estimated per stage); writes check.{json,md}."""
    from .plan import check

    result = check(plan_dir, run_dir)
    typer.echo(result["markdown"])


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run folder (spfbench run --out)."),
    paper: Optional[bool] = typer.Option(None, "--paper/--no-paper", help="Put the paper's Table 1 beside ours (default: as the run was made)."),
) -> None:
    """Rebuild results.{json,csv,md,tex}, retention.* and index.html from the stored samples (nothing is recomputed)."""
    from .run import write_reports

    paths = write_reports(run_dir, paper=paper)
    typer.echo((run_dir / "results.md").read_text())
    typer.echo("written: " + ", ".join(str(p) for p in paths.values()))


@app.command()
def tradeoff(
    runs: list[Path] = typer.Argument(..., help="Run folders (spfbench run --out) scored with trade-off metrics (ground truth: GT-Target, GT-Preserve), or tradeoff.json files written earlier (their points as saved; a run's point replaces a saved one of the same method, knob and value)."),
    out: Path = typer.Option(..., "--out", help="Folder for tradeoff.png and tradeoff.json."),
    knob: list[str] = typer.Option([], "--knob", help="METHOD=FIELD: label that method's rows by its config field (e.g. lora=rank); rows of several runs become one line."),
    title: str = typer.Option("preservation against response", help="Plot title."),
) -> None:
    """Preservation against response, one line per method (its curve steps and knob values), 95% CIs; which method dominates which."""
    from . import tradeoff as T

    knobs = {}
    for k in knob:
        if "=" not in k or not all(k.split("=", 1)):
            raise SpfbenchError(f"--knob takes METHOD=FIELD (e.g. lora=rank), got {k!r}")
        m, f = k.split("=", 1)
        knobs[m] = f
    saved: list = []
    for r in runs:
        if r.is_file() and r.suffix == ".json":
            saved += T.saved_points(r)
        elif not (r / "run.json").is_file():
            raise SpfbenchError(f"{r}: not a run folder (no run.json) nor a tradeoff.json; give the --out folder of `spfbench run`")
    points = T.merge([p for r in runs if not r.is_file() for p in T.run_points(r, knobs)], saved)
    paths = T.write(points, out, title)
    for c in T.comparisons(points):
        if c["dominates"]:
            typer.echo(f"{c['method']} dominates {c['dominates']} of {c['of']} points of {c['other']}")
    typer.echo(f"{len(points)} points; written: {paths['png']}, {paths['json']}")


COMMANDS_GROUP = "spfbench.commands"  # entry points NAME = "module:typer_app": a plugin's commands as `spfbench NAME ...`


def _add_plugin_commands() -> None:
    """Each plugin's own commands (Portrait World's ``spfbench world ...``) from the ``spfbench.commands`` entry
    points: the command line imports no plugin by name, and only the command modules themselves (light: no model
    library, so ``spfbench --help`` and a refused option stay fast). A plugin that does not load is one line on
    stderr; the other commands still work."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=COMMANDS_GROUP):
        try:
            app.add_typer(ep.load(), name=ep.name)
        except Exception as e:  # noqa: BLE001 - a broken plugin is named, the rest of the command line works
            print(f"warning: commands {ep.name} ({ep.value}) do not load: {e}", file=sys.stderr)


_add_plugin_commands()


viz_app = typer.Typer(help="PNG grids of maps: target-text cross-attention over timesteps (Fig. 2), the SFCM (Fig. 3-4); training curves.")
app.add_typer(viz_app, name="viz")


def _int_list(text: Optional[str], option: str) -> Optional[list[int]]:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpfbenchError(f"{option} takes comma-separated integers, got {text!r}") from None


@viz_app.command("attention")
def viz_attention(
    caption: str = typer.Option(..., "--caption", help="The complete caption to generate (base text, then the target text)."),
    target: str = typer.Option(..., "--target", help="The target text: whole words that occur in --caption; its tokens' maps are shown."),
    model: Optional[list[str]] = typer.Option(None, "--model", help="A row: 'original' (the base model) or NAME=ARTIFACT (a trained RUN/artifact); repeatable, in order. Default: original."),
    out: Path = typer.Option(..., "--out", help="Output .png."),
    preset: str = typer.Option("realistic-vision-v4", help="Base model preset (`spfbench environments`: realistic-vision-v4, sd15, tiny, sd15-random, world, a plugin's)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Real presets: hub id, local diffusers folder, or single-file .safetensors."),
    weights_seed: int = typer.Option(0, help="Random presets: seed of the random weights (must match the runs' --weights-seed)."),
    seed: int = typer.Option(0, help="Generation seed (same initial noise for every model)."),
    sampler: Optional[str] = typer.Option(None, help="Sampler (see build-testset; default: the model's)."),
    steps: int = typer.Option(25, help="Sampling steps."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (the conditional half's maps are shown; default: the preset's, 7; world: 3)."),
    columns: int = typer.Option(5, help="Number of denoising steps shown, evenly spaced from the first to the last."),
    at: Optional[str] = typer.Option(None, "--at", help="Exact 0-based step indices to show, comma-separated (negative: from the end); overrides --columns."),
    size: int = typer.Option(64, help="Map side: every layer's map is resized to SIZE x SIZE before the layer mean."),
    normalize: str = typer.Option("panel", help="Display scaling: panel (each map / its max), row (per model), global, none."),
    cell: int = typer.Option(128, help="Panel side in pixels."),
    image: bool = typer.Option(False, "--image/--no-image", help="Add the generated image as a last column."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    dtype: Optional[str] = typer.Option(None, help="fp32, fp16, bf16 (default: fp16 on cuda, fp32 on cpu)."),
) -> None:
    """Target-text cross-attention maps over denoising steps, one row per model (paper Fig. 2)."""
    _quiet_libraries()
    from .generation import GenerationSettings
    from .viz import ModelSpec, run_attention

    specs = [ModelSpec.parse(m) for m in (model or ["original"])]
    if guidance is None:
        from .models import get_preset

        guidance = get_preset(preset).guidance_scale
    settings = GenerationSettings(sampler=sampler, steps=steps, guidance_scale=guidance)
    grid = run_attention(specs, caption, target, out, preset=preset, base_model=base_model, weights_seed=weights_seed,
                         seed=seed, settings=settings, columns=columns, at=_int_list(at, "--at"), size=size,
                         normalize=normalize, cell=cell, with_image=image, device=device, dtype=dtype)
    typer.echo(f"written {out} ({grid.size[0]}x{grid.size[1]}; rows: {', '.join(s.name for s in specs)})")


@viz_app.command("training")
def viz_training(
    run: Path = typer.Argument(..., help="A training log: a train folder (log.jsonl), a method's run folder (train/log.jsonl) or the .jsonl file."),
    out: Path = typer.Option(..., "--out", help="Output .png."),
) -> None:
    """Every logged number over the optimizer steps: loss parts and, for SPF, its stage-2 diagnostics (docs/spf.md)."""
    from .trainlog import find_log, plot_training

    log = find_log(run)
    plot_training(log, out, title=str(log.parent))
    typer.echo(f"written {out} (from {log})")


@viz_app.command("sfcm")
def viz_sfcm(
    data: Path = typer.Option(..., "--data", help="Training set (as for train)."),
    index: int = typer.Option(0, "--index", help="Item of the training set."),
    out: Path = typer.Option(..., "--out", help="Output .png."),
    artifact: Optional[Path] = typer.Option(None, "--artifact", help="The response path: an SPF RUN/artifact (default: the base model itself)."),
    preset: str = typer.Option("realistic-vision-v4", help="Base model preset (the reference path)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Real presets: hub id, local diffusers folder, or single-file .safetensors."),
    weights_seed: int = typer.Option(0, help="Random presets: seed of the random weights."),
    timestep: int = typer.Option(500, help="Training timestep t of x_t (0 .. num_train_timesteps - 1)."),
    seed: int = typer.Option(0, help="Seed of the VAE posterior sample and of the noise."),
    gamma: Optional[float] = typer.Option(None, help="Force every gamma(i) to this value (1: M-hat = M); default: CLIP cosines."),
    cell: int = typer.Option(128, help="Panel side in pixels."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
) -> None:
    """M, the weighted base-phrase maps and M-hat of one training sample (paper Fig. 3-4)."""
    _quiet_libraries()
    from .viz import run_sfcm

    grid, view = run_sfcm(data, index, out, artifact=artifact, preset=preset, base_model=base_model,
                          weights_seed=weights_seed, timestep=timestep, seed=seed, gamma=gamma, cell=cell, device=device)
    g = ", ".join(f"{p!r}: {x:.2f}" for p, x in zip(view.phrases, view.gamma.tolist()))
    typer.echo(f"written {out} ({grid.size[0]}x{grid.size[1]}); gamma {g}; M-hat mean {view.m_hat.mean().item():.3f}")


@app.command()
def masks(
    data: Path = typer.Option(..., "--data", help="Imagefolder training set (DIR/metadata.jsonl); masks go to DIR/masks/."),
    preset: str = typer.Option("real", help="The environment whose masks to draw: real or full-random (CLIPSeg CIDAS/clipseg-rd64-refined, local weights), tiny (a small random CLIPSeg, tests) or world (a Portrait World set's exact ground-truth regions, from its `attributes` column; no model; phrases without a region get null; docs/world.md)."),
    model: Optional[str] = typer.Option(None, help="real: a local CLIPSeg folder (save_pretrained) or hub id in the HF cache."),
    threshold: float = typer.Option(0.5, help="Mask = bilinear-upsampled sigmoid(logits) > threshold (not used by world)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: cuda when available)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Write a mask per noun phrase (CLIPSeg, or Portrait World's ground truth) and add TokenCompose's attn_list to metadata.jsonl (resumable)."""
    _quiet_libraries()
    from .masks import generate_masks

    r = generate_masks(data, preset, threshold=threshold, model=model, device=device, progress=progress)
    meta = "metadata.jsonl rewritten" if r.metadata_rewritten else "metadata.jsonl unchanged"
    typer.echo(f"masks: {r.masks} masks for {r.samples} samples ({r.segmented} segmented now); {meta}")


def main() -> None:
    """The console entry point: bad input and unusable files are one ``error:`` line and exit 2 (``--debug``,
    or SPFBENCH_DEBUG=1: the traceback instead)."""
    try:
        app()
    except (SpfbenchError, OSError) as e:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        typer.echo(f"error: {one_line(e)}", err=True)
        sys.exit(2)


def one_line(e: BaseException) -> str:
    if isinstance(e, SpfbenchError):
        return str(e)
    # an OSError no check caught (a disk that filled, a folder made read-only meanwhile): what and where
    where = " -> ".join(str(f) for f in (getattr(e, "filename", None), getattr(e, "filename2", None)) if f)
    return f"{e.strerror or type(e).__name__}{': ' + where if where else ''} (rerun with --debug for the traceback)"


if __name__ == "__main__":
    main()
