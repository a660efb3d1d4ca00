"""Trade-off curves (issue 21): preservation against response, one line per method.

A single Table 1 row cannot tell a method that preserves because it is better from one that preserves
because it learned little. On a trade-off plot each method is a line through the settings of one knob
(naive: training steps; LoRA: rank; SPF: the alignment weights; any config field), and a method beats
another only where its line dominates: more response *and* more preservation.

The axes are the metrics that declare a ``tradeoff_axis`` (``Metric.tradeoff_axis``: "response",
"preservation"): on Portrait World GT-Target and GT-Preserve, exact up to the reader. A point is the mean
over the same triples with its 95% percentile bootstrap CI (``table1.bootstrap_ci``, the Table 1 CIs).

Points come from run folders (``spfbench run``):

* every complete method row with both axes scored (``methods/M/score/samples.jsonl``); with
  ``knobs={"lora": "rank"}`` the row's knob value is its config's ``rank`` (``methods/M/config.json``), so
  several runs that differ in one field become one line;
* every step of a method's training curve (``--curve N``: ``methods/M/curve/step-S/scores.json``), knob
  "step"; step 0 is the base model.

* a ``tradeoff.json`` written earlier (``saved_points``): its points as they were computed, so a line can
  be added to a committed plot without rerunning the runs behind the others. A point computed from a run
  replaces a saved one of the same method, knob and value (rerunning with the output file among the inputs
  does not draw a point twice).

Dominance (``dominated``): point a dominates point b when a's lower 95% CI bound is at or above b's
mean on both axes, and above it on at least one: deliberately conservative, so a difference inside a's
CI is not called a win.
``spfbench tradeoff RUN [RUN ...] [--knob METHOD=FIELD] --out DIR`` writes ``DIR/tradeoff.{png,json}``;
``spfbench run`` writes ``RUN/tradeoff.png`` into the report whenever its metrics have both axes.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import SpfbenchError
from .io import atomic_write_bytes, atomic_write_json

AXES = ("response", "preservation")


@dataclass(frozen=True)
class Point:
    method: str
    knob: str  # what varies along the method's line ("step", a config field; "" for a lone row)
    value: float | None  # the knob's value (None for a lone row)
    response: float
    response_ci: tuple[float, float] | None
    preservation: float
    preservation_ci: tuple[float, float] | None
    n: int
    source: str  # the run folder (and curve step) it was read from
    response_metric: str = ""
    preservation_metric: str = ""


def axes(metric_ids) -> dict[str, str] | None:
    """{"response": metric id, "preservation": metric id} of the first metrics declaring each axis, or None."""
    from .metrics import is_known, metric_class

    found: dict[str, str] = {}
    for mid in metric_ids:
        if is_known(mid):
            axis = metric_class(mid).tradeoff_axis
            if axis in AXES and axis not in found:
                found[axis] = mid
    return found if len(found) == len(AXES) else None


def _stat(values) -> tuple[float, tuple[float, float] | None, int] | None:
    from .table1 import bootstrap_ci

    ok = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not ok:
        return None
    return sum(ok) / len(ok), bootstrap_ci(ok), len(ok)


def _point(method, knob, value, per_sample: dict[str, list], ax: dict[str, str], source: str) -> Point | None:
    r, p = _stat(per_sample.get(ax["response"], [])), _stat(per_sample.get(ax["preservation"], []))
    if r is None or p is None:
        return None
    return Point(method, knob, value, r[0], r[1], p[0], p[1], min(r[2], p[2]), source, ax["response"], ax["preservation"])


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def run_points(run: Path, knobs: dict[str, str] | None = None) -> list[Point]:
    """The trade-off points of one run folder: its rows, and the steps of its training curves."""
    run = Path(run)
    record_path = run / "run.json"
    if not record_path.is_file():
        raise SpfbenchError(f"{run}: not a run folder (no run.json); give the --out folder of `spfbench run`")
    ax = axes(json.loads(record_path.read_text()).get("spec", {}).get("metrics", []))
    if ax is None:
        return []
    knobs = knobs or {}
    points: list[Point] = []
    for folder in sorted((run / "methods").glob("*")):
        name = folder.name
        samples = folder / "score" / "samples.jsonl"
        if samples.is_file():
            rows = [json.loads(x) for x in samples.read_text().splitlines() if x.strip()]
            per = {m: [r.get(m) for r in rows] for m in ax.values()}
            knob = knobs.get(name, "")
            value = None
            if knob:
                cfg = folder / "config.json"
                config = json.loads(cfg.read_text()) if cfg.is_file() else {}
                if knob not in config:
                    raise SpfbenchError(f"{run}: method {name}'s config has no field {knob!r} (--knob {name}={knob})")
                value = _number(config[knob])
            pt = _point(name, knob, value, per, ax, str(run))
            if pt is not None:
                points.append(pt)
        for step_dir in sorted((folder / "curve").glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
            scores = step_dir / "scores.json"
            if not scores.is_file():
                continue
            values = json.loads(scores.read_text()).get("values", {})
            per = {m: list(values.get(m, {}).values()) for m in ax.values()}
            pt = _point(name, "step", float(step_dir.name.split("-")[1]), per, ax, f"{run}:{step_dir.name}")
            if pt is not None:
                points.append(pt)
    return points


def saved_points(path: Path) -> list[Point]:
    """The points of a ``tradeoff.json`` that ``write`` wrote (CIs and sources as computed then)."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text())["points"]
        return [Point(**{**r, "response_ci": _pair(r["response_ci"]), "preservation_ci": _pair(r["preservation_ci"])})
                for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpfbenchError(f"{path}: not a tradeoff.json written by `spfbench tradeoff` ({e}); give a run folder or such a file") from None


def _pair(ci):
    return None if ci is None else (float(ci[0]), float(ci[1]))


def merge(computed: list[Point], saved: list[Point]) -> list[Point]:
    """``computed`` plus the saved points no computed point replaces (same method, knob and value)."""
    have = {(p.method, p.knob, p.value) for p in computed}
    return computed + [p for p in saved if (p.method, p.knob, p.value) not in have]


def dominated(a: Point, b: Point) -> bool:
    """a dominates b: a's lower CI bound (its mean when it has no CI) is >= b's mean on both axes, strictly on one."""
    lo_r = a.response_ci[0] if a.response_ci else a.response
    lo_p = a.preservation_ci[0] if a.preservation_ci else a.preservation
    return lo_r >= b.response and lo_p >= b.preservation and (lo_r > b.response or lo_p > b.preservation)


def comparisons(points: list[Point]) -> list[dict]:
    """For each ordered pair of methods (A, B): how many of B's points some point of A dominates."""
    methods = sorted({p.method for p in points})
    out = []
    for a in methods:
        for b in methods:
            if a == b:
                continue
            pa, pb = [p for p in points if p.method == a], [p for p in points if p.method == b]
            beaten = [q for q in pb if any(dominated(p, q) for p in pa)]
            out.append({"method": a, "other": b, "dominates": len(beaten), "of": len(pb),
                        "where": [(q.knob, q.value) for q in beaten]})
    return out


def lines(points: list[Point]) -> dict[str, list[Point]]:
    """Each method's points, in the order of its knob value (curve steps, then config values)."""
    out: dict[str, list[Point]] = {}
    for p in points:
        out.setdefault(p.method, []).append(p)
    for m in out:
        out[m].sort(key=lambda p: (p.knob != "step", p.value if p.value is not None else -math.inf))
    return out


def plot(points: list[Point], title: str = "preservation against response") -> bytes:
    """PNG bytes: one line (marker and CI bars) per method, each point labelled with its knob value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not points:
        raise SpfbenchError("no trade-off points: the runs have no complete row scored on both axes")
    fig = Figure(figsize=(7.2, 5.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (method, pts) in enumerate(sorted(lines(points).items())):
        color = f"C{i % 10}"
        xs, ys = [p.response for p in pts], [p.preservation for p in pts]
        xerr = [[p.response - p.response_ci[0] if p.response_ci else 0 for p in pts],
                [p.response_ci[1] - p.response if p.response_ci else 0 for p in pts]]
        yerr = [[p.preservation - p.preservation_ci[0] if p.preservation_ci else 0 for p in pts],
                [p.preservation_ci[1] - p.preservation if p.preservation_ci else 0 for p in pts]]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", ms=4, lw=1.2, elinewidth=0.6, capsize=2,
                    color=color, label=method, alpha=0.9)
        for p in pts:
            if p.value is not None:
                label = f"{p.value:g}" if p.knob == "step" else f"{p.knob}={p.value:g}"
                ax.annotate(label, (p.response, p.preservation), textcoords="offset points", xytext=(4, 3),
                            fontsize=6, color=color)
    from .metrics import is_known, metric_class

    def column(mid: str) -> str:
        return metric_class(mid).column + ", " if is_known(mid) else ""

    ax.set_xlabel(f"{column(points[0].response_metric)}response: the target shown →")
    ax.set_ylabel(f"{column(points[0].preservation_metric)}preservation: everything else kept →")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write(points: list[Point], out_dir: Path, title: str = "preservation against response") -> dict[str, Path]:
    """``OUT/tradeoff.png`` and ``OUT/tradeoff.json`` (every point and the pairwise dominance counts)."""
    image = plot(points, title)  # raises before anything is written when there is nothing to draw
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, js = out_dir / "tradeoff.png", out_dir / "tradeoff.json"
    atomic_write_bytes(png, image)
    atomic_write_json(js, {"points": [asdict(p) for p in points], "comparisons": comparisons(points),
                           "dominance": "a's lower 95% CI bound >= b's mean on both axes, strictly on one"})
    return {"png": png, "json": js}
