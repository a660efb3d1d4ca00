"""The Portrait World attribute reader: a small CNN with one classification head per attribute.

``load_reader(path=None)`` loads the shipped weights (``spfbench/world/weights/reader.safetensors``,
card ``reader.json``); ``reader.read(images)`` gives attribute -> value dicts, ``reader.probs(images)``
attribute -> (N, V) probability arrays. Images of any size are resized to 64 x 64 (LANCZOS).

Retrain (the command recorded in the card)::

    spfbench world train-reader --out spfbench/world/weights/reader.safetensors

Training renders come from a mix of the pretrain split, the fine-tuning split and a "uniform" stream
(every attribute independent and uniform, targets included and possibly several at once), so every
value of every attribute is seen, including the targets and the shifted values, without the
fine-tuning set's correlations. Validation: fresh renders of the heldout split, the fine-tuning split
and the uniform stream drawn with other seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .. import engine
from ..errors import SpfbenchError
from .attributes import ATTRIBUTES, SCHEMA, sample
from .render import render

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "reader.safetensors"
RESOLUTION = 64
WIDTHS = (16, 32, 64, 96)
HIDDEN = 192
FORMAT = "spfbench-world-reader/1"


def card_path(weights: str | os.PathLike) -> Path:
    return Path(weights).with_suffix(".json")


def _build(widths=WIDTHS, hidden=HIDDEN, schema=None):
    import torch
    from torch import nn

    schema = schema or SCHEMA

    class Reader(nn.Module):
        def __init__(self):
            super().__init__()
            layers = [nn.Conv2d(3, widths[0], 4, stride=2, padding=1), nn.BatchNorm2d(widths[0]), nn.ReLU()]
            ci = widths[0]
            for co in widths[1:]:
                layers += [nn.Conv2d(ci, co, 3, padding=1), nn.BatchNorm2d(co), nn.ReLU(), nn.MaxPool2d(2)]
                ci = co
            self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(ci * 16, hidden), nn.ReLU())
            self.heads = nn.ModuleDict({a: nn.Linear(hidden, len(v)) for a, v in schema.items()})

        def forward(self, x: torch.Tensor) -> dict:
            h = self.features(x)
            return {a: head(h) for a, head in self.heads.items()}

    return Reader()


def _to_tensor(images, resolution: int = RESOLUTION):
    import numpy as np
    import torch
    from PIL import Image

    arrs = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.LANCZOS)
        arrs.append(np.asarray(im, dtype=np.uint8))
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    return x


def normalize(x_uint8):
    """uint8 images as the reader's input: floats in [-1, 1]."""
    return x_uint8.float() / 127.5 - 1.0


class AttributeReader:
    """A loaded reader (eval mode, CPU unless moved with :meth:`to`)."""

    def __init__(self, model, schema: dict, card: dict | None = None):
        self.model = model.eval()
        self.schema = schema
        self.card = card or {}
        self.device = "cpu"

    def fingerprint(self) -> str:
        """sha256 of the model's tensors and the attribute schema (what a read depends on)."""
        from ..metrics.base import module_sha256

        return module_sha256(self.model) + "|" + json.dumps(self.schema, sort_keys=True)

    def to(self, device) -> "AttributeReader":
        self.model.to(device)
        self.device = device
        return self

    def probs(self, images, batch_size: int = 256) -> dict:
        """attribute -> float32 numpy array (N, number of values) of probabilities."""
        import numpy as np
        import torch

        images = list(images)
        out = {a: [] for a in self.schema}
        with torch.no_grad():
            for s in range(0, len(images), batch_size):
                x = normalize(_to_tensor(images[s : s + batch_size])).to(self.device)
                logits = self.model(x)
                for a in self.schema:
                    out[a].append(torch.softmax(logits[a].float(), -1).cpu().numpy())
        return {a: (np.concatenate(v) if v else np.zeros((0, len(self.schema[a])), np.float32)) for a, v in out.items()}

    def read(self, images, batch_size: int = 256) -> list[dict]:
        """One attribute -> value dict per image (the most probable value of each attribute)."""
        p = self.probs(images, batch_size)
        n = len(next(iter(p.values()))) if p else 0
        return [{a: self.schema[a][int(p[a][i].argmax())] for a in self.schema} for i in range(n)]


def load_reader(path: str | os.PathLike | None = None) -> AttributeReader:
    """The reader saved at ``path`` (default: the shipped weights)."""
    from safetensors.torch import load_file, safe_open

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise SpfbenchError(f"reader weights {path} do not exist (train them: spfbench world train-reader --out {path})")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise SpfbenchError(f"{path} is not a Portrait World reader ({FORMAT})")
    schema = json.loads(meta["schema"])
    if schema != SCHEMA:
        raise SpfbenchError(f"{path} was trained for another attribute schema; retrain it")
    widths = tuple(json.loads(meta["widths"]))
    model = _build(widths, int(meta["hidden"]), schema)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    cp = card_path(path)
    card = json.loads(cp.read_text()) if cp.is_file() else None
    return AttributeReader(model, schema, card)


