"""``spfbench plan``: what a run will cost, before it starts, from unit costs measured on this hardware.

Calibration: two small runs of the very run asked for (same test set, data, methods, configs, metrics,
device), each an ordinary ``spfbench run`` folder under ``PLAN/calibration/``:

* ``a``: every method trained for ``k1 = 1`` optimizer step, the first ``S`` triples (``S``: one scoring
  batch rounded up to whole generation batches of ``G``, the test set's), scored with an empty originals'
  cache of its own;
* ``b``: ``k2 = 1 + K`` steps, the first ``2 S`` triples, likewise.

Every stage is modelled as fixed + per-unit cost, and the two sizes separate the two (``timings.json``
of each run, spfbench/timing.py):

* fit:      T(k) = fixed + k * per_step      (model loading, encoding caches, the final save: fixed); per_step
  is the median step time of the loop's own log in run ``b`` (first step left out), fixed what remains of
  ``b``'s fit; a method without a loop log (nothing trained, a rank sweep) takes the line through both runs
* generate: T(n) = fixed + ceil(n / G) * per_batch
* score, per metric: the first method scored pays loading and the originals' side
  (load + n * first_per_image); every later one n * per_image (the originals' cache, docs/metrics.md).

The estimate applies the model to the real sizes: each method's ``max_train_steps`` (a LoRA rank sweep:
times its ranks), every triple of the test set (or ``--triples N``), every method scored. ``build`` is
the cost of the originals the test set still lacks for ``--triples N`` (the `original` method's generation
cost, the same model and sampler). Peak memory per stage is the calibration's (spfbench/timing.py: CUDA
allocator peak; on CPU the process's peak RSS so far, an upper bound).

``check(plan, run)`` sets the estimate beside what the run itself recorded (``methods/M/timings.json``,
``methods/M/score/timings.json``): measured / estimated per row and in total.

Not modelled: ``--retention`` and ``--curve`` (extra generation and scoring), checkpoints beyond the last
one (each costs a save of the trainable state and optimizer), several processes (the estimate is for the
device the calibration ran on), and warm-up effects larger than one step or batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import SpfbenchError
from .io import atomic_write_json, atomic_write_text
from .timing import read_attempts, total_seconds

FORMAT = "spfbench-plan/1"
DEFAULT_EXTRA_STEPS = 3


@dataclass(frozen=True)
class Linear:
    """cost(units) = fixed + units * per_unit, fitted through two measured points (fixed clamped at 0)."""

    fixed: float
    per_unit: float

    @classmethod
    def through(cls, u1: float, t1: float, u2: float, t2: float) -> "Linear":
        if u2 == u1:
            raise ValueError("two calibration sizes must differ")
        per = max((t2 - t1) / (u2 - u1), 0.0)
        return cls(max(t1 - u1 * per, 0.0), per)

    def __call__(self, units: float) -> float:
        return self.fixed + units * self.per_unit


# -- calibration ------------------------------------------------------------------------------------


def calibration_config(config: dict, order: list[str], steps: int) -> dict:
    """The run's config with every method (the required ones too) trained for ``steps`` steps, one checkpoint."""
    out = {k: dict(v) for k, v in config.items()}
    for name in order:
        out[name] = {**out.get(name, {}), "max_train_steps": steps, "checkpointing_steps": steps}
    return out


def _method_stage(run: Path, method: str, stage: str) -> tuple[float | None, int | None]:
    attempts = read_attempts(run / "methods" / method / "timings.json")
    peaks = [a["stages"][stage].get("peak_memory_bytes") for a in attempts if stage in a.get("stages", {})]
    return total_seconds(attempts, stage), max((p for p in peaks if p is not None), default=None)


def _metric_seconds(run: Path, method: str) -> dict[str, float]:
    """Seconds per metric (every part summed) of a method's scoring, over its attempts."""
    out: dict[str, float] = {}
    for a in read_attempts(run / "methods" / method / "score" / "timings.json"):
        for mid, parts in a.get("metrics", {}).items():
            out[mid] = out.get(mid, 0.0) + sum(parts.values())
    return out


def _logged_step_seconds(path: Path) -> float | None:
    """Median seconds per optimizer step in a loop's ``log.jsonl``, the first step left out (it pays the
    warm-up); None without a log of at least two steps."""
    import statistics

    try:
        entries = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return None
    seconds = [e["seconds"] / (e["step"] - p["step"]) for p, e in zip(entries, entries[1:])
               if isinstance(e.get("seconds"), (int, float)) and e.get("step", 0) > p.get("step", 0)]
    return statistics.median(seconds) if seconds else None


