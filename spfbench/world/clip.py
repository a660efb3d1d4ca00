"""The Portrait World CLIP: a small open_clip CLIP (image and text towers) trained contrastively on the
world, for CLIP-I, CLIP-T, SFCM's gamma and L_enhanced in this world.

``load_world_clip(path=None) -> (model, preprocess, tokenizer)`` (default: the shipped
``spfbench/world/weights/clip.safetensors``, card ``clip.json``): the same triple as
``spfbench.metrics.clip.tiny_clip``, so it drops into ``ClipBackbone``. The model is open_clip's own
``open_clip.CLIP`` class built from :data:`CONFIG`: a ModifiedResNet image tower (open_clip's RN50 kind:
3-conv stem, one bottleneck per stage, attention pooling; width 16, 64 px) and a 4-layer text
transformer (width 128, the text tower named as in every open_clip CLIP); the tokenizer the real
OpenAI BPE (``open_clip.get_tokenizer("ViT-B-32")``, context 77), the preprocessing open_clip's
``image_transform(64, is_train=False, mean=MEAN, std=STD)``.

Retrain (the command recorded in the card)::

    python -m spfbench.world.clip --out spfbench/world/weights/clip.safetensors

Training: renders of a mix of the pretrain and finetune splits and the reader's uniform stream
(``reader.sample_uniform``: every attribute independent, targets included), cached once as uint8.
Every step draws one text per image, mostly about the fine attributes (:data:`TEXT_WEIGHTS`; the colours
are rare, they were a shortcut): a single phrase alone (50%; the bare target texts exactly as the test
set uses them, "a hat", "glasses", ..., since CLIP-T is cos(image, target text alone)), 2-3 phrases
(40%), or the complete caption (``join_caption(base_caption, targets)``) followed by 1-2 phrases of
unnamed attributes (10%).
Loss: symmetric InfoNCE with open_clip's learnable temperature, with *multi-positive* targets: text j
counts as a positive of image i when every attribute it names holds in image i (ground truth is known),
so "a hat" is a positive of every hat image in the batch rather than a false negative. When every text
is true of its own image only this is exactly open_clip's ``ClipLoss``. Plus an auxiliary loss: one
linear classifier per attribute on the normalised image embedding (training only, not saved).

Storage: float16; the text token embedding keeps only the rows of the tokens seen in training (the
others are zero in the loaded model: a text made only of unseen words encodes to a constant).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path

from ..errors import SpfbenchError
from .attributes import ATTRIBUTES, CAPTIONED, SCHEMA, TARGET_ATTRIBUTES, TARGET_TEXTS, UNCAPTIONED, base_caption, sample
from .render import render

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "clip.safetensors"
FORMAT = "spfbench-world-clip/1"
RESOLUTION = 64
# OpenAI's mean/std (open_clip.OPENAI_DATASET_MEAN/STD), so the differentiable preprocessing of SPF's
# L_enhanced (trainers.spf_losses.clip_preprocess, OpenAI mean/std by default) matches it too
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TOKENIZER = "ViT-B-32"  # open_clip's name for the OpenAI BPE tokenizer (context 77)
CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": RESOLUTION, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
    "quick_gelu": False,
}

# attribute -> value -> its phrase (the zero-shot prompts; the targets' present values are the target texts)
PHRASES: dict[str, dict[str, str]] = {
    "subject": {"man": "a man", "woman": "a woman", "boy": "a boy", "girl": "a girl", "old man": "an old man", "old woman": "an old woman"},
    "expression": {"smiling": "smiling", "laughing": "laughing", "neutral": "with a neutral expression", "surprised": "looking surprised"},
    "background": {
        **{c: f"with a {c} background" for c in ("blue", "red", "white", "green", "yellow")},
        "brick wall": "in front of a brick wall",
        "beach": "at the beach",
        "forest": "in a forest",
    },
    "clothing_color": {c: f"{c} clothes" for c in SCHEMA["clothing_color"]},
    "garment": {"T-shirt": "a T-shirt", "shirt": "a shirt", "hoodie": "a hoodie", "tank top": "a tank top", "turtleneck": "a turtleneck", "jacket": "a jacket"},
    "hair_style": {"short": "short hair", "long": "long hair", "bob": "a bob haircut", "ponytail": "a ponytail", "curly": "curly hair"},
    "hair_color": {c: f"{c} hair" for c in SCHEMA["hair_color"]},
    "skin_tone": {t: f"{t} skin" for t in SCHEMA["skin_tone"]},
    "position": {"left": "on the left", "center": "in the center", "right": "on the right"},
    "pose": {"front": "facing the front", "turned left": "turned left", "turned right": "turned right"},
    "headwear": {"none": "no hat", "hat": "a hat"},
    "eyewear": {"none": "no glasses", "glasses": "glasses", "sunglasses": "sunglasses"},
    "freckles": {"no": "no freckles", "yes": "freckles"},
    "style": {"photo": "a photo", "pencil drawing": "pencil drawing style"},
}
for _t, (_a, _v) in TARGET_TEXTS.items():
    assert PHRASES[_a][_v] == _t, (_t, _a, _v)


def card_path(weights: str | os.PathLike) -> Path:
    return Path(weights).with_suffix(".json")


def world_clip_model(seed: int = 0, config: dict | None = None):
    """A fresh (random-weight) world CLIP: ``open_clip.CLIP`` built from :data:`CONFIG`."""
    import open_clip
    import torch

    cfg = config or CONFIG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(
            embed_dim=cfg["embed_dim"], vision_cfg=dict(cfg["vision_cfg"]), text_cfg=dict(cfg["text_cfg"]), quick_gelu=cfg["quick_gelu"]
        )
    return model


def world_preprocess():
    import open_clip  # noqa: F401
    from open_clip.transform import image_transform

    return image_transform(RESOLUTION, is_train=False, mean=MEAN, std=STD)


def world_tokenizer():
    import open_clip

    return open_clip.get_tokenizer(TOKENIZER)


# ---------------------------------------------------------------------------------------------- save / load


def save_world_clip(model, path: str | os.PathLike, keep_rows=None, extra_meta: dict | None = None) -> Path:
    """Save ``model`` (float16) at ``path``; the token embedding keeps rows ``keep_rows`` (default: its
    non-zero rows)."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    emb = state.pop("token_embedding.weight")
    if keep_rows is None:
        keep_rows = torch.nonzero(emb.abs().sum(1) > 0).flatten()
    rows = torch.as_tensor(sorted(set(int(r) for r in keep_rows)), dtype=torch.int64)
    out = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    out["token_embedding.rows"] = rows
    out["token_embedding.values"] = emb[rows].half().contiguous()
    cfg = {
        "embed_dim": model.text_projection.shape[1],
        "vision_cfg": CONFIG["vision_cfg"],
        "text_cfg": CONFIG["text_cfg"],
        "quick_gelu": CONFIG["quick_gelu"],
    }
    meta = {"format": FORMAT, "config": json.dumps(cfg), "mean": json.dumps(MEAN), "std": json.dumps(STD), "tokenizer": TOKENIZER}
    meta.update(extra_meta or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(out, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def load_world_clip(path: str | os.PathLike | None = None):
    """``(model, preprocess, tokenizer)`` of the world CLIP saved at ``path`` (default: the shipped
    weights); the model in eval mode, float32, CPU."""
    import torch
    from safetensors.torch import load_file, safe_open

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise SpfbenchError(f"world CLIP weights {path} do not exist (train them: python -m spfbench.world.clip --out {path})")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise SpfbenchError(f"{path} is not a Portrait World CLIP ({FORMAT})")
    if tuple(json.loads(meta["mean"])) != MEAN or tuple(json.loads(meta["std"])) != STD:
        raise SpfbenchError(f"{path} was trained with another normalisation")
    cfg = json.loads(meta["config"])
    model = world_clip_model(0, cfg)
    raw = load_file(str(path))
    rows, values = raw.pop("token_embedding.rows"), raw.pop("token_embedding.values")
    emb = torch.zeros(cfg["text_cfg"]["vocab_size"], cfg["text_cfg"]["width"])
    emb[rows] = values.float()
    state = {k: v.float() if v.is_floating_point() else v for k, v in raw.items()}
    state["token_embedding.weight"] = emb
    model.load_state_dict(state, strict=True)
    return model.eval(), world_preprocess(), world_tokenizer()


# ---------------------------------------------------------------------------------------------- data


def _mixed(index: int, seed: int) -> dict:
    """Training/evaluation mix by index mod 10: 0-2 pretrain, 3-5 finetune, 6-9 uniform."""
    from .reader import sample_uniform

    r = index % 10
    if r < 3:
        return sample("pretrain", index, seed)
    if r < 6:
        return sample("finetune", index, seed)
    return sample_uniform(index, seed)


def _variant(index: int, seed: int) -> int:
    return index + 1_000_003 * (seed + 7)


def render_cache(n: int, seed: int, attr_fn=_mixed, log=None):
    """(uint8 tensor (n, 3, 64, 64), attribute-index tensor (n, 14), attribute dicts)."""
    import numpy as np
    import torch

    attrs = [attr_fn(i, seed) for i in range(n)]
    x = np.empty((n, RESOLUTION, RESOLUTION, 3), np.uint8)
    for i, a in enumerate(attrs):
        x[i] = np.asarray(render(a, RESOLUTION, variant=_variant(i, seed)), dtype=np.uint8)
        if log and (i + 1) % 5000 == 0:
            log(f"rendered {i + 1}/{n}")
    y = torch.tensor([[SCHEMA[a].index(r[a]) for a in ATTRIBUTES] for r in attrs], dtype=torch.int64)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), y, attrs


def _phrase(attrs: dict, a: str) -> tuple[str, tuple[str, str]]:
    return PHRASES[a][attrs[a]], (a, attrs[a])


# how often an attribute is named in the short texts: the fine attributes (uncaptioned, targets, subject,
# expression, garment) far more than the colours, which are learnt anyway (the colour shortcut)
TEXT_WEIGHTS: dict[str, float] = {
    "subject": 1.0, "expression": 1.0, "background": 0.15, "clothing_color": 0.5, "garment": 1.0,
    "hair_style": 1.0, "hair_color": 1.0, "skin_tone": 1.0, "position": 1.0, "pose": 1.0,
    "headwear": 1.0, "eyewear": 1.0, "freckles": 1.0, "style": 0.4,
}


def _weighted_attributes(rng: random.Random, k: int) -> list[str]:
    pool, weights, out = list(ATTRIBUTES), [TEXT_WEIGHTS[a] for a in ATTRIBUTES], []
    for _ in range(k):
        j = rng.choices(range(len(pool)), weights)[0]
        out.append(pool.pop(j))
        weights.pop(j)
    return out


def sample_text(attrs: dict, rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """One training text for an image with ``attrs`` and the (attribute, value) claims it makes:
    50% one phrase alone (attribute drawn by :data:`TEXT_WEIGHTS`; a fifth of the time the phrase of
    a present target, i.e. a bare target text), 40% 2-3 phrases of distinct weighted attributes, 10%
    the complete caption followed by 1-2 phrases of unnamed fine attributes."""
    from ..captions import join_caption

    present = [a for a in TARGET_ATTRIBUTES if attrs[a] != SCHEMA[a][0]]
    u = rng.random()
    if u < 0.5:
        a = rng.choice(present) if present and rng.random() < 0.2 else _weighted_attributes(rng, 1)[0]
        text, claim = _phrase(attrs, a)
        return text, [claim]
    if u < 0.9:
        parts = [_phrase(attrs, a) for a in _weighted_attributes(rng, rng.randint(2, 3))]
        return ", ".join(p for p, _ in parts), [c for _, c in parts]
    # the complete caption (every present target named) with unnamed fine attributes appended
    claims = [(a, attrs[a]) for a in CAPTIONED] + [(a, attrs[a]) for a in present]
    text = base_caption(attrs)
    if present:
        text = join_caption(text, ", ".join(PHRASES[a][attrs[a]] for a in present))
    pool = UNCAPTIONED + [a for a in TARGET_ATTRIBUTES if a not in present]
    extra = rng.sample(pool, rng.randint(1, 2))
    text = join_caption(text, ", ".join(PHRASES[a][attrs[a]] for a in extra))
    claims += [(a, attrs[a]) for a in extra]
    return text, claims


def _claim_vector(claims) -> list[int]:
    v = [-1] * len(ATTRIBUTES)
    for a, val in claims:
        v[ATTRIBUTES.index(a)] = SCHEMA[a].index(val)
    return v


def truth_matrix(y, claim_vectors):
    """(images, texts) bool: text j's every claim holds in image i."""
    c = claim_vectors
    return ((y[:, None, :] == c[None, :, :]) | (c[None, :, :] < 0)).all(-1)


def multi_positive_clip_loss(image_features, text_features, logit_scale, truth):
    """Symmetric InfoNCE (open_clip's ClipLoss) with soft targets spread over every true pair; equals
    ClipLoss when ``truth`` is the identity."""
    import torch.nn.functional as F

    logits = logit_scale * image_features @ text_features.T
    t = truth.float()
    li = F.cross_entropy(logits, t / t.sum(1, keepdim=True))
    lt = F.cross_entropy(logits.T, t.T / t.T.sum(1, keepdim=True))
    return (li + lt) / 2


def encode_text_trimmed(model, text):
    """``model.encode_text(text)`` computed on the first L tokens only (L = the longest text's length
    up to its end token). Identical to the full 77-token forward: attention is causal and the pooled
    feature is the end token's."""
    import torch

    from open_clip.transformer import text_global_pool

    length = int(text.argmax(dim=-1).max()) + 1
    text = text[:, :length]
    x = model.token_embedding(text) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, text, model.text_pool_type)
    return x @ model.text_projection if isinstance(model.text_projection, torch.Tensor) else model.text_projection(x)


def _encode_text_bucketed(model, tok, short: int = 12):
    """:func:`encode_text_trimmed` on short and long texts separately (same features, less work)."""
    import torch

    lengths = tok.argmax(dim=-1) + 1
    small = lengths <= short
    if small.all() or not small.any():
        return encode_text_trimmed(model, tok)
    out = torch.empty(tok.shape[0], model.text_projection.shape[1], dtype=model.text_projection.dtype)
    out = out.to(tok.device)
    a, b = encode_text_trimmed(model, tok[small]), encode_text_trimmed(model, tok[~small])
    out = out.index_put((torch.nonzero(small).flatten(),), a).index_put((torch.nonzero(~small).flatten(),), b)
    return out


def _augment(x, g):
    """Float images in [0, 1]: brightness jitter, light noise, a 2x blur for a quarter of the batch."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    x = x * (1 + 0.08 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)) + 0.04 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    blur = torch.rand(n, generator=g) < 0.25
    if blur.any():
        xb = x[blur]
        x[blur] = F.interpolate(F.avg_pool2d(xb, 2), scale_factor=2, mode="bilinear", align_corners=False) * 0.5 + xb * 0.5
    x = x + 0.015 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def _normalize(x01):
    """[0, 1] images -> the model's input (what ``world_preprocess`` gives for a PIL image)."""
    import torch

    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x01 - mean) / std


