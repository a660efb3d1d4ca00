"""A training run's log as curves: ``spfbench viz training`` (every logged number over the optimizer steps).

``log.jsonl`` (trainers/loop.py) holds one row per logged step: step, loss, lr and the method's numbers.
For SPF-Portrait these include its stage-2 diagnostics (trainers/spf_diagnostics.py, docs/spf.md
"Diagnostics"). Panels, each only when the log has its numbers:

* losses: every ``loss_*`` part (log scale when all are positive);
* paths: ``diag_hidden_rel`` (attn2 input features, mean over layers) and ``diag_eps_base_rel`` (noise
  prediction on the base text), relative MSE between the reference and the response path;
* per layer: ``diag_hidden_rel_layers`` as one line per cross-attention layer;
* maps: mean and 90th percentile of M and M-hat;
* localisation: AUC and IoU of M and M-hat against the target masks.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import SpfbenchError

PANELS = (
    ("losses", lambda k: k.startswith("loss_")),
    ("reference vs response (relative MSE)", lambda k: k in ("diag_hidden_rel", "diag_eps_base_rel")),
    ("maps", lambda k: k in ("m_mean", "m_q90", "m_hat_mean", "m_hat_q90")),
    ("target localisation", lambda k: k in ("diag_m_auc", "diag_m_iou", "diag_m_hat_auc", "diag_m_hat_iou")),
)
LAYERS = "diag_hidden_rel_layers"


def find_log(path: Path) -> Path:
    """``path`` itself (a .jsonl file), PATH/log.jsonl, or PATH/train/log.jsonl (a method's run folder)."""
    path = Path(path)
    for p in (path, path / "log.jsonl", path / "train" / "log.jsonl"):
        if p.is_file():
            return p
    raise SpfbenchError(f"{path}: no training log (log.jsonl, train/log.jsonl); give a train folder or a method's run folder")


def read_log(path: Path) -> list[dict]:
    """The rows of a log.jsonl; a torn last line (a killed run) is skipped."""
    rows = []
    for line in find_log(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not rows:
        raise SpfbenchError(f"{find_log(path)}: the log has no rows yet")
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the rows that log it."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def plot_training(path: Path, out: Path, title: str | None = None) -> Path:
    """Write the log's curves to ``out`` (PNG); returns it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .io import atomic_write_bytes

    rows = read_log(path)
    keys = sorted({k for r in rows for k in r})
    panels = [(name, [k for k in keys if want(k)]) for name, want in PANELS]
    panels = [(n, ks) for n, ks in panels if ks]
    has_layers = any(isinstance(r.get(LAYERS), list) for r in rows)
    n = len(panels) + int(has_layers)
    fig = Figure(figsize=(6, 2.6 * n), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, ks) in enumerate(panels):
        ax = fig.add_subplot(n, 1, i + 1)
        for k in ks:
            x, y = series(rows, k)
            ax.plot(x, y, label=k, lw=1)
        if name == "losses" and all(v > 0 for k in ks for v in series(rows, k)[1]):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if has_layers:
        ax = fig.add_subplot(n, 1, n)
        pts = [(r["step"], r[LAYERS]) for r in rows if isinstance(r.get(LAYERS), list)]
        for j in range(len(pts[0][1])):
            ax.plot([p[0] for p in pts], [p[1][j] for p in pts], lw=1, label=f"layer {j}")
        ax.set_title("attn2 input features per layer (relative MSE)", fontsize=9)
        ax.legend(fontsize=6, ncol=4)
        ax.grid(alpha=0.3)
    ax.set_xlabel("optimizer step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return out
