"""Table 1 of the paper from ``spfbench score`` outputs: ``results.csv``, ``results.md``, ``results.tex``.

``collect({method: score_folder})`` reads each folder's ``summary.json`` (value, n per metric) and
``samples.jsonl`` (per-triple values) into a :class:`Table`. Per-sample metrics get a 95% percentile
bootstrap confidence interval over triples (B=1000 resamples of the non-null values, numpy
``default_rng(seed)`` with seed 0 by default, so outputs are deterministic); set-level FID has a value and
N but no CI. ``paired_differences`` gives, for every pair of rows, the mean per-triple difference of each
per-sample column with its 95% paired bootstrap CI (``scipy.stats.bootstrap``). See docs/table1.md for the layout decisions (ranking, ablations, the ``paper`` block).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import SpfbenchError
from .io import atomic_write_text

# (group, column, higher_is_better, decimals) in the paper's order. The paper prints two decimals everywhere.
COLUMNS = [
    ("Preservation", "FID", False, 2),
    ("Preservation", "LPIPS", False, 2),
    ("Preservation", "ID", True, 2),
    ("Preservation", "CLIP-I", True, 2),
    ("Preservation", "Seg-Cons", True, 2),
    ("Responsiveness", "CLIP-T", True, 2),
    ("Overall", "HPSv2", True, 2),
    ("Overall", "MPS", True, 2),
]
COLUMN_NAMES = [c[1] for c in COLUMNS]
# Columns beside the paper's, shown only when some row has them: Portrait World's ground truth (rates 0-1).
EXTRA_COLUMNS = [
    ("Ground truth", "GT-Target", True, 3),
    ("Ground truth", "GT-Preserve", True, 3),
]
GROUPS = ["Preservation", "Responsiveness", "Overall", "Ground truth"]
HIGHER = {c[1]: c[2] for c in COLUMNS + EXTRA_COLUMNS}
DECIMALS = {c[1]: c[3] for c in COLUMNS + EXTRA_COLUMNS}
GROUP_OF = {c[1]: c[0] for c in COLUMNS + EXTRA_COLUMNS}
# Metric id preferred for a column when a summary holds several (docs/metrics.md defaults).
DEFAULT_IDS = {
    "FID": "fid@inception-2048",
    "LPIPS": "lpips@alex-v0.1",
    "ID": "id@arcface-buffalo-l",
    "CLIP-I": "clip-i@vit-l-14",
    "Seg-Cons": "seg-cons@sam-vit-h",
    "CLIP-T": "clip-t@vit-l-14",
    "HPSv2": "hpsv2@v2.1",
    "MPS": "mps@overall",
    "GT-Target": "gt-target@world-reader",
    "GT-Preserve": "gt-preserve@world-reader",
}
# Row order of the paper (our method names); unknown methods follow in the order given.
METHOD_ORDER = ["naive", "adalora", "lora", "tokencompose", "magnet", "spf",
                "spf-no-text", "spf-no-fine", "spf-no-enh", "spf-no-sfcm", "original"]
ABLATION_PREFIX = "spf-no-"
REFERENCE_METHODS = ("original",)  # reference rows (trainers/original.py): listed with the ablations, not ranked
BOOTSTRAP_B = 1000
BOOTSTRAP_SEED = 0


@dataclass
class Cell:
    value: float | None
    n: int | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    metric: str | None = None


@dataclass
class Row:
    method: str
    cells: dict[str, Cell]
    ablation: bool = False
    source: str = "ours"  # "ours" or "paper"
    error: str | None = None  # a method that failed: its row has no values, only this
    notes: tuple[str, ...] = ()  # what its fit recorded for the reader (trainers' ``training_notes``)
    # column -> triple id -> per-sample value (per-sample metrics only; what paired differences pair)
    samples: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return self.method if self.source == "ours" else f"{self.method} (paper)"


@dataclass
class Table:
    rows: list[Row] = field(default_factory=list)


def is_ablation(method: str) -> bool:
    """Rows that are not ranked: SPF's ablations and the reference rows (the untrained base model)."""
    return method.startswith(ABLATION_PREFIX) or method in REFERENCE_METHODS