# ---------------------------------------------------------------------------------------------- training


def sample_uniform(index: int, seed: int = 0) -> dict:
    """Every attribute independent and uniform over its values (targets included): the reader's
    decorrelating training stream (not a split of the world)."""
    attrs = {}
    for a in ATTRIBUTES:
        h = hashlib.sha256(f"spfbench-world/uniform/{seed}/{index}/{a}".encode()).digest()
        vals = SCHEMA[a]
        if a == "clothing_color" and attrs["background"] in vals:
            vals = [v for v in vals if v != attrs["background"]]
        attrs[a] = vals[int.from_bytes(h[:8], "big") % len(vals)]
    return attrs


def training_mix(index: int, seed: int) -> dict:
    """Training/validation mix: index mod 10 in 0-3 pretrain, 4-6 finetune, 7-9 uniform."""
    r = index % 10
    if r < 4:
        return sample("pretrain", index, seed)
    if r < 7:
        return sample("finetune", index, seed)
    return sample_uniform(index, seed)


def render_set(attr_fn, n: int, seed: int, offset: int = 0):
    """(uint8 renders (n, 3, 64, 64), attribute -> value-index tensor) of ``attr_fn(offset + i, seed)``."""
    import numpy as np
    import torch

    attrs = [attr_fn(offset + i, seed) for i in range(n)]
    x = np.stack([np.asarray(render(a, RESOLUTION, variant=offset + i + 1_000_003 * seed), dtype=np.uint8) for i, a in enumerate(attrs)])
    y = {a: torch.tensor([SCHEMA[a].index(r[a]) for r in attrs]) for a in ATTRIBUTES}
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), y


def augment(x, g):
    """Float images in [-1, 1]: the world augmentation (renders.augment) with the reader's constants."""
    from .renders import augment as world_augment

    return world_augment(x, g, brightness=0.06, offset=0.08, noise=0.03, low=-1.2, high=1.2)


def evaluate(reader: AttributeReader, attrs_list: list[dict], images) -> dict:
    """attribute -> accuracy of ``reader`` on ``images`` with ground truth ``attrs_list``."""
    got = reader.read(images)
    return {a: sum(g[a] == t[a] for g, t in zip(got, attrs_list)) / len(attrs_list) for a in reader.schema}


