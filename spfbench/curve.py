"""The training curve of paper Fig. 5: image fidelity and text alignment across fine-tuning steps.

For step 0 (the base model) and every checkpoint of a training run (``OUT/checkpoints/checkpoint-N``,
written every ``checkpointing_steps`` with ``checkpoints_total_limit=None``), the customized images of a
set of test triples are generated and scored per sample (default: CLIP-T ``clip-t@vit-l-14`` and HPSv2
``hpsv2@v2.1``, which stands in for the paper's ImageReward). Output folder::

    OUT/curve.json                what the curve is of (run identity, test set, triples, settings, model)
    OUT/step-N/artifact/          the checkpoint turned into a normal method artifact (step > 0)
    OUT/step-N/images/ID.png      the customized image of triple ID at step N
    OUT/step-N/scores.json        per-sample values of each metric (metric preset recorded)
    OUT/curve.jsonl, curve.csv    one row per step: step, the mean of each metric, n (images scored)
    OUT/curve.png                 one panel per metric, step on x, titled with the method

A checkpoint becomes an artifact generically (:func:`artifact_from_checkpoint`): the base pipeline is
loaded as the training loop loads it, the method's ``setup`` builds its trainable model (adapters,
stage-1 weights), ``load_trainable_state`` puts the checkpoint's tensors in, the EMA weights replace them
when the run used EMA (as the loop does before its own artifact), and ``save_artifact`` writes the
artifact with the loop's ``method.json``. The artifact of the final checkpoint therefore generates exactly
what the run's own ``OUT/artifact`` generates (tested for naive and lora).

Everything is resumable: a rerun reuses artifacts, images and scores already written (all written
atomically) and refuses an output folder that holds the curve of another run, test set or setting.
"""

from __future__ import annotations

import copy
import csv
import gc
import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import torch

from .errors import SpfbenchError
from .generation import GenerationSettings
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, encode_png

FORMAT_VERSION = 1
DEFAULT_METRICS = ("clip-t@vit-l-14", "hpsv2@v2.1")
LOAD_KEYS = ("preset", "model", "vae", "revision", "seed")


def _plain(obj):
    """``obj`` as JSON would give it back (tuples -> lists), for comparisons with stored JSON."""
    return json.loads(json.dumps(obj))


def _load_kwargs(load_kwargs: dict) -> dict:
    unknown = sorted(set(load_kwargs) - set(LOAD_KEYS))
    if unknown:
        raise SpfbenchError(f"load_kwargs: unknown key(s) {', '.join(unknown)}; known: {', '.join(LOAD_KEYS)}")
    return {k: v for k, v in load_kwargs.items() if v is not None}


def _free(device) -> None:
    gc.collect()
    if torch.cuda.is_available() and str(device or "").startswith("cuda"):
        torch.cuda.empty_cache()


# -- checkpoint -> artifact -------------------------------------------------------------------------