def bootstrap_ci(values, b: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean of ``values`` (None when empty)."""
    x = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))], dtype=np.float64)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(b)
    chunk = max(1, 2_000_000 // x.size)
    for start in range(0, b, chunk):
        k = min(chunk, b - start)
        means[start : start + k] = x[rng.integers(0, x.size, size=(k, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def _pick_metrics(metrics: dict) -> dict[str, str]:
    """Column -> metric id in a summary (the default id when present, else the first with that column)."""
    out: dict[str, str] = {}
    for col in HIGHER:
        if DEFAULT_IDS[col] in metrics:
            out[col] = DEFAULT_IDS[col]
        else:
            ids = [k for k, r in metrics.items() if r.get("column") == col]
            if ids:
                out[col] = ids[0]
    return out


def read_scores(folder: Path, method: str, b: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED) -> Row:
    folder = Path(folder)
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise SpfbenchError(f"{method}: no summary.json in {folder} (run `spfbench score` first)")
    metrics = json.loads(summary_path.read_text())["metrics"]
    samples = []
    samples_path = folder / "samples.jsonl"
    if samples_path.is_file():
        samples = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
    cells = {}
    per_triple: dict[str, dict[str, float]] = {}
    for col, mid in _pick_metrics(metrics).items():
        r = metrics[mid]
        value = r.get("value")
        cell = Cell(value=None if value is None else float(value), n=r.get("n"), metric=mid)
        if r.get("per_sample", col != "FID") and samples:
            vals = [s.get(mid) for s in samples]
            per_triple[col] = {s["id"]: float(v) for s, v in zip(samples, vals)
                               if v is not None and "id" in s and math.isfinite(float(v))}
            ci = bootstrap_ci(vals, b=b, seed=seed)
            if ci is not None:
                cell.ci_low, cell.ci_high = ci
                if cell.value is None:  # summary without a value: the mean of the per-sample values
                    cell.value = float(np.mean([v for v in vals if v is not None]))
                if cell.n is None:
                    cell.n = sum(v is not None for v in vals)
        cells[col] = cell
    return Row(method=method, cells=cells, ablation=is_ablation(method), samples=per_triple)


PAIRED_RESAMPLES = 2000


def paired_difference(a: dict[str, float], b: dict[str, float], resamples: int = PAIRED_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> dict | None:
    """Mean over the triples both rows scored of (a - b), with the 95% percentile bootstrap CI of that mean
    (``scipy.stats.bootstrap``, resampling triples: the pairing is kept). None when no triple is shared."""
    from scipy.stats import bootstrap

    ids = sorted(set(a) & set(b))
    if not ids:
        return None
    d = np.array([a[i] - b[i] for i in ids], dtype=np.float64)
    out = {"diff": float(d.mean()), "n": len(ids), "ci_low": None, "ci_high": None}
    if len(ids) > 1 and not np.all(d == d[0]):
        ci = bootstrap((d,), np.mean, n_resamples=resamples, confidence_level=0.95, method="percentile",
                       random_state=np.random.default_rng(seed)).confidence_interval
        out["ci_low"], out["ci_high"] = float(ci.low), float(ci.high)
    elif len(ids) > 1:  # every difference equal: the interval is that value
        out["ci_low"] = out["ci_high"] = float(d[0])
    return out


def paired_differences(table: "Table", resamples: int = PAIRED_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> list[dict]:
    """For every pair of our rows (a before b in table order) and every per-sample column both have: the
    paired difference a - b over their shared triples (``paired_difference``)."""
    rows = [r for r in table.rows if r.source == "ours" and not r.error and r.samples]
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            for col in columns(rows):
                if col in a.samples and col in b.samples:
                    d = paired_difference(a.samples[col], b.samples[col], resamples, seed)
                    if d is not None:
                        out.append({"a": a.method, "b": b.method, "column": col, "metric": a.cells[col].metric,
                                    "higher_is_better": HIGHER[col], **d})
    return out


BASELINE = "naive"  # the paper's "naive fine-tuning": every other method is read against it
ABLATED = "spf"  # what the spf-no-* rows ablate


def shown_pairs(rows: list[Row]) -> list[tuple[str, str]]:
    """The comparisons the report shows (``paired_differences`` holds every pair): each method against
    naive, each ablation against full SPF."""
    names = [r.method for r in rows if r.source == "ours" and not r.error]
    pairs = [(m, BASELINE) for m in names if m != BASELINE and BASELINE in names and not m.startswith(ABLATION_PREFIX)]
    pairs += [(m, ABLATED) for m in names if m.startswith(ABLATION_PREFIX) and ABLATED in names]
    return pairs


def find_pair(paired: list[dict], a: str, b: str, column: str) -> dict | None:
    """The difference a - b of ``column`` from ``paired_differences`` output, whichever order it was stored in."""
    for d in paired:
        if d["column"] != column:
            continue
        if (d["a"], d["b"]) == (a, b):
            return d
        if (d["a"], d["b"]) == (b, a):
            lo, hi = d["ci_low"], d["ci_high"]
            return {**d, "a": a, "b": b, "diff": -d["diff"], "ci_low": None if hi is None else -hi, "ci_high": None if lo is None else -lo}
    return None


def ordered_rows(rows: list[Row]) -> list[Row]:
    def key(ir):
        i, r = ir
        known = METHOD_ORDER.index(r.method) if r.method in METHOD_ORDER else len(METHOD_ORDER)
        return (r.source != "ours", r.ablation, known, i)

    return [r for _, r in sorted(enumerate(rows), key=key)]


def collect(scores: dict[str, Path], b: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED) -> Table:
    """Method name -> ``spfbench score`` output folder; rows in the paper's order, ablations last."""
    return Table(rows=ordered_rows([read_scores(Path(p), m, b=b, seed=seed) for m, p in scores.items()]))


def load_paper() -> dict:
    """The paper's published Table 1 (``spfbench/paper/table1.json``) with its source."""
    return json.loads(resources.files("spfbench.paper").joinpath("table1.json").read_text(encoding="utf-8"))


def paper_rows() -> list[Row]:
    data = load_paper()
    return [Row(method=r["method"], cells={c: Cell(value=v) for c, v in r["values"].items()},
                ablation=r["ablation"], source="paper") for r in data["rows"]]


def table_rows(table: Table, paper: bool) -> list[Row]:
    rows = [r for r in table.rows if r.source == "ours"]
    return ordered_rows(rows + (paper_rows() if paper else []))


def columns(rows: list[Row]) -> list[str]:
    """The paper's eight columns, then any extra column some row has."""
    return COLUMN_NAMES + [c for _, c, _, _ in EXTRA_COLUMNS if any(c in r.cells for r in rows)]


def _groups(cols: list[str]) -> list[tuple[str, int]]:
    """(group, number of columns) in order, for the header."""
    return [(g, n) for g in GROUPS if (n := sum(GROUP_OF[c] == g for c in cols))]


def fmt(value: float | None, col: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    d = DECIMALS[col]
    if value != 0 and abs(value) < 0.5 * 10**-d:  # would print as 0.00: two significant digits instead
        d = max(d, 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{d}f}"


def ranks(rows: list[Row]) -> dict[tuple[int, str], int]:
    """(row index, column) -> 1 (best) or 2 (second), per block (ours / paper) among non-ablation rows.

    Ranked on the displayed (rounded) value, so ties in print are ties in bold.
    """
    out = {}
    for source in ("ours", "paper"):
        idx = [i for i, r in enumerate(rows) if r.source == source and not r.ablation]
        for col in columns(rows):
            shown = {}
            for i in idx:
                c = rows[i].cells.get(col)
                if c is not None and fmt(c.value, col) != "-":
                    shown[i] = float(fmt(c.value, col))
            distinct = sorted(set(shown.values()), reverse=HIGHER[col])
            for rank, v in enumerate(distinct[:2], start=1):
                for i, s in shown.items():
                    if s == v:
                        out[(i, col)] = rank
    return out


FIELDS = ("value", "n", "ci_low", "ci_high", "metric")


def frame(table: Table, paper: bool = False):
    """Table 1 as one pandas DataFrame, the single source of the CSV, Markdown and LaTeX (and of anyone's
    own analysis): one row per method in the paper's order (ours, our ablations, then the paper's rows
    with ``paper``); columns ``method, label, source, ablation, error, notes``, then per Table 1 column a
    (column, field) pair for each of ``FIELDS`` and ``rank`` (1 best, 2 second, per block of unranked
    ablations apart; on the displayed value). Column tuples: ``("", "method")`` ... ``("LPIPS", "value")``."""
    import pandas as pd

    rows = table_rows(table, paper)
    cols = columns(rows)
    rk = ranks(rows)
    records = []
    for i, r in enumerate(rows):
        rec = {("", "method"): r.method, ("", "label"): r.label, ("", "source"): r.source, ("", "ablation"): r.ablation,
               ("", "error"): r.error, ("", "notes"): list(r.notes)}
        for col in cols:
            c = r.cells.get(col, Cell(None))
            for f in FIELDS:
                rec[(col, f)] = getattr(c, f)
            rec[(col, "rank")] = rk.get((i, col))
        records.append(rec)
    df = pd.DataFrame.from_records(records, columns=pd.MultiIndex.from_tuples(
        [("", k) for k in ("method", "label", "source", "ablation", "error", "notes")]
        + [(col, f) for col in cols for f in (*FIELDS, "rank")]))
    for col in cols:  # counts and ranks are integers where present
        df[(col, "n")] = df[(col, "n")].astype("Int64")
        df[(col, "rank")] = df[(col, "rank")].astype("Int64")
    return df


def _value_columns(df) -> list[str]:
    return [c for c in dict.fromkeys(df.columns.get_level_values(0)) if c]


def _missing(v) -> bool:
    import pandas as pd

    return v is None or (not isinstance(v, str) and pd.isna(v))


def _opt(v):
    return None if _missing(v) else v


def to_csv(table: Table, paper: bool = False) -> str:
    """One row per method; per column: value, N, ci_low, ci_high, metric id (full precision)."""
    df = frame(table, paper)
    flat = df[[("", "method"), ("", "source"), ("", "ablation")]].copy()
    flat.columns = ["method", "source", "ablation"]
    for col in _value_columns(df):
        for f, name in zip(FIELDS, (col, f"{col} N", f"{col} ci_low", f"{col} ci_high", f"{col} metric")):
            flat[name] = df[(col, f)]
    flat["error"] = df[("", "error")].fillna("")
    return flat.to_csv(index=False, lineterminator="\n")


def arrow(col: str, latex: bool) -> str:
    if latex:
        return r"$\uparrow$" if HIGHER[col] else r"$\downarrow$"
    return "↑" if HIGHER[col] else "↓"


def _block(rec) -> tuple[str, bool]:
    return rec[("", "source")], bool(rec[("", "ablation")])


def _shown(rec, col: str, bold: str, under: str, details: bool) -> str:
    """One cell as displayed: the rounded value (best / second marked), with CI and N when ``details``."""
    s = fmt(_opt(rec[(col, "value")]), col)
    rank = _opt(rec[(col, "rank")])
    if rank == 1:
        s = bold.format(s)
    elif rank == 2:
        s = under.format(s)
    if details and s != "-":
        if not _missing(rec[(col, "ci_low")]):
            s += f" [{fmt(rec[(col, 'ci_low')], col)}, {fmt(rec[(col, 'ci_high')], col)}]"
        if not _missing(rec[(col, "n")]):
            s += f" (N={int(rec[(col, 'n')])})"
    return s


def to_markdown(table: Table, paper: bool = False) -> str:
    """Values with 95% CI in brackets (per-sample metrics) and N; **best**, <u>second</u>."""
    df = frame(table, paper)
    cols = _value_columns(df)
    groups = "; ".join(f"{g}: " + ", ".join(c for c in cols if GROUP_OF[c] == g) for g, _ in _groups(cols))
    lines = [f"Groups: {groups}. Best per column in **bold**, second <u>underlined</u> (non-ablation rows, ours and paper ranked apart).", ""]
    lines.append("| Method | " + " | ".join(f"{col} ({arrow(col, False)})" for col in cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    prev = None
    notes = []
    for _, rec in df.iterrows():
        source, ablation = block = _block(rec)
        if prev is not None and block != prev:
            lines.append("| " + ("*paper, ablations*" if source == "paper" and ablation else "*paper*" if source == "paper" else "*ablations*") + " |" + " |" * len(cols))
        prev = block
        error = _opt(rec[("", "error")])
        if error:
            cells = [f"failed: {error}".replace("|", "\\|").replace("\n", " ")] + [""] * (len(cols) - 1)
        else:
            cells = [_shown(rec, col, "**{}**", "<u>{}</u>", details=True) for col in cols]
        label = rec[("", "label")]
        lines.append(f"| {label}{' *' if rec[('', 'notes')] else ''} | " + " | ".join(cells) + " |")
        notes += [f"* {label}: {n}" for n in rec[("", "notes")]]
    if notes:
        lines += ["", "\\* Notes recorded by the fit:", "", *notes]
    return "\n".join(lines) + "\n"


_TEX_ESCAPE = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s: str) -> str:
    return "".join(_TEX_ESCAPE.get(ch, ch) for ch in s)


LATEX_HEADER = ("% Requires \\usepackage{booktabs}. Generated by spfbench (table1.to_latex, pandas Styler.to_latex).\n"
                "% Wider than one column: put it in a table* float, or wrap the tabular in \\resizebox{\\textwidth}{!}{...}.\n")


def to_latex(table: Table, paper: bool = False) -> str:
    """A booktabs tabular laid out like the paper's Table 1 (values only; CIs and N are in the CSV), written
    by pandas' ``Styler.to_latex`` from :func:`frame`; then the paper's rules: a \\cmidrule under each
    group, a \\midrule between blocks, the published block titled, a failed row as a comment."""
    import pandas as pd

    df = frame(table, paper)
    cols = _value_columns(df)
    ok = df[df[("", "error")].isna()]
    header = pd.MultiIndex.from_tuples([(GROUP_OF[c], f"{tex_escape(c)} ({arrow(c, True)})") for c in cols], names=["Method", None])
    shown = pd.DataFrame([[_shown(rec, c, "\\textbf{{{}}}", "\\underline{{{}}}", details=False) for c in cols] for _, rec in ok.iterrows()],
                         index=[tex_escape(x) for x in ok[("", "label")]], columns=header)
    body = shown.style.to_latex(hrules=True, multicol_align="c", column_format="l" + "c" * len(cols)).splitlines()
    # rules the Styler does not draw: \cmidrule under each group header, a \midrule between blocks
    rules, start = [], 2
    for _, n in _groups(cols):
        rules.append(f"\\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    first_data = body.index("\\midrule") + 1
    out = body[:2] + [body[2], " ".join(rules)] + body[3:first_data]
    data = iter(body[first_data:body.index("\\bottomrule")])
    prev = None
    for _, rec in df.iterrows():
        block = _block(rec)
        if prev is not None and block != prev:
            out.append("\\midrule")
            if block[0] == "paper" and prev[0] == "ours":
                out += [f"\\multicolumn{{{1 + len(cols)}}}{{l}}{{\\textit{{Published values (paper Table 1)}}}} \\\\", "\\midrule"]
        prev = block
        error = _opt(rec[("", "error")])
        if error:  # no values: a comment keeps the table honest about what is missing
            out.append(f"% {rec[('', 'label')]}: failed ({' '.join(error.split())})")
        else:
            out.append(next(data))
    out += ["\\bottomrule", "\\end{tabular}"]
    return LATEX_HEADER + "\n".join(out) + "\n"


def write(table: Table, out: Path, paper: bool = False, stem: str = "results") -> dict[str, Path]:
    """``STEM.csv``, ``STEM.md``, ``STEM.tex`` in ``out`` (stem ``results``: Table 1)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md", "tex": out / f"{stem}.tex"}
    atomic_write_text(paths["csv"], to_csv(table, paper))
    atomic_write_text(paths["md"], to_markdown(table, paper))
    atomic_write_text(paths["tex"], to_latex(table, paper))
    return paths
