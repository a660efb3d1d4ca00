"""Where does naive fine-tuning's pollution live, and does SPF's stage 2 undo it? (issue 8 write-up)

SPF-Portrait's stage 2 trains the cross-attention layers (attn2) only; stage 1 (naive) changed every
UNet weight. So stage 2 can undo the pollution that lives in attn2 and, through attn2's outputs,
compensate some of the rest. This script splits naive's UNet into its attn2 weights and everything
else and measures each half on the run's triples, with the run's own sampler and seeds, read by the
attribute reader exactly as GT-Preserve / GT-Target do:

* ``naive``, ``spf``: the run's own images (complete caption);
* ``naive, attn2 reset``: naive's UNet with the original model's attn2 weights;
* ``original + naive attn2``: the original UNet with naive's attn2 weights only;
* ``naive (base text)``, ``spf (base text)``: the base text alone (the paper's Fig. 9 retention;
  here every one of the 14 attributes must be kept, so the target's own attribute counts too; "target"
  is then a spurious reading);
* ``naive, attn2 only`` and ``spf on naive, attn2 only``: a control for the implementation: stage 1
  re-run with the run's naive config but only attn2 trainable (all pollution within stage 2's reach),
  then stage 2 with the run's SPF config on top of it. Trained in ``RUN/diagnostics/``;
* ``spf, alignment x10``: stage 2 on the run's naive with lambda2 and lambda3 ten times the paper's
  (the alignment terms' weight against L_diff, whose scale depends on the model's feature widths).
Also recorded: the weighted loss terms of the run's SPF training (mean of its last 50 logged steps).

Usage (after results/world/run.sh): python results/world/where_pollution_lives.py runs/world-exp/run [THREADS]
Writes results/world/pollution.{json,md}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from spfbench.generation import GenerationSettings, generate
from spfbench.io import atomic_write_json, atomic_write_text
from spfbench.testset import load_testset
from spfbench.world.attributes import ATTRIBUTES, TARGET_TEXTS
from spfbench.world.pipeline import load_world_pipeline
from spfbench.world.reader import load_reader


def _attn2(name: str) -> bool:
    return ".attn2." in name


def _images(folder: Path, triples) -> list:
    return [Image.open(folder / f"{t.id}.png").convert("RGB") for t in triples]


def _generate(pipe, triples, settings, batch: int, base_only: bool, desc: str) -> list:
    out = []
    for s in tqdm(range(0, len(triples), batch), desc=desc):
        chunk = triples[s : s + batch]
        out += generate(pipe, [t.base_caption if base_only else t.target_caption for t in chunk], [t.seed for t in chunk], settings)
    return out


def _rates(orig_reads, reads, triples, base_only: bool) -> dict:
    kept: dict[str, list[int]] = {a: [] for a in ATTRIBUTES}
    per_triple, hits = [], []
    for a, b, t in zip(orig_reads, reads, triples):
        attr, value = TARGET_TEXTS[t.target_text]
        names = [k for k in ATTRIBUTES if base_only or k != attr]
        for k in names:
            kept[k].append(int(a[k] == b[k]))
        per_triple.append(sum(a[k] == b[k] for k in names) / len(names))
        hits.append(int(b[attr] == value))
    n = len(triples)
    return {"preserve": sum(per_triple) / n, "target": sum(hits) / n, "n": n,
            "per_attribute": {k: sum(v) / len(v) for k, v in kept.items() if v}}


def main(run: str, threads: int = 2) -> None:
    torch.set_num_threads(threads)
    run = Path(run)
    record = json.loads((run / "run.json").read_text())
    ts = Path(record["spec"]["testset"])
    meta, triples = load_testset(ts)
    settings = GenerationSettings(**meta["generation"])
    batch = int(meta["spec"].get("batch_size", 4))
    reader = load_reader()
    orig_reads = reader.read([Image.open(ts / t.original).convert("RGB") for t in triples])

    pipe = load_world_pipeline(meta["model"]["source"])
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    naive_unet = run / "methods" / "naive" / "train" / "artifact" / "unet"
    spf_unet = run / "methods" / "spf" / "train" / "artifact" / "unet"
    from diffusers import UNet2DConditionModel

    naive = UNet2DConditionModel.from_pretrained(naive_unet, local_files_only=True).state_dict()
    spf = UNet2DConditionModel.from_pretrained(spf_unet, local_files_only=True).state_dict()
    moved = {k: float((naive[k].float() - original[k].float()).norm() / (original[k].float().norm() + 1e-12)) for k in original}
    spf_moved = {k: float((spf[k].float() - naive[k].float()).norm() / (naive[k].float().norm() + 1e-12)) for k in original}
    n_attn2 = sum(original[k].numel() for k in original if _attn2(k))

    rows = {}
    for name in ("naive", "spf"):
        rows[name] = _rates(orig_reads, reader.read(_images(run / "methods" / name / "images", triples)), triples, False)
    variants = [
        ("naive, attn2 reset", {k: (original[k] if _attn2(k) else naive[k]) for k in original}, False),
        ("original + naive attn2", {k: (naive[k] if _attn2(k) else original[k]) for k in original}, False),
        ("naive (base text)", naive, True),
        ("spf (base text)", spf, True),
    ]
    for name, state, base_only in variants:
        pipe.unet.load_state_dict(state)
        rows[name] = _rates(orig_reads, reader.read(_generate(pipe, triples, settings, batch, base_only, name)), triples, base_only)

    # the control: stage 1 with attn2 only, then stage 2 on it (the run's own configs and data)
    from trainers.naive import Naive
    from trainers.spf import Spf, SpfConfig

    class NaiveAttn2(Naive):
        name = "naive-attn2"

        def setup(self, models):
            models.unet.requires_grad_(False)
            for k, p in models.unet.named_parameters():
                p.requires_grad_(_attn2(k))
            models.unet.train()
            return [p for p in models.unet.parameters() if p.requires_grad]

    spec = record["spec"]
    kw = dict(preset=spec["preset"], model=spec.get("model"), vae=spec.get("vae"), device="cpu")
    diag = run / "diagnostics"
    naive_cfg = json.loads((run / "methods" / "naive" / "config.json").read_text())
    spf_cfg = json.loads((run / "methods" / "spf" / "config.json").read_text())
    stage1 = NaiveAttn2.fit(naive_cfg, spec["data"], diag / "naive-attn2", **kw)
    stage2 = Spf.fit({**spf_cfg, "stage1_artifact": str(stage1)}, spec["data"], diag / "spf-on-naive-attn2", **kw)
    naive_art = run / "methods" / "naive" / "train" / "artifact"
    strong = Spf.fit({**spf_cfg, "stage1_artifact": str(naive_art), "lambda2": 2.0, "lambda3": 1.0}, spec["data"], diag / "spf-align-x10", **kw)
    for name, art in (("naive, attn2 only", stage1), ("spf on naive, attn2 only", stage2), ("spf, alignment x10", strong)):
        pipe.unet.load_state_dict(UNet2DConditionModel.from_pretrained(Path(art) / "unet", local_files_only=True).state_dict())
        rows[name] = _rates(orig_reads, reader.read(_generate(pipe, triples, settings, batch, False, name)), triples, False)

    log = [json.loads(x) for x in (run / "methods" / "spf" / "train" / "log.jsonl").read_text().splitlines() if x.strip()][-50:]
    cfg = SpfConfig.from_dict({k: v for k, v in spf_cfg.items() if k != "stage1_artifact"})
    lam = {"loss_diffusion": 1.0, "loss_enhanced": cfg.lambda1, "loss_text": cfg.lambda2, "loss_fine": cfg.lambda3}
    terms = {k: _mean([r[k] * w for r in log if k in r]) for k, w in lam.items()}
    res = {
        "run": str(run), "triples": len(triples), "rows": rows, "spf_weighted_loss_terms": terms,
        "attn2_share_of_unet_parameters": n_attn2 / sum(v.numel() for v in original.values()),
        "relative_change_naive_vs_original": {"attn2": _mean([v for k, v in moved.items() if _attn2(k)]),
                                              "other": _mean([v for k, v in moved.items() if not _attn2(k)])},
        "relative_change_spf_vs_naive": {"attn2": _mean([v for k, v in spf_moved.items() if _attn2(k)]),
                                         "other": _mean([v for k, v in spf_moved.items() if not _attn2(k)])},
    }
    out = Path(os.environ.get("POLLUTION_OUT", Path(__file__).parent))
    atomic_write_json(out / "pollution.json", res)
    lines = [f"Where naive's pollution lives ({len(triples)} triples of {run}; reader-read, as GT-Preserve / GT-Target).", "",
             "| UNet | text | preserve | target | " + " | ".join(ATTRIBUTES) + " |", "|---|---|---:|---:|" + "---:|" * len(ATTRIBUTES)]
    for name, r in rows.items():
        text = "base" if "base text" in name else "complete"
        pa = " | ".join(f"{r['per_attribute'][a]:.2f}" if a in r["per_attribute"] else "-" for a in ATTRIBUTES)
        lines.append(f"| {name} | {text} | {r['preserve']:.3f} | {r['target']:.3f} | {pa} |")
    lines += ["", f"attn2 holds {res['attn2_share_of_unet_parameters']:.1%} of the UNet's parameters. Mean relative weight change "
              f"(||W - W0|| / ||W0|| per tensor): naive vs original attn2 {res['relative_change_naive_vs_original']['attn2']:.3f}, "
              f"other {res['relative_change_naive_vs_original']['other']:.3f}; spf vs naive attn2 "
              f"{res['relative_change_spf_vs_naive']['attn2']:.3f}, other {res['relative_change_spf_vs_naive']['other']:.3f}.", "",
              "SPF's weighted loss terms (last 50 logged steps): " + ", ".join(f"{k} {v:.4f}" for k, v in terms.items()), ""]
    atomic_write_text(out / "pollution.md", "\n".join(lines))
    print("\n".join(lines))


def _mean(v: list[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