def unit_costs(run_a: Path, run_b: Path, steps: tuple[int, int], triples: tuple[int, int], batch: int,
               order: list[str], table: list[str], metric_ids: list[str]) -> dict:
    """Per-unit costs from the two calibration runs (see the module docstring)."""
    methods: dict[str, dict] = {}
    for name in order:
        entry: dict = {}
        (fa, pa), (fb, pb) = _method_stage(run_a, name, "fit"), _method_stage(run_b, name, "fit")
        if fa is None or fb is None:
            raise SpfbenchError(f"calibration: {name} has no fit timing in {run_a} and {run_b} (did it fail? see its status.json)")
        logged = _logged_step_seconds(run_b / "methods" / name / "train" / "log.jsonl")
        if logged is not None:  # the loop's own step times: steady state, free of the fixed part's noise
            fit = Linear(max(fb - steps[1] * logged, 0.0), logged)
        else:  # no loop log (a method that trains nothing, a rank sweep's own folders): two-point fit
            fit = Linear.through(steps[0], fa, steps[1], fb)
        entry["fit"] = {"fixed_s": fit.fixed, "per_step_s": fit.per_unit, "peak_memory_bytes": pb or pa,
                        "per_step_from": "loop log" if logged is not None else "two sizes"}
        if name in table:
            (ga, pa), (gb, pb) = _method_stage(run_a, name, "generate"), _method_stage(run_b, name, "generate")
            if ga is None or gb is None:
                raise SpfbenchError(f"calibration: {name} has no generation timing (did it fail? see its status.json)")
            gen = Linear.through(math.ceil(triples[0] / batch), ga, math.ceil(triples[1] / batch), gb)
            entry["generate"] = {"fixed_s": gen.fixed, "per_batch_s": gen.per_unit, "batch": batch, "peak_memory_bytes": pb or pa}
        methods[name] = entry
    metrics: dict[str, dict] = {}
    first, later = table[0], table[1:]
    sa, sb = _metric_seconds(run_a, first), _metric_seconds(run_b, first)
    for mid in metric_ids:
        if mid not in sa or mid not in sb:
            raise SpfbenchError(f"calibration: no scoring timing for {mid} (see {run_b / 'methods' / first / 'score'})")
        head = Linear.through(triples[0], sa[mid], triples[1], sb[mid])
        rest = [Linear.through(triples[0], _metric_seconds(run_a, m).get(mid, 0.0), triples[1], _metric_seconds(run_b, m).get(mid, 0.0))
                for m in later]
        per = sum(r.per_unit for r in rest) / len(rest) if rest else head.per_unit
        metrics[mid] = {"load_s": head.fixed, "first_per_image_s": head.per_unit, "per_image_s": per,
                        "per_image_measured": bool(rest)}
    score_peaks = [p for m in table for p in [_method_stage(run_b, m, "score")[1]] if p is not None]
    return {"methods": methods, "metrics": metrics, "score_peak_memory_bytes": max(score_peaks, default=None),
            "calibration": {"steps": list(steps), "triples": list(triples), "batch": batch, "runs": [str(run_a), str(run_b)]}}


# -- the estimate -----------------------------------------------------------------------------------


def estimate(costs: dict, fit_steps: dict[str, int], table: list[str], metric_ids: list[str], triples: int, batch: int,
             build_originals: int = 0, build_method: str | None = None) -> list[dict]:
    """Rows ``{stage, item, units, unit, seconds, peak_memory_bytes}`` for a run of ``triples`` triples:
    fit per method (``fit_steps``: name -> optimizer steps, in fit order), generate per table method, score
    per metric (every table method), build for ``build_originals`` originals still to make."""
    rows = []
    m = costs["methods"]
    if build_originals:
        g = m.get(build_method or "", {}).get("generate")
        rows.append({"stage": "build", "item": "originals", "units": build_originals, "unit": "image",
                     "seconds": Linear(g["fixed_s"], g["per_batch_s"])(math.ceil(build_originals / batch)) if g else None,
                     "peak_memory_bytes": g["peak_memory_bytes"] if g else None})
    for name, steps in fit_steps.items():
        f = m[name]["fit"]
        rows.append({"stage": "fit", "item": name, "units": steps, "unit": "step",
                     "seconds": Linear(f["fixed_s"], f["per_step_s"])(steps), "peak_memory_bytes": f["peak_memory_bytes"]})
    for name in table:
        g = m[name]["generate"]
        rows.append({"stage": "generate", "item": name, "units": triples, "unit": "image",
                     "seconds": Linear(g["fixed_s"], g["per_batch_s"])(math.ceil(triples / batch)),
                     "peak_memory_bytes": g["peak_memory_bytes"]})
    for mid in metric_ids:
        c = costs["metrics"][mid]
        seconds = c["load_s"] + triples * c["first_per_image_s"] + (len(table) - 1) * triples * c["per_image_s"]
        rows.append({"stage": "score", "item": mid, "units": triples * len(table), "unit": "image",
                     "seconds": seconds, "peak_memory_bytes": costs.get("score_peak_memory_bytes")})
    return rows


