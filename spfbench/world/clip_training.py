"""Training the Portrait World CLIP (:mod:`.clip`; ``spfbench world train-clip``, the command recorded in the card).

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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from pathlib import Path

from .. import engine
from ..errors import SpfbenchError
from .attributes import ATTRIBUTES, CAPTIONED, SCHEMA, TARGET_ATTRIBUTES, UNCAPTIONED, base_caption
from .clip import (
    CONFIG, FORMAT, MEAN, PHRASES, RESOLUTION, STD, TOKENIZER, card_path, evaluate_world_clip, load_world_clip, quality_bar, render_cache,
    save_world_clip, training_mix, world_clip_model, world_tokenizer,
)

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


def claim_vector(claims) -> list[int]:
    """The (attribute index -> value index, -1 where unnamed) vector of a text's claims."""
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


def encode_text_bucketed(model, tok, short: int = 12):
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


def augment(x, g):
    """Float images in [0, 1]: the world augmentation (renders.augment) with the CLIP's constants."""
    from .renders import augment as world_augment

    return world_augment(x, g, brightness=0.08, offset=0.04, noise=0.015, low=0, high=1)


def normalize(x01):
    """[0, 1] images -> the model's input (what ``world_preprocess`` gives for a PIL image)."""
    import torch

    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x01 - mean) / std


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
        attrs_all = [training_mix(i, seed) for i in range(n_images)]
    else:
        log(f"rendering {n_images} training images ...")
        x_all, y_all, attrs_all = render_cache(n_images, seed, log=log)
        if cache is not None:
            engine.atomic_torch_save({"key": [n_images, seed, RESOLUTION], "x": x_all, "y": y_all}, cache)
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
    bs = min(batch_size, n_images)

    def one_step(step):
        idx = torch.randperm(n_images, generator=g)[:bs]
        unique = {}  # text -> claims (a repeated text is one column: its positives are every true image)
        for i in idx.tolist():
            text, cl = sample_text(attrs_all[i], rng)
            unique.setdefault(text, cl)
        tok = tokenizer(list(unique))
        seen[tok.flatten()] = True
        c = torch.tensor([claim_vector(cl) for cl in unique.values()], dtype=torch.int64)
        truth = truth_matrix(y_all[idx], c)
        x = normalize(augment(x_all[idx].float() / 255.0, g))
        fi = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        with torch.set_grad_enabled(not freeze_text):
            ft = torch.nn.functional.normalize(encode_text_bucketed(model, tok), dim=-1)
        loss = multi_positive_clip_loss(fi, ft, model.logit_scale.exp(), truth)
        head_acc = {}
        if aux_weight:
            yb = y_all[idx]
            head_logits = [h(AUX_SCALE * fi) for h in heads]
            aux = sum(torch.nn.functional.cross_entropy(lg, yb[:, k]) for k, lg in enumerate(head_logits)) / len(heads)
            loss = loss + aux_weight * aux
            with torch.no_grad():
                acc = torch.stack([(lg.argmax(1) == yb[:, k]).float().mean() for k, lg in enumerate(head_logits)]).tolist()
            head_acc = dict(zip(ATTRIBUTES, acc))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not freeze_text:
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        return {"loss": losses[-1], **head_acc}

    def report(row):
        log(f"step {row['step']}/{steps} loss {row['loss']:.3f} scale {model.logit_scale.exp().item():.1f} ({row['seconds']:.0f} s)")
        if aux_weight:
            log("  head acc " + " ".join(f"{a[:6]} {row[a]:.2f}" for a in ATTRIBUTES))

    engine.run_steps(one_step, 0, steps, sched=sched, log_every=50, on_log=report, elapsed=lambda: time.time() - t0)
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
            "command": f"spfbench world train-clip --out {out} --n-images {n_images} --steps {steps} --batch-size {bs} --seed {seed} --lr {lr} --aux-weight {aux_weight}"
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
            card["quality_bar"] = quality_bar(ev)
            log(json.dumps(ev["zero_shot_accuracy"]))
            log(json.dumps(ev["clip_t"]))
            log(json.dumps(ev["clip_i"]))
        from ..io import atomic_write_json

        atomic_write_json(card_path(out), card)
        log(f"saved {out} ({card['bytes']} bytes); {train_seconds:.0f} s rendering + training")
    card["losses"] = losses
    card["_model"] = model
    return card