def artifact_from_checkpoint(method, checkpoint_dir, out_dir, *, load_kwargs: dict, device: str | None = None) -> Path:
    """Turn training checkpoint ``checkpoint_dir`` (``OUT/checkpoints/checkpoint-N``) of ``method`` (a
    :class:`trainers.base.Method` instance holding the run's config) into a method artifact in ``out_dir``
    (replaced atomically); returns ``out_dir``.

    ``load_kwargs``: the base model as the run loaded it (``preset``, ``model``, ``vae``, ``revision``,
    ``seed``). The checkpoint's recorded identity (method, config, base model) must match: a checkpoint of
    another run is refused. Generic over methods: a fresh instance of the method's class runs ``setup`` on
    the base model, ``load_trainable_state`` loads the checkpoint, ``save_artifact`` writes the weights.
    """
    from safetensors.torch import load_file

    from spfbench.models import load_pipeline
    from trainers.base import ARTIFACT_META
    from trainers.loop import Trainer, training_models

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    state_path, weights_path = checkpoint_dir / "state.json", checkpoint_dir / "trainable.safetensors"
    if not state_path.is_file() or not weights_path.is_file():
        raise SpfbenchError(f"{checkpoint_dir} is not a training checkpoint (state.json and trainable.safetensors expected)")
    state = json.loads(state_path.read_text())
    step = int(state["step"])
    cfg = copy.deepcopy(method.config)
    fresh = type(method)(cfg)  # setup() keeps per-run state on the instance: never reuse the caller's

    pipe, info = load_pipeline(device=device, dtype=torch.float32, **_load_kwargs(load_kwargs))
    recorded = state.get("identity") or {}
    expected = Trainer(fresh, checkpoint_dir, checkpoint_dir).identity(info.to_dict(), recorded.get("data_fingerprint"))
    if _plain(expected) != recorded:
        what = [k for k in expected if _plain(expected[k]) != recorded.get(k)]
        if "config" in what:
            diff = sorted(k for k in set(expected["config"]) | set(recorded.get("config", {}))
                          if _plain(expected["config"].get(k)) != recorded.get("config", {}).get(k))
            what[what.index("config")] = f"config ({', '.join(diff)})"
        raise SpfbenchError(f"checkpoint {checkpoint_dir} was trained with a different {', '.join(what)} than given"
                            f" (method {recorded.get('method')}); pass the run's own method, config and base model")

    models, params = training_models(pipe, info.preset, fresh, keep_caller_rng=True)  # the loop's own set-up
    fresh.load_trainable_state(models, load_file(weights_path, device=str(models.device)))
    ema_used = False
    if cfg.use_ema and (checkpoint_dir / "ema.pt").is_file():  # the loop's artifact holds the EMA weights
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay)
        ema.load_state_dict(torch.load(checkpoint_dir / "ema.pt", map_location="cpu", weights_only=True))
        ema.to(models.device)
        ema.copy_to(params)
        ema_used = True

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fresh.save_artifact(models, tmp)
        atomic_write_json(tmp / ARTIFACT_META, {
            "method": fresh.name, "config": cfg.to_dict(), "steps": step, "model": info.to_dict(),
            "data_fingerprint": recorded.get("data_fingerprint"), "checkpoint": str(checkpoint_dir.resolve()),
            "ema": ema_used,
        })
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del pipe, models, params, fresh
    _free(device)
    return out_dir


# -- the curve --------------------------------------------------------------------------------------


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _run_identity(train_dir: Path, checkpoints: list[tuple[int, Path]]) -> dict | None:
    run = train_dir / "run.json"
    if run.is_file():
        return json.loads(run.read_text()).get("identity")
    if checkpoints:
        return json.loads((checkpoints[-1][1] / "state.json").read_text()).get("identity")
    return None


def _open_out(out_dir: Path, spec: dict) -> None:
    path = out_dir / "curve.json"
    if path.is_file():
        old = json.loads(path.read_text()).get("spec") or {}
        if old != _plain(spec):
            diff = sorted(k for k in spec if old.get(k) != _plain(spec[k]))
            raise SpfbenchError(f"{out_dir} holds the curve of a different {', '.join(diff)}; use another output folder (nothing was changed)")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"spec": spec, "status": "running"})