def fit_steps(runner) -> dict[str, int]:
    """Optimizer steps each method of the run trains (a LoRA rank sweep: its steps times its ranks)."""
    from trainers import method_class

    out = {}
    for name in runner.order():
        values = runner.method_config(name)
        ranks = values.get("ranks")
        cfg = method_class(name).Config.from_dict({k: v for k, v in values.items() if k not in ("ranks", "val_data")},
                                                  source=f"{name} config")
        n = len(ranks if isinstance(ranks, (list, tuple)) else str(ranks).split(",")) if ranks else 1
        out[name] = int(cfg.max_train_steps) * n
    return out


def _hours(s) -> str:
    return "-" if s is None else f"{s / 3600:.3f}"


def duration(s) -> str:
    """Seconds as a person reads them: '45 s', '12.5 min', '3.20 h'."""
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def markdown(plan: dict) -> str:
    rows = plan["rows"]
    lines = [f"# Plan: {plan['triples']} triples, {len(plan['table'])} methods, {len(plan['metrics'])} metrics",
             "", f"Device: {plan['device']}; calibrated on {plan['calibration']['triples']} triples and "
             f"{plan['calibration']['steps']} steps. Peak memory: {plan['memory']}.", "",
             "| stage | item | units | time | device-hours | peak GiB |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['item']} | {r['units']} {r['unit']}s | {duration(r['seconds'])} | {_hours(r['seconds'])}"
                     f" | {_gib(r['peak_memory_bytes'])} |")
    lines.append(f"| **total** | | | **{duration(plan['total_seconds'])}** | **{_hours(plan['total_seconds'])}** | |")
    return "\n".join(lines) + "\n"


