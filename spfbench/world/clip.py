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

Training: :mod:`.clip_training` (``spfbench world train-clip``, the command recorded in the card).

Storage: float16; the text token embedding keeps only the rows of the tokens seen in training (the
others are zero in the loaded model: a text made only of unseen words encodes to a constant).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import engine
from ..errors import SpfbenchError
from .attributes import ATTRIBUTES, SCHEMA, TARGET_ATTRIBUTES, TARGET_TEXTS, UNCAPTIONED, sample
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
    return engine.atomic_save_safetensors(out, path, meta)


def load_world_clip(path: str | os.PathLike | None = None):
    """``(model, preprocess, tokenizer)`` of the world CLIP saved at ``path`` (default: the shipped
    weights); the model in eval mode, float32, CPU."""
    import torch
    from safetensors.torch import load_file, safe_open

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise SpfbenchError(f"world CLIP weights {path} do not exist (train them: spfbench world train-clip --out {path})")
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


def training_mix(index: int, seed: int) -> dict:
    """Training/evaluation mix by index mod 10: 0-2 pretrain, 3-5 finetune, 6-9 uniform."""
    from .reader import sample_uniform

    r = index % 10
    if r < 3:
        return sample("pretrain", index, seed)
    if r < 6:
        return sample("finetune", index, seed)
    return sample_uniform(index, seed)


def variant(index: int, seed: int) -> int:
    """The render variant (jitter) of image ``index`` of the stream drawn with ``seed``."""
    return index + 1_000_003 * (seed + 7)


def render_cache(n: int, seed: int, attr_fn=training_mix, log=None):
    """(uint8 tensor (n, 3, 64, 64), attribute-index tensor (n, 14), attribute dicts)."""
    import numpy as np
    import torch

    attrs = [attr_fn(i, seed) for i in range(n)]
    x = np.empty((n, RESOLUTION, RESOLUTION, 3), np.uint8)
    for i, a in enumerate(attrs):
        x[i] = np.asarray(render(a, RESOLUTION, variant=variant(i, seed)), dtype=np.uint8)
        if log and (i + 1) % 5000 == 0:
            log(f"rendered {i + 1}/{n}")
    y = torch.tensor([[SCHEMA[a].index(r[a]) for a in ATTRIBUTES] for r in attrs], dtype=torch.int64)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), y, attrs


# ---------------------------------------------------------------------------------------------- evaluation


def encode_images(model, preprocess, images, batch_size=250):
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            x = torch.stack([preprocess(im) for im in images[s : s + batch_size]])
            out.append(torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1))
    return torch.cat(out)


def encode_texts(model, tokenizer, texts):
    import torch

    with torch.inference_mode():
        return torch.nn.functional.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1)


def evaluate_world_clip(model, preprocess, tokenizer, n: int = 500, seed: int = 1000, n_pairs: int = 200) -> dict:
    """Zero-shot attribute accuracy, CLIP-T target statistics and CLIP-I same/different means on ``n``
    fresh renders of the training mix drawn with ``seed`` (see docs/world.md, "World CLIP")."""
    import torch

    model = model.eval()
    attrs = [training_mix(i, seed) for i in range(n)]
    images = [render(a, RESOLUTION, variant=variant(i, seed)) for i, a in enumerate(attrs)]
    f = encode_images(model, preprocess, images)
    zero_shot = {}
    for a in ATTRIBUTES:
        values = SCHEMA[a]
        t = encode_texts(model, tokenizer, [PHRASES[a][v] for v in values])
        pred = (f @ t.T).argmax(1).tolist()
        zero_shot[a] = round(sum(values[p] == r[a] for p, r in zip(pred, attrs)) / n, 4)
    clip_t = {}
    for text, (a, v) in TARGET_TEXTS.items():
        cos = (f @ encode_texts(model, tokenizer, [text]).T).flatten()
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
    other = [render(attrs[i], RESOLUTION, variant=variant(i, seed) + 500_000) for i in range(m)]
    g = encode_images(model, preprocess, other)
    same = (f[:m] * g).sum(-1)
    diff = (f[:m] * f[1 : m + 1]).sum(-1)
    clip_i = {"n_pairs": m, "same_attributes": round(float(same.mean()), 4), "different_attributes": round(float(diff.mean()), 4)}
    return {"n": n, "seed": seed, "zero_shot_accuracy": zero_shot, "clip_t": clip_t, "clip_i": clip_i}


def quality_bar(ev: dict) -> dict:
    """The card's bar for an :func:`evaluate_world_clip` result."""
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