# ---------------------------------------------------------------------------------------------- evaluation


def _encode_images(model, preprocess, images, batch_size=250):
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            x = torch.stack([preprocess(im) for im in images[s : s + batch_size]])
            out.append(torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1))
    return torch.cat(out)


def _encode_texts(model, tokenizer, texts):
    import torch

    with torch.inference_mode():
        return torch.nn.functional.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1)


def evaluate_world_clip(model, preprocess, tokenizer, n: int = 500, seed: int = 1000, n_pairs: int = 200) -> dict:
    """Zero-shot attribute accuracy, CLIP-T target statistics and CLIP-I same/different means on ``n``
    fresh renders of the training mix drawn with ``seed`` (see docs/world.md, "World CLIP")."""
    import torch

    model = model.eval()
    attrs = [_mixed(i, seed) for i in range(n)]
    images = [render(a, RESOLUTION, variant=_variant(i, seed)) for i, a in enumerate(attrs)]
    f = _encode_images(model, preprocess, images)
    zero_shot = {}
    for a in ATTRIBUTES:
        values = SCHEMA[a]
        t = _encode_texts(model, tokenizer, [PHRASES[a][v] for v in values])
        pred = (f @ t.T).argmax(1).tolist()
        zero_shot[a] = round(sum(values[p] == r[a] for p, r in zip(pred, attrs)) / n, 4)
    clip_t = {}
    for text, (a, v) in TARGET_TEXTS.items():
        cos = (f @ _encode_texts(model, tokenizer, [text]).T).flatten()
        has = torch.tensor([r[a] == v for r in attrs])
        pos, neg = cos[has], cos[~has]
        auc = float((pos[:, None] > neg[None, :]).float().mean()) if len(pos) and len(neg) else float("nan")
        clip_t[text] = {
            "n_with": int(has.sum()),
            "mean_with": round(float(pos.mean()), 4),
            "mean_without": round(float(neg.mean()), 4),
            "gap": round(float(pos.mean() - neg.mean()), 4),
            "auc": round(auc, 4),
        }
    # CLIP-I: the same attributes rendered with another variant vs a different image's attributes
    m = min(n_pairs, n - 1)
    other = [render(attrs[i], RESOLUTION, variant=_variant(i, seed) + 500_000) for i in range(m)]
    g = _encode_images(model, preprocess, other)
    same = (f[:m] * g).sum(-1)
    diff = (f[:m] * f[1 : m + 1]).sum(-1)
    clip_i = {"n_pairs": m, "same_attributes": round(float(same.mean()), 4), "different_attributes": round(float(diff.mean()), 4)}
    return {"n": n, "seed": seed, "zero_shot_accuracy": zero_shot, "clip_t": clip_t, "clip_i": clip_i}