def train_reader(
    out_path: str | os.PathLike,
    n_train: int = 20000,
    n_val: int = 1500,
    epochs: int = 7,
    seed: int = 0,
    batch_size: int = 96,
    lr: float = 3e-3,
    threads: int = 2,
    vae: str | os.PathLike | None = None,
    vae_share: float = 0.5,
    widths: tuple[int, ...] = WIDTHS,
    hidden: int = HIDDEN,
    log=print,
) -> dict:
    """Train the reader on ``n_train`` mixed renders, validate, save weights + card; returns the card.

    ``vae`` (a world model folder or VAE folder): each training image is, with probability ``vae_share``
    per draw, its reconstruction by that VAE instead of the render, so the reader also reads what generated
    images look like (they all come out of that decoder); validation then reads each stream's renders and
    their reconstructions (``STREAM-vae``), the latter beside the bar, not part of it."""
    import torch
    import torch.nn.functional as F

    from ..io import atomic_write_json

    widths, hidden = tuple(int(w) for w in widths), int(hidden)
    if len(widths) != len(WIDTHS) or min(widths) < 1 or hidden < 1:
        raise SpfbenchError(f"widths must be {len(WIDTHS)} positive channel counts (default {','.join(map(str, WIDTHS))}) and hidden positive")
    if not 0 <= vae_share <= 1:
        raise SpfbenchError(f"vae_share must be between 0 and 1, got {vae_share}")
    t0 = time.time()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out_path = Path(out_path)
    autoencoder = None
    if vae is not None:
        from .renders import load_vae, vae_checksum
        from .vae import reconstruct

        autoencoder = load_vae(vae)
    log(f"rendering {n_train} training images ...")
    x_train, y_train = render_set(training_mix, n_train, seed)
    x_recon = None
    if autoencoder is not None:
        log(f"reconstructing them with the VAE of {vae} ...")
        x_recon = reconstruct(autoencoder, x_train)
    t_render = time.time() - t0
    log(f"rendered in {t_render:.0f} s")
    model = _build(widths, hidden)
    steps_per_epoch = n_train // batch_size
    total = steps_per_epoch * epochs
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=g)

        def one_step(b, perm=perm):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            xb = x_train[idx]
            if x_recon is not None:
                use = torch.rand(len(idx), generator=g) < vae_share
                xb = torch.where(use[:, None, None, None], x_recon[idx], xb)
            x = augment(normalize(xb), g)
            logits = model(x)
            loss = sum(F.cross_entropy(logits[a], y_train[a][idx]) for a in ATTRIBUTES)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            return {"loss": loss.item()}

        def report(row, epoch=epoch):
            if row["step"] % 50:  # an epoch's last, shorter window is not reported
                return
            log(f"epoch {epoch + 1} step {row['step']}/{steps_per_epoch} loss {row['loss']:.3f} ({row['seconds']:.0f} s)")

        engine.run_steps(one_step, 0, steps_per_epoch, sched=sched, log_every=50, on_log=report, elapsed=lambda: time.time() - t0)
    train_seconds = time.time() - t0
    model.eval()

    reader = AttributeReader(model, SCHEMA)
    from PIL import Image

    val_seed = seed + 1000
    accuracy = {}
    for name, fn in (
        ("heldout", lambda i, s: sample("heldout", i, s)),
        ("finetune", lambda i, s: sample("finetune", i, s)),
        ("uniform", sample_uniform),
    ):
        xv, _ = render_set(fn, n_val, val_seed)
        attrs_v = [fn(i, val_seed) for i in range(n_val)]
        for stream, xs in ((name, xv), *(((f"{name}-vae", reconstruct(autoencoder, xv)),) if autoencoder is not None else ())):
            imgs = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in xs]
            accuracy[stream] = {a: round(v, 4) for a, v in evaluate(reader, attrs_v, imgs).items()}
            log(f"val {stream}: " + ", ".join(f"{a} {v:.3f}" for a, v in accuracy[stream].items()))
    worst = {a: min(accuracy[s][a] for s in accuracy if not s.endswith("-vae")) for a in ATTRIBUTES}

    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "schema": json.dumps(SCHEMA), "widths": json.dumps(list(widths)), "hidden": str(hidden)}
    engine.atomic_save_safetensors(state, out_path, meta)
    card = {
        "format": FORMAT,
        "weights": out_path.name,
        "weights_sha256": hashlib.sha256(out_path.read_bytes()).hexdigest(),
        "bytes": out_path.stat().st_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "architecture": f"conv4x4/2 {widths[0]} + 3 x (conv3x3 + BN + ReLU + maxpool) {list(widths[1:])} -> linear {hidden} -> one linear head per attribute",
        "schema": SCHEMA,
        "training": {
            "command": f"spfbench world train-reader --out {out_path} --n-train {n_train} --n-val {n_val} --epochs {epochs} --seed {seed}"
            + (f" --vae {vae} --vae-share {vae_share:g}" if vae is not None else "")
            + (f" --widths {','.join(map(str, widths))} --hidden {hidden}" if (widths, hidden) != (WIDTHS, HIDDEN) else ""),
            "n_train": n_train,
            "mix": "40% pretrain, 30% finetune, 30% uniform (by index mod 10)",
            **({"vae": {"source": str(vae), "checksum": vae_checksum(autoencoder), "share": vae_share,
                        "images": "the VAE's posterior-mean reconstruction of the render, drawn per sample with probability share"}}
               if autoencoder is not None else {}),
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "threads": threads,
            "render_seconds": round(t_render, 1),
            "seconds": round(train_seconds, 1),
            "torch": torch.__version__,
        },
        "validation": {"n_per_stream": n_val, "seed": val_seed, "accuracy": accuracy, "worst_per_attribute": worst},
        "quality_bar": quality_bar(accuracy),
    }
    atomic_write_json(card_path(out_path), card)
    log(f"saved {out_path} ({card['bytes']} bytes); worst attribute accuracy {min(worst.values()):.4f}; {train_seconds:.0f} s")
    return card


BAR = 0.98
BAR_STREAMS = ("heldout", "finetune")  # what the metrics read: originals and single-target customized images


def quality_bar(accuracy: dict) -> dict:
    """The card's bar: every attribute read right at >= ``BAR`` on the streams the metrics read (heldout:
    the original model's kind of images; finetune: one target added); the uniform stream (any combination
    of targets) is reported beside it, not part of the bar."""
    worst = {a: min(accuracy[s][a] for s in BAR_STREAMS) for a in accuracy[BAR_STREAMS[0]]}
    out = {"target": BAR, "streams": list(BAR_STREAMS), "reached": all(v >= BAR for v in worst.values()),
           "min_accuracy": min(worst.values())}
    if "uniform" in accuracy:
        out["uniform_min_accuracy"] = min(accuracy["uniform"].values())
    recon = {s[: -len("-vae")]: accuracy[s] for s in accuracy if s.endswith("-vae")}
    if recon:  # what generated images can show at best: bounded by the VAE, so beside the bar
        out["reconstructions_min_accuracy"] = {s: min(v.values()) for s, v in recon.items()}
    return out
