"""Fine-tuning regimes on the v3 world (issue 20, deliverable 3): does naive fine-tuning learn the targets
and pollute, at the experiment's budget and at a gentle learning rate, and how far does each move the UNet?

For each run folder (``spfbench run`` with ``original`` and ``naive``, then ``spfbench world attributes``):

* GT-Target and GT-Preserve of ``naive`` and ``original`` with their 95% bootstrap CIs (results.json),
  GT-Target per target text (attributes.json);
* the relative weight change of naive's UNet against the test set's original UNet, per module group:
  ``attn2`` (cross-attention, SPF's stage-2 set), ``attn1`` (self-attention), ``resnets`` (ResNet blocks),
  ``other`` (conv_in/out, time embedding, norms, samplers, transformer proj_in/out and feed-forward).
  Per tensor r = ||W_ft - W_0||_F / ||W_0||_F; per group the median and range of r over its tensors and
  the group's aggregate ||dW||_F / ||W_0||_F (all its tensors stacked).

Usage: python results/world/regimes.py [--out STEM] NAME=RUN [NAME=RUN ...]  -> STEM.{json,md}
(STEM default: results/world/regimes)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from spfbench.io import atomic_write_json, atomic_write_text
from spfbench.testset import load_testset

GROUPS = ("attn2", "attn1", "resnets", "other")


def group(name: str) -> str:
    for g in ("attn2", "attn1", "resnets"):
        if f".{g}." in name:
            return g
    return "other"


def weight_change(base_unet, tuned_unet) -> dict:
    a, b = base_unet.state_dict(), tuned_unet.state_dict()
    per = {g: [] for g in GROUPS}
    agg = {g: [0.0, 0.0] for g in GROUPS}
    for k, w0 in a.items():
        if not w0.is_floating_point():
            continue
        w0, w1 = w0.double(), b[k].double()
        d, n = float((w1 - w0).norm()), float(w0.norm())
        g = group(k)
        agg[g][0] += d * d
        agg[g][1] += n * n
        if n > 0:
            per[g].append(d / n)
    out = {}
    for g in GROUPS:
        r = per[g]
        out[g] = {"tensors": len(r), "median": round(statistics.median(r), 4), "min": round(min(r), 4), "max": round(max(r), 4),
                  "aggregate": round((agg[g][0] / agg[g][1]) ** 0.5, 4)}
    allr = [x for g in GROUPS for x in per[g]]
    out["all"] = {"tensors": len(allr), "median": round(statistics.median(allr), 4), "min": round(min(allr), 4), "max": round(max(allr), 4),
                  "aggregate": round((sum(v[0] for v in agg.values()) / sum(v[1] for v in agg.values())) ** 0.5, 4)}
    return out


def _cell(metrics: dict, column: str) -> dict:
    v = metrics[column]
    ci = [v["ci_low"], v["ci_high"]] if v.get("ci_low") is not None else None
    return {"value": v["value"], "ci": ci, "n": v.get("n")}


def regime(run: Path) -> dict:
    from diffusers import UNet2DConditionModel

    res = json.loads((run / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    attrs = json.loads((run / "attributes.json").read_text())
    meta, _ = load_testset(res["spec"]["testset"])
    base = UNet2DConditionModel.from_pretrained(meta["model"]["source"], subfolder="unet").float()
    tuned = UNet2DConditionModel.from_pretrained(run / "methods" / "naive" / "train" / "artifact" / "unet").float()
    from trainers.base import read_artifact_meta

    cfg = read_artifact_meta(run / "methods" / "naive" / "train" / "artifact")["config"]
    out = {"run": str(run), "naive_config": {k: cfg[k] for k in ("learning_rate", "max_train_steps", "train_batch_size") if k in cfg},
           "weight_change": weight_change(base, tuned)}
    for m in ("naive", "original"):
        out[m] = {"gt_target": _cell(rows[m]["metrics"], "GT-Target"), "gt_preserve": _cell(rows[m]["metrics"], "GT-Preserve"),
                  "gt_target_per_text": attrs["methods"][m]["target"]}
    return out


def main(argv: list[str]) -> None:
    stem = Path(__file__).parent / "regimes"
    if argv[:1] == ["--out"]:
        stem, argv = Path(argv[1]), argv[2:]
    runs = dict(a.split("=", 1) for a in argv)
    report = {name: regime(Path(run)) for name, run in runs.items()}
    atomic_write_json(stem.with_name(stem.name + ".json"), report)
    lines = ["| regime | lr | steps x batch | naive GT-Target | naive GT-Preserve | original GT-Target | original GT-Preserve |"
             " dW/W attn2 | dW/W rest (attn1 / resnets / other) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda c: f"{c['value']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]" if c.get("ci") else f"{c['value']:.3f}"  # noqa: E731
    for name, r in report.items():
        w, c = r["weight_change"], r["naive_config"]
        lines.append(f"| {name} | {c.get('learning_rate')} | {c.get('max_train_steps')} x {c.get('train_batch_size')} | {f(r['naive']['gt_target'])} | "
                     f"{f(r['naive']['gt_preserve'])} | {f(r['original']['gt_target'])} | {f(r['original']['gt_preserve'])} | "
                     f"{w['attn2']['aggregate']:.3f} | {w['attn1']['aggregate']:.3f} / {w['resnets']['aggregate']:.3f} / {w['other']['aggregate']:.3f} |")
    lines += ["", "GT-Target per target text (naive; original in brackets):", ""]
    texts = list(next(iter(report.values()))["naive"]["gt_target_per_text"])
    lines += ["| regime | " + " | ".join(texts) + " |", "|---|" + "---:|" * len(texts)]
    for name, r in report.items():
        n, o = r["naive"]["gt_target_per_text"], r["original"]["gt_target_per_text"]
        lines.append(f"| {name} | " + " | ".join(f"{n[t]:.2f} ({o[t]:.2f})" for t in texts) + " |")
    lines += ["", "Relative weight change per tensor, median [min, max] (naive vs the original UNet):", "",
              "| regime | " + " | ".join(GROUPS) + " |", "|---|" + "---:|" * len(GROUPS)]
    for name, r in report.items():
        w = r["weight_change"]
        lines.append(f"| {name} | " + " | ".join(f"{w[g]['median']:.3f} [{w[g]['min']:.3f}, {w[g]['max']:.3f}]" for g in GROUPS) + " |")
    atomic_write_text(stem.with_name(stem.name + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