def training_curve(
    train_dir,
    method_name: str,
    config: dict | None,
    testset_dir,
    triples,
    out_dir,
    *,
    load_kwargs: dict,
    metrics_preset: str = "real",
    metric_ids=DEFAULT_METRICS,
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    keep_artifacts: bool = True,
) -> list[dict]:
    """Fig. 5 for one training run: rows ``{"step", <metric id>: mean, ..., "n"}`` for step 0 (the base
    model) and every checkpoint of ``train_dir`` (by step), written to ``out_dir`` (see the module doc).

    ``config``: the run's method config (a dict as in ``method.json``; None: ``train_dir/run.json``'s).
    ``triples``: the test triples to generate and score (None: the whole test set). Images are generated
    by the fitted method (:func:`trainers.load_artifact` on a freshly loaded pipeline)
    (``dtype``: the pipeline's, auto = fp16 on CUDA), the complete caption and each triple's seed; step 0
    with the plain base model. ``keep_artifacts=False`` deletes each step's artifact once its images exist.
    """
    import trainers
    from spfbench.metrics import Backbones, Batch, create, ids, is_known
    from spfbench.models import load_pipeline
    from spfbench.scoring import read_image
    from spfbench.testset import load_testset
    from tqdm.auto import tqdm
    from trainers.base import ARTIFACT_META
    from trainers.loop import Trainer

    train_dir, testset_dir, out_dir = Path(train_dir), Path(testset_dir), Path(out_dir)
    metric_ids = list(metric_ids)
    unknown = [m for m in metric_ids if not is_known(m)]
    if unknown or not metric_ids or len(set(metric_ids)) != len(metric_ids):
        raise SpfbenchError(f"curve metrics must be distinct known metric ids, got {metric_ids}; known: {', '.join(ids())}")
    if batch_size < 1:
        raise SpfbenchError("batch_size must be at least 1")
    if config is None:
        run = train_dir / "run.json"
        if not run.is_file():
            raise SpfbenchError(f"{train_dir} holds no run.json: pass the run's method config")
        config = json.loads(run.read_text())["config"]
    method = trainers.create(method_name, config, source=f"{train_dir} config")
    meta, all_triples = load_testset(testset_dir)
    if meta.get("status") != "complete":
        raise SpfbenchError(f"test set {testset_dir} is not complete: finish it with the same build-testset command first")
    settings = (settings or GenerationSettings(**meta["generation"])).validate()  # default: the originals' own
    triples = list(all_triples if triples is None else triples)
    if not triples:
        raise SpfbenchError("no triples to generate for the curve")
    ids = [t.id for t in triples]
    if len(set(ids)) != len(ids):
        raise SpfbenchError("a triple is given twice")
    checkpoints = Trainer(method, train_dir, train_dir).checkpoints()
    if not checkpoints:
        raise SpfbenchError(f"{train_dir} holds no checkpoint (checkpoints/checkpoint-N): train with checkpointing_steps=EVERY"
                            " and checkpoints_total_limit=None for a curve")
    kwargs = _load_kwargs(load_kwargs)
    spec = {
        "format_version": FORMAT_VERSION,
        "method": method.name,
        "run": _run_identity(train_dir, checkpoints),
        "train_dir": str(train_dir.resolve()),
        "testset_content_sha256": meta.get("content_sha256"),
        "triples_sha256": _sha("\n".join(ids)),
        "triples": len(ids),
        "settings": settings.to_dict(),
        "model": {k: kwargs.get(k) for k in LOAD_KEYS},
        "dtype": dtype,
    }
    _open_out(out_dir, spec)

    metrics: dict = {}

    def metric(mid: str):
        if mid not in metrics:
            if "backbones" not in metrics:
                metrics["backbones"] = Backbones(metrics_preset, device)
            metrics[mid] = create(mid, metrics["backbones"])
        return metrics[mid]

    rows = []
    steps = [(0, None)] + checkpoints
    for step, ckpt in tqdm(steps, desc=f"curve {method.name}", unit="step", disable=not progress):
        sdir = out_dir / f"step-{step}"
        images = sdir / "images"
        images.mkdir(parents=True, exist_ok=True)
        scores_path = sdir / "scores.json"
        saved = json.loads(scores_path.read_text()) if scores_path.is_file() else {}
        if saved.get("metrics_preset") != metrics_preset:
            saved = {"metrics_preset": metrics_preset, "values": {}}
        values: dict[str, dict] = saved["values"]

        # 1. images (generated only where missing)
        todo = [t for t in triples if not (images / f"{t.id}.png").is_file()]
        artifact = sdir / "artifact"
        if todo:
            if step and not (artifact / ARTIFACT_META).is_file():
                artifact_from_checkpoint(method, ckpt, artifact, load_kwargs=kwargs, device=device)
            pipe, _ = load_pipeline(device=device, dtype=dtype, **kwargs)
            fitted = trainers.load_artifact(artifact, pipe) if step else trainers.base_model(pipe)
            for chunk in tqdm(list(_chunks(todo, batch_size)), desc=f"step {step} images", leave=False, disable=not progress):
                for t, img in zip(chunk, fitted.generate(chunk, settings)[0]):
                    atomic_write_bytes(images / f"{t.id}.png", encode_png(img))
                    for v in values.values():  # a new image: any score of an older one is stale
                        v.pop(t.id, None)
            del pipe
            _free(device)
        if step and not keep_artifacts:
            shutil.rmtree(artifact, ignore_errors=True)

        # 2. per-sample scores (computed only where missing)
        pending = [t for t in triples if any(t.id not in values.get(m, {}) for m in metric_ids)]
        for chunk in _chunks(pending, batch_size):
            batch = Batch(
                ids=[t.id for t in chunk],
                originals=[read_image(testset_dir / t.original) for t in chunk],
                customized=[read_image(images / f"{t.id}.png") for t in chunk],
                target_texts=[t.target_text for t in chunk],
                prompts=[t.target_caption for t in chunk],
            )
            for mid in metric_ids:
                if any(t.id not in values.get(mid, {}) for t in chunk):
                    m = metric(mid)
                    m.reset()
                    m.update(batch)
                    values.setdefault(mid, {}).update({tid: m.values.get(tid) for tid in batch.ids})
        if pending:
            atomic_write_json(scores_path, saved)

        row: dict = {"step": step}
        for mid in metric_ids:
            got = [values[mid].get(t.id) for t in triples]
            ok = [v for v in got if v is not None and math.isfinite(v)]
            row[mid] = sum(ok) / len(ok) if ok else None
            if len(ok) != len(got):
                row[f"{mid} failures"] = len(got) - len(ok)
        row["n"] = len(triples)
        rows.append(row)

    write_curve(rows, out_dir, method.name, metric_ids)
    atomic_write_json(out_dir / "curve.json", {"spec": spec, "status": "complete", "steps": [r["step"] for r in rows]})
    return rows