# ---------------------------------------------------------------------------------------------- training


AUX_SCALE = 16.0  # the auxiliary heads read AUX_SCALE * normalised image embedding


def train_world_clip(
    out: str | os.PathLike | None,
    n_images: int = 24000,
    steps: int = 1500,
    batch_size: int = 256,
    seed: int = 0,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    aux_weight: float = 1.0,
    threads: int = 2,
    n_eval: int = 500,
    cache: str | os.PathLike | None = None,
    init: str | os.PathLike | None = None,
    freeze_text: bool = False,
    log=print,
) -> dict:
    """Train the world CLIP on ``n_images`` cached renders for ``steps`` steps; save weights + card at
    ``out`` (None: do not save); ``cache``: a file keeping the rendered images between runs. Returns the card (with ``losses`` and the model under ``_model``).

    ``init``: start from the world CLIP saved there instead of random weights; ``freeze_text`` (needs
    ``init``): train the image tower only, the text tower and the temperature kept bit-identical, as the
    world model's frozen text encoder is that tower (docs/world.md, "World CLIP": new target looks retrain
    the image side without touching what the UNet was trained against)."""
    import torch

    if freeze_text and init is None:
        raise SpfbenchError("freeze_text keeps a trained text tower: give init (the world CLIP to start from)")
    t0 = time.time()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cache = Path(cache) if cache else None
    cached = torch.load(cache) if cache is not None and cache.is_file() else None
    if cached is not None and cached["key"] == [n_images, seed, RESOLUTION]:
        log(f"training images from {cache}")
        x_all, y_all = cached["x"], cached["y"]
        attrs_all = [_mixed(i, seed) for i in range(n_images)]
    else:
        log(f"rendering {n_images} training images ...")
        x_all, y_all, attrs_all = render_cache(n_images, seed, log=log)
        if cache is not None:
            torch.save({"key": [n_images, seed, RESOLUTION], "x": x_all, "y": y_all}, cache)
    t_render = time.time() - t0
    log(f"rendered in {t_render:.0f} s")
    tokenizer = world_tokenizer()
    model = (load_world_clip(init)[0] if init is not None else world_clip_model(seed)).train()
    text_params = [p for n, p in model.named_parameters() if not n.startswith("visual.")] if freeze_text else []
    for p in text_params:
        p.requires_grad_(False)
    # auxiliary heads (training only, not saved): one linear classifier per attribute on the normalised
    # image embedding, so every image gets a gradient for every attribute at every step
    heads = torch.nn.ModuleList(torch.nn.Linear(CONFIG["embed_dim"], len(SCHEMA[a])) for a in ATTRIBUTES)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embedding" not in name and name not in ("visual.class_embedding",) else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}, {"params": list(heads.parameters()), "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
    )
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    seen = torch.zeros(model.vocab_size, dtype=torch.bool)
    if init is not None:  # the rows the initial model stores stay stored
        seen |= model.token_embedding.weight.detach().abs().sum(1) > 0
    losses = []
    run = 0.0
    aux_acc = torch.zeros(len(ATTRIBUTES))
    bs = min(batch_size, n_images)
    for step in range(steps):
        idx = torch.randperm(n_images, generator=g)[:bs]
        unique = {}  # text -> claims (a repeated text is one column: its positives are every true image)
        for i in idx.tolist():
            text, cl = sample_text(attrs_all[i], rng)
            unique.setdefault(text, cl)
        tok = tokenizer(list(unique))
        seen[tok.flatten()] = True
        c = torch.tensor([_claim_vector(cl) for cl in unique.values()], dtype=torch.int64)
        truth = truth_matrix(y_all[idx], c)
        x = _normalize(_augment(x_all[idx].float() / 255.0, g))
        fi = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        with torch.set_grad_enabled(not freeze_text):
            ft = torch.nn.functional.normalize(_encode_text_bucketed(model, tok), dim=-1)
        loss = multi_positive_clip_loss(fi, ft, model.logit_scale.exp(), truth)
        if aux_weight:
            yb = y_all[idx]
            head_logits = [h(AUX_SCALE * fi) for h in heads]
            aux = sum(torch.nn.functional.cross_entropy(lg, yb[:, k]) for k, lg in enumerate(head_logits)) / len(heads)
            loss = loss + aux_weight * aux
            with torch.no_grad():
                aux_acc += torch.stack([(lg.argmax(1) == yb[:, k]).float().mean() for k, lg in enumerate(head_logits)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not freeze_text:
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        run += losses[-1]
        if (step + 1) % 50 == 0 or step + 1 == steps:
            k = (step % 50) + 1
            log(f"step {step + 1}/{steps} loss {run / k:.3f} scale {model.logit_scale.exp().item():.1f} ({time.time() - t0:.0f} s)")
            if aux_weight:
                log("  head acc " + " ".join(f"{a[:6]} {v:.2f}" for a, v in zip(ATTRIBUTES, (aux_acc / k).tolist())))
            run = 0.0
            aux_acc.zero_()
    train_seconds = time.time() - t0
    model.eval()
    with torch.no_grad():  # unseen token rows carry no information: zero them (what the file stores)
        model.token_embedding.weight[~seen] = 0.0
    card = {
        "format": FORMAT,
        "architecture": {
            "class": "open_clip.CLIP",
            "config": CONFIG,
            "tokenizer": f"open_clip.get_tokenizer({TOKENIZER!r}) (OpenAI BPE, context 77)",
            "preprocess": f"open_clip.transform.image_transform({RESOLUTION}, is_train=False, mean={list(MEAN)}, std={list(STD)})",
            "parameters": sum(p.numel() for p in model.parameters()),
            "token_rows_stored": int(seen.sum()),
        },
        "training": {
            "command": f"python -m spfbench.world.clip --out {out} --n-images {n_images} --steps {steps} --batch-size {bs} --seed {seed} --lr {lr} --aux-weight {aux_weight}"
            + (f" --init {init}" if init is not None else "") + (" --freeze-text" if freeze_text else ""),
            **({"init": {"path": str(init), "sha256": hashlib.sha256(Path(init).read_bytes()).hexdigest(),
                         "frozen": "text tower and temperature (bit-identical)" if freeze_text else None}} if init is not None else {}),
            "n_images": n_images,
            "mix": "30% pretrain, 30% finetune, 40% uniform stream (index mod 10), variant jitter, light augmentation",
            "texts": "per image and step: 50% one phrase alone (attribute weighted by TEXT_WEIGHTS: background 0.15, clothing colour 0.5, style 0.4, the rest 1; a present target's bare text 20% of the time), 40% 2-3 weighted phrases, 10% complete caption + 1-2 unnamed fine-attribute phrases",
            "loss": "symmetric InfoNCE, learnable temperature, multi-positive targets from ground truth (= ClipLoss when each text is true of its own image only)"
            + (f" + {aux_weight} x mean per-attribute cross-entropy of linear heads on {AUX_SCALE} x the normalised image embedding (heads dropped, not saved)" if aux_weight else ""),
            "optimizer": f"AdamW lr {lr} wd {weight_decay} betas (0.9, 0.98), warmup {warmup} steps + cosine",
            "steps": steps,
            "batch_size": bs,
            "seed": seed,
            "threads": threads,
            "render_seconds": round(t_render, 1),
            "images_from_cache": bool(cache is not None and t_render < 30),
            "seconds": round(train_seconds, 1),
            "final_loss_includes_aux": bool(aux_weight),
            "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
            "logit_scale": round(model.logit_scale.exp().item(), 2),
            "torch": torch.__version__,
        },
    }
    if out is not None:
        out = Path(out)
        save_world_clip(model, out, keep_rows=torch.nonzero(seen).flatten())
        loaded, preprocess, tok = load_world_clip(out)
        card["weights"] = out.name
        card["weights_sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
        card["bytes"] = out.stat().st_size
        if n_eval:
            log(f"evaluating on {n_eval} fresh renders ...")
            ev = evaluate_world_clip(loaded, preprocess, tok, n=n_eval, seed=seed + 1000)
            card["evaluation"] = ev
            card["quality_bar"] = _quality_bar(ev)
            log(json.dumps(ev["zero_shot_accuracy"]))
            log(json.dumps(ev["clip_t"]))
            log(json.dumps(ev["clip_i"]))
        from ..io import atomic_write_json

        atomic_write_json(card_path(out), card)
        log(f"saved {out} ({card['bytes']} bytes); {train_seconds:.0f} s rendering + training")
    card["losses"] = losses
    card["_model"] = model
    return card


def _quality_bar(ev: dict) -> dict:
    acc = ev["zero_shot_accuracy"]
    checked = UNCAPTIONED + TARGET_ATTRIBUTES
    return {
        "target": "zero-shot accuracy >= 0.90 for the uncaptioned and target attributes; CLIP-T gap > 0 and AUC >= 0.9 for every target text",
        "min_accuracy_checked": min(acc[a] for a in checked),
        "accuracy_reached": all(acc[a] >= 0.9 for a in checked),
        "min_clip_t_gap": min(v["gap"] for v in ev["clip_t"].values()),
        "gap_reached": all(v["gap"] > 0 for v in ev["clip_t"].values()),
        "min_clip_t_auc": min(v["auc"] for v in ev["clip_t"].values()),
        "auc_reached": all(v["auc"] >= 0.9 for v in ev["clip_t"].values()),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m spfbench.world.clip", description="Train the Portrait World CLIP.")
    p.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--n-images", type=int, default=24000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the auxiliary per-attribute classification loss (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--cache", default=None, help="file keeping the rendered training images between runs")
    p.add_argument("--init", default=None, help="start from this world CLIP (.safetensors) instead of random weights")
    p.add_argument("--freeze-text", action="store_true", help="with --init: train the image tower only (text tower and temperature unchanged)")
    a = p.parse_args(argv)
    try:
        train_world_clip(a.out, a.n_images, a.steps, a.batch_size, a.seed, lr=a.lr, aux_weight=a.aux_weight, threads=a.threads,
                         n_eval=a.n_eval, cache=a.cache, init=a.init, freeze_text=a.freeze_text)
    except SpfbenchError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