def make_plan(testset: Path, data: Path, methods: list[str], out: Path, config: dict | None = None, triples: int | None = None,
              extra_steps: int = DEFAULT_EXTRA_STEPS, metric_ids: list[str] | None = None, preset: str | None = None,
              device: str | None = None, weights: dict | None = None, score_batch_size: int = 16, progress: bool = True) -> dict:
    """Calibrate (two small runs under ``out/calibration``), estimate, write ``out/plan.{json,md}``."""
    from .run import Runner, environment
    from . import validate

    out = validate.output_folder(Path(out))
    if extra_steps < 1:
        raise SpfbenchError("--calibrate-steps must be at least 1")
    if triples is not None and triples < 1:
        raise SpfbenchError("--triples must be at least 1")
    config = dict(config or {})
    table = list(methods) if "original" in methods else list(methods) + ["original"]  # `original`: the build's cost
    common = dict(preset=preset, metric_ids=metric_ids, device=device, weights=dict(weights or {}),
                  score_batch_size=score_batch_size, progress=progress)
    real = Runner(testset, data, out / "calibration" / "a", list(methods), config=config, **common)  # validates every input
    n_triples = triples or len(real.triples)
    G = real.gen_batch
    # calibration sizes: whole generation batches, the first at least one scoring batch, the second twice it
    S = -(-max(G, score_batch_size) // G) * G
    sizes = (min(S, len(real.triples)), min(2 * S, len(real.triples)))
    if sizes[0] == sizes[1]:
        raise SpfbenchError(f"the test set has {len(real.triples)} triples; calibration needs at least {2 * S}"
                            f" (two sizes of whole generation batches of {G}, the smaller one scoring batch of {score_batch_size})")
    steps = (1, 1 + extra_steps)
    cal_order = Runner(testset, data, out / "calibration" / "a", table, config=config, **common).order()
    runs = []
    for name, k, n in (("a", steps[0], sizes[0]), ("b", steps[1], sizes[1])):
        folder = out / "calibration" / name
        Runner(testset, data, folder, table, config=calibration_config(config, cal_order, k), limit=n,
               cache_dir=folder / "cache", **common).run()
        runs.append(folder)
    costs = unit_costs(runs[0], runs[1], steps, sizes, G, cal_order, table, real.metric_ids)
    rows = estimate(costs, fit_steps(real), list(methods), real.metric_ids, n_triples, G,
                    build_originals=max(n_triples - len(real.triples), 0), build_method="original")
    import torch
    from accelerate import PartialState

    from .data import location as data_location

    env = environment(PartialState(cpu=device == "cpu" or not torch.cuda.is_available()))
    plan = {"format": FORMAT, "testset": str(Path(testset).resolve()), "data": data_location(data),
            "table": list(methods), "order": real.order(), "config": config, "metrics": real.metric_ids, "triples": n_triples,
            "testset_triples": len(real.triples), "device": env.get("device"), "environment": env,
            "memory": "see timing.py: " + ("CUDA allocator peak" if str(env.get("device")).startswith("cuda") else "process peak RSS (CPU, cumulative)"),
            "calibration": costs["calibration"], "unit_costs": costs, "rows": rows,
            "total_seconds": sum(r["seconds"] or 0.0 for r in rows)}
    atomic_write_json(out / "plan.json", plan)
    atomic_write_text(out / "plan.md", markdown(plan))
    return plan


# -- the check --------------------------------------------------------------------------------------


def measured(run: Path, rows: list[dict]) -> list[float | None]:
    """What the run recorded for each plan row (seconds summed over attempts; None: not recorded)."""
    run = Path(run)
    record = run / "run.json"
    if not record.is_file():
        raise SpfbenchError(f"{run}: not a run folder (no run.json); give the --out folder of `spfbench run`")
    table = json.loads(record.read_text()).get("methods", [])
    out: list[float | None] = []
    for r in rows:
        if r["stage"] in ("fit", "generate"):
            out.append(_method_stage(run, r["item"], r["stage"])[0])
        elif r["stage"] == "score":
            found = [_metric_seconds(run, m).get(r["item"]) for m in table]
            out.append(sum(f for f in found if f is not None) if any(f is not None for f in found) else None)
        else:
            out.append(None)
    return out


def check(plan_dir: Path, run: Path) -> dict:
    """The plan's rows beside the run's own timings; writes ``PLAN/check.{json,md}``."""
    plan_dir = Path(plan_dir)
    path = plan_dir / "plan.json" if plan_dir.is_dir() else plan_dir
    try:
        plan = json.loads(path.read_text())
        if plan.get("format") != FORMAT:
            raise ValueError(f"format {plan.get('format')!r}")
    except (OSError, ValueError) as e:
        raise SpfbenchError(f"{path}: not a plan written by `spfbench plan` ({e})") from None
    rows = plan["rows"]
    got = measured(run, rows)
    if all(g is None for g in got):
        raise SpfbenchError(f"{run} recorded no timings (a run made before timings were recorded?); rerun it, or plan another")
    table = []
    for r, g in zip(rows, got):
        ratio = g / r["seconds"] if g is not None and r["seconds"] else None
        table.append({**r, "measured_seconds": g, "ratio": ratio})
    both = [(t["seconds"], t["measured_seconds"]) for t in table if t["seconds"] is not None and t["measured_seconds"] is not None]
    est, meas = sum(e for e, _ in both), sum(m for _, m in both)
    result = {"plan": str(path), "run": str(run), "rows": table, "estimated_seconds": est, "measured_seconds": meas,
              "ratio": meas / est if est else None}
    lines = ["| stage | item | estimated | measured | measured / estimated |", "|---|---|---:|---:|---:|"]
    for t in table:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        lines.append(f"| {t['stage']} | {t['item']} | {duration(t['seconds'])} | {duration(t['measured_seconds'])} | {ratio} |")
    total = "-" if result["ratio"] is None else f"{result['ratio']:.2f}"
    lines.append(f"| **total** (rows with both) | | {duration(est)} | {duration(meas)} | **{total}** |")
    atomic_write_json(plan_dir / "check.json" if plan_dir.is_dir() else path.with_name("check.json"), result)
    atomic_write_text(plan_dir / "check.md" if plan_dir.is_dir() else path.with_name("check.md"), "\n".join(lines) + "\n")
    result["markdown"] = "\n".join(lines) + "\n"
    return result


__all__ = ["Linear", "calibration_config", "check", "estimate", "fit_steps", "make_plan", "markdown", "measured", "unit_costs"]