def write_curve(rows: list[dict], out_dir, method_name: str, metric_ids) -> None:
    """``curve.jsonl``, ``curve.csv`` and ``curve.png`` of ``rows`` in ``out_dir``."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "curve.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    fields = ["step", *metric_ids, "n"]
    fields += sorted({k for r in rows for k in r} - set(fields))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    atomic_write_text(out_dir / "curve.csv", buf.getvalue())
    atomic_write_bytes(out_dir / "curve.png", plot_curve(rows, method_name, metric_ids))


def plot_curve(rows: list[dict], method_name: str, metric_ids) -> bytes:
    """PNG bytes: one panel per metric (their scales differ), step on a shared x axis (Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from spfbench.metrics import metric_class

    metric_ids = list(metric_ids)
    fig = Figure(figsize=(6.4, 2.4 * len(metric_ids) + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metric_ids), 1, sharex=True, squeeze=False)[:, 0]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    steps = [r["step"] for r in rows]
    for i, (ax, mid) in enumerate(zip(axes, metric_ids)):
        pts = [(s, r.get(mid)) for s, r in zip(steps, rows) if r.get(mid) is not None]
        cls = metric_class(mid)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[i % len(colors)], label=mid)
        ax.set_ylabel(f"{cls.column} {'↑' if cls.higher_is_better else '↓'}")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    from matplotlib.ticker import MaxNLocator

    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("fine-tuning step")
    fig.suptitle(f"{method_name}: {', '.join(metric_class(m).column for m in metric_ids)} across fine-tuning steps")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
