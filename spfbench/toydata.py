"""``spfbench make-toy-data``: a small, procedurally drawn portrait training set (imagefolder format).

Each portrait is drawn with PIL.ImageDraw from attributes picked per image: subject (the caption
vocabulary's subjects: sex and age), expression, background (plain colour or a simple scene), skin
tone, hair (style and colour), eye colour, clothing (colour and garment) and its target attribute
(a hat, glasses, freckles, pencil drawing style; optionally sunglasses or a beard). The base caption
has the paper's shape and names only what is drawn: "A woman, smiling, with a blue background, in a
red T-shirt"; the target text names the target attribute, which every image shows (it is a
fine-tuning set for its targets). Definitions: docs/data.md.

Every choice is ``sha256("spfbench-toy/{seed}/{index}/{slot}")``: the same seed gives byte-identical
files (with the same Pillow version), and image i does not depend on N.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .captions import load_vocab
from .errors import SpfbenchError
from .io import write_image_set
from .painter import CLOTHING_RGB, EYE_COLORS, HAIR_COLORS, HAT_COLORS, PLAIN_BACKGROUNDS, SKIN_TONES, Painter, shade

FORMAT_VERSION = 1
SPEC_FILE = "toydata.json"
IMAGES = "images"

# target text -> (vocabulary category, attribute it sets)
TOY_TARGETS = {
    "a hat": "headwear",
    "glasses": "eyewear",
    "freckles": "freckles",
    "pencil drawing style": "style",
    "sunglasses": "eyewear",
    "a beard": "facial_hair",
}
DEFAULT_TARGETS = ("a hat", "glasses", "freckles", "pencil drawing style")

EXPRESSIONS = ["smiling", "laughing", "with a neutral expression", "looking surprised"]
SCENES = ["in front of a brick wall", "at the beach", "in a forest"]
FEMALE_HAIR = ["long", "bob", "bun", "ponytail"]
MALE_HAIR = ["short", "curly", "buzz"]


def _h(seed: int, index: int, slot: str) -> int:
    return int.from_bytes(hashlib.sha256(f"spfbench-toy/{seed}/{index}/{slot}".encode()).digest()[:8], "big")


def _pick(options, seed: int, index: int, slot: str):
    options = list(options)
    return options[_h(seed, index, slot) % len(options)]


def _u(seed: int, index: int, slot: str) -> float:
    """A number in [0, 1)."""
    return _h(seed, index, slot) / 2.0**64


# ---------------------------------------------------------------------------------------------- attributes


def toy_attributes(index: int, seed: int = 0, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict:
    """The ground-truth attributes of toy portrait ``index`` (targets go round-robin: index mod T).

    Every key is present in every row (null when absent), so the column has one schema in any format.
    """
    vocab = load_vocab("v1")
    target = targets[index % len(targets)]
    subjects = vocab["subjects"]
    if target == "a beard":
        subjects = [s for s in subjects if "male" in s["tags"] and "child" not in s["tags"]]
    subject = _pick(subjects, seed, index, "subject")
    tags = set(subject["tags"])
    sex = "female" if "female" in tags else "male"
    age = "child" if "child" in tags else ("old" if subject["text"].startswith("An old") else
                                           "middle-aged" if "middle-aged" in subject["text"] else
                                           "young" if "young" in tags else "adult")
    background = _pick([f"with a {c} background" for c in PLAIN_BACKGROUNDS] + SCENES, seed, index, "background")
    bg_color = next((c for c in PLAIN_BACKGROUNDS if background == f"with a {c} background"), None)
    colors = [c for c in vocab["clothing_colors"] if c in CLOTHING_RGB and c != bg_color]
    garments = [g for g in vocab["clothing_garments"] if all(t in tags for t in vocab.get("garment_tags", {}).get(g, []))]
    if age == "old":
        hair_color = _pick(["grey", "white"], seed, index, "hair_color")
    else:
        hair_color = _pick(["black", "brown", "blonde", "red"] + (["grey"] if age == "middle-aged" else []), seed, index, "hair_color")
    hair_style = _pick(FEMALE_HAIR if sex == "female" else MALE_HAIR + (["bald"] if age == "old" else []), seed, index, "hair_style")
    attrs = {
        "subject": subject["text"],
        "sex": sex,
        "age": age,
        "expression": _pick(EXPRESSIONS, seed, index, "expression"),
        "background": background,
        "skin_tone": _pick(SKIN_TONES, seed, index, "skin"),
        "hair_style": hair_style,
        "hair_color": hair_color,
        "eye_color": _pick(EYE_COLORS, seed, index, "eyes"),
        "clothing_color": _pick(colors, seed, index, "color"),
        "garment": _pick(garments, seed, index, "garment"),
        "target": target,
        "hat": _pick(HAT_COLORS, seed, index, "hat") if target == "a hat" else None,
        "glasses": target == "glasses",
        "sunglasses": target == "sunglasses",
        "freckles": target == "freckles",
        "beard": target == "a beard",
        "style": target if TOY_TARGETS.get(target) == "style" else None,
    }
    return attrs


def base_caption(attrs: dict) -> str:
    color = attrs["clothing_color"]
    article = "an" if color[0] in "aeiou" else "a"
    return f"{attrs['subject']}, {attrs['expression']}, {attrs['background']}, in {article} {color} {attrs['garment']}"


# ---------------------------------------------------------------------------------------------- drawing


def render(attrs: dict, size: int = 64, seed: int = 0, index: int = 0):
    """Draw one portrait (an RGB PIL image of ``size`` x ``size``) from its attributes."""
    p = Painter(size)
    d, P, box = p.draw, p.P, p.box

    def u(slot):
        return _u(seed, index, slot)

    lw = p.line_width(0.012)
    # background
    bg = attrs["background"]
    plain = next((c for c in PLAIN_BACKGROUNDS if bg == f"with a {c} background"), None)
    if plain:
        p.fill(PLAIN_BACKGROUNDS[plain])
    elif bg == "in front of a brick wall":
        p.brick_wall(9, lw)
    elif bg == "at the beach":
        p.beach(0.5, 0.66, (0.85, 0.12))
    else:  # in a forest
        p.forest([0.04 + t * 0.23 + 0.05 * u(f"tree{t}") for t in range(5)], 0.18, ((40, 120, 56), (60, 120, 56)))

    skin = SKIN_TONES[attrs["skin_tone"]]
    hair = HAIR_COLORS[attrs["hair_color"]]
    cloth = CLOTHING_RGB[attrs["clothing_color"]]
    child = attrs["age"] == "child"
    cx = 0.5 + (u("dx") - 0.5) * 0.04
    cy = 0.45 + (u("dy") - 0.5) * 0.03 + (0.03 if child else 0.0)
    rx, ry = (0.17, 0.19) if child else (0.16 + 0.02 * u("fw"), 0.21)
    style = attrs["hair_style"]

    # hair behind the head
    if style == "long":
        d.rounded_rectangle([P(cx - rx - 0.04), P(cy - ry - 0.02), P(cx + rx + 0.04), P(cy + ry + 0.2)], radius=P(0.1), fill=hair)
    elif style == "bob":
        d.rounded_rectangle([P(cx - rx - 0.04), P(cy - ry - 0.03), P(cx + rx + 0.04), P(cy + 0.1)], radius=P(0.08), fill=hair)
    elif style == "ponytail":
        d.ellipse(box(cx + rx + 0.03, cy - 0.02, 0.05, 0.13), fill=hair)
    elif style == "bun":
        d.ellipse(box(cx, cy - ry - 0.04, 0.07, 0.06), fill=hair)

    # torso and garment
    top = 0.8 if not child else 0.83
    p.neck(cx, cy + ry, top, shade(skin, 0.9))
    garment = attrs["garment"]
    shoulders = [P(0.1), P(top), P(0.9), P(1.0) + P(0.3)]
    d.rounded_rectangle(shoulders, radius=P(0.12), fill=cloth)
    dark = shade(cloth, 0.7) if sum(cloth) > 120 else (90, 90, 96)
    if garment in ("T-shirt", "polo shirt", "sweater", "hoodie"):
        p.neckline(cx, top, shade(skin, 0.9))
    if garment == "tank top":
        d.rectangle([P(0.1), P(top), P(0.9), P(1.0)], fill=shade(skin, 0.95))
        d.rectangle([P(0.26), P(top + 0.07), P(0.74), P(1.0)], fill=cloth)
        d.rectangle([P(0.28), P(top), P(0.34), P(top + 0.08)], fill=cloth)
        d.rectangle([P(0.66), P(top), P(0.72), P(top + 0.08)], fill=cloth)
    elif garment == "dress":
        d.rectangle([P(0.1), P(top), P(0.9), P(1.0)], fill=shade(skin, 0.95))
        d.polygon([(P(0.28), P(top + 0.06)), (P(0.72), P(top + 0.06)), (P(0.8), P(1.0)), (P(0.2), P(1.0))], fill=cloth)
        d.line([(P(0.3), P(top + 0.06)), (P(0.33), P(top))], fill=cloth, width=lw * 2)
        d.line([(P(0.7), P(top + 0.06)), (P(0.67), P(top))], fill=cloth, width=lw * 2)
    elif garment in ("shirt", "polo shirt", "blouse"):
        d.polygon([(P(cx - 0.09), P(top - 0.01)), (P(cx), P(top + 0.06)), (P(cx - 0.02), P(top + 0.09))], fill=shade(cloth, 1.15) if garment != "blouse" else (248, 248, 248))
        d.polygon([(P(cx + 0.09), P(top - 0.01)), (P(cx), P(top + 0.06)), (P(cx + 0.02), P(top + 0.09))], fill=shade(cloth, 1.15) if garment != "blouse" else (248, 248, 248))
        for b in range(2 if garment == "polo shirt" else 3):
            d.ellipse(box(cx, top + 0.1 + b * 0.05, 0.008, 0.008), fill=dark)
    elif garment == "turtleneck":
        d.rounded_rectangle([P(cx - 0.07), P(top - 0.08), P(cx + 0.07), P(top + 0.03)], radius=P(0.02), fill=shade(cloth, 0.9))
    elif garment == "jacket":
        d.polygon([(P(cx - 0.07), P(top)), (P(cx + 0.07), P(top)), (P(cx), P(1.0))], fill=(236, 236, 236))
        d.line([(P(cx - 0.07), P(top)), (P(cx - 0.01), P(1.0))], fill=dark, width=lw)
        d.line([(P(cx + 0.07), P(top)), (P(cx + 0.01), P(1.0))], fill=dark, width=lw)
    elif garment == "hoodie":
        d.arc([P(cx - 0.16), P(top - 0.06), P(cx + 0.16), P(top + 0.1)], 0, 180, fill=dark, width=lw * 2)
        d.line([(P(cx - 0.03), P(top + 0.05)), (P(cx - 0.03), P(top + 0.15))], fill=dark, width=lw)
        d.line([(P(cx + 0.03), P(top + 0.05)), (P(cx + 0.03), P(top + 0.15))], fill=dark, width=lw)
    elif garment == "sweater":
        for r in range(4):
            d.line([(P(0.12), P(0.97 - r * 0.012)), (P(0.88), P(0.97 - r * 0.012))], fill=dark, width=max(1, lw // 2))

    # ears and face
    for x in (cx - rx, cx + rx):
        p.ear(x, cy, shade(skin, 0.93))
    d.ellipse(box(cx, cy, rx, ry), fill=skin)

    # hair on top of the head
    if style != "bald":
        cap = [P(cx - rx - 0.01), P(cy - ry - 0.02), P(cx + rx + 0.01), P(cy + ry * (0.3 if style == "buzz" else 0.1))]
        d.chord(cap, 180, 360, fill=hair)
        if style == "curly":
            for j in range(7):
                a = j / 6
                d.ellipse(box(cx - rx + a * 2 * rx, cy - ry + 0.01 - 0.03 * (1 - abs(a - 0.5) * 2), 0.035, 0.03), fill=hair)
        if style in ("long", "bob"):
            d.rectangle([P(cx - rx - 0.02), P(cy - 0.05), P(cx - rx + 0.025), P(cy + 0.1)], fill=hair)
            d.rectangle([P(cx + rx - 0.025), P(cy - 0.05), P(cx + rx + 0.02), P(cy + 0.1)], fill=hair)
    else:
        d.chord([P(cx - rx - 0.01), P(cy - 0.08), P(cx - rx + 0.05), P(cy + 0.05)], 90, 270, fill=hair)
        d.chord([P(cx + rx - 0.05), P(cy - 0.08), P(cx + rx + 0.01), P(cy + 0.05)], 270, 90, fill=hair)

    # eyes, brows, nose, mouth
    ey = cy - 0.02
    ex = 0.065
    er = 0.03 if child else 0.026
    eye_rgb = EYE_COLORS[attrs["eye_color"]]
    expr = attrs["expression"]
    for sx in (-1, 1):
        x = cx + sx * ex
        d.ellipse(box(x, ey, er, er * 0.7), fill=(250, 250, 250))
        d.ellipse(box(x, ey, er * 0.55, er * 0.55), fill=eye_rgb)
        d.ellipse(box(x, ey, er * 0.25, er * 0.25), fill=(10, 10, 10))
        brow_y = ey - (0.06 if expr == "looking surprised" else 0.045)
        d.line([(P(x - 0.03), P(brow_y)), (P(x + 0.03), P(brow_y - 0.005))], fill=shade(hair, 0.8), width=lw)
    d.line([(P(cx), P(cy + 0.0)), (P(cx - 0.012), P(cy + 0.06)), (P(cx + 0.01), P(cy + 0.065))], fill=shade(skin, 0.75), width=max(1, lw // 2))
    my = cy + 0.11
    lips = (150, 60, 60)
    if expr == "smiling":
        d.arc([P(cx - 0.06), P(my - 0.05), P(cx + 0.06), P(my + 0.03)], 20, 160, fill=lips, width=lw)
    elif expr == "laughing":
        d.chord([P(cx - 0.06), P(my - 0.04), P(cx + 0.06), P(my + 0.05)], 0, 180, fill=(110, 30, 36))
        d.rectangle([P(cx - 0.045), P(my + 0.003), P(cx + 0.045), P(my + 0.015)], fill=(250, 250, 250))
    elif expr == "looking surprised":
        d.ellipse(box(cx, my + 0.01, 0.022, 0.03), fill=(110, 30, 36))
    else:
        d.line([(P(cx - 0.045), P(my)), (P(cx + 0.045), P(my))], fill=lips, width=lw)
    if attrs["age"] == "old":  # wrinkles
        for r in range(2):
            d.arc([P(cx - 0.08), P(cy - ry + 0.06 + r * 0.025), P(cx + 0.08), P(cy - ry + 0.12 + r * 0.025)], 200, 340, fill=shade(skin, 0.78), width=max(1, lw // 2))

    # target attributes
    if attrs["freckles"]:
        for j in range(14):
            side = -1 if j % 2 == 0 else 1
            fx = cx + side * (0.035 + 0.07 * u(f"fx{j}"))
            fy = cy + 0.03 + 0.05 * u(f"fy{j}")
            d.ellipse(box(fx, fy, 0.007, 0.007), fill=shade(skin, 0.62))
    if attrs["beard"]:
        d.chord([P(cx - rx), P(cy - 0.02), P(cx + rx), P(cy + ry + 0.03)], 0, 180, fill=hair)
        d.chord([P(cx - 0.045), P(my - 0.02), P(cx + 0.045), P(my + 0.03)], 0, 360, fill=skin)
        if expr == "laughing":
            d.chord([P(cx - 0.05), P(my - 0.03), P(cx + 0.05), P(my + 0.03)], 0, 180, fill=(110, 30, 36))
        else:
            d.line([(P(cx - 0.035), P(my)), (P(cx + 0.035), P(my))], fill=lips, width=lw)
    if attrs["glasses"] or attrs["sunglasses"]:
        p.glasses(cx, cx, rx, ex, ey, 0.045, (24, 24, 28), lw, (20, 20, 26) if attrs["sunglasses"] else None)
    if attrs["hat"]:
        hat = HAT_COLORS[attrs["hat"]]
        p.hat(cx, cy - ry, rx, (-0.14, 0.06), (0.01, 0.05), 0.035, hat, shade(hat, 0.6))

    if attrs["style"] == "pencil drawing style":
        p.pencil_grey()
    return p.finish()


# ---------------------------------------------------------------------------------------------- writer


@dataclass
class ToyDataResult:
    out: Path
    n: int
    written: int  # images written by this call (0 when the set was already complete)
    targets: dict = field(default_factory=dict)  # target text -> count

    def __str__(self) -> str:
        counts = ", ".join(f"{t}: {c}" for t, c in self.targets.items())
        return f"{self.n} images in {self.out} ({counts}); {self.written} written now"


def make_toy_data(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    size: int = 64,
    targets: tuple[str, ...] | list[str] | None = None,
) -> ToyDataResult:
    """Write ``n`` procedurally drawn portraits as an imagefolder training set; returns a summary.

    Layout: ``OUT/toydata.json`` (the spec: format, n, seed, size, targets; written first),
    ``OUT/images/NNNNN.png`` (``size`` x ``size`` RGB), and ``OUT/metadata.jsonl`` (written last) with
    ``file_name``, ``base_caption``, ``target_text``, ``category`` and ``attributes`` (the drawn
    ground truth) per image. Targets go round-robin (image i gets ``targets[i % T]``; default: a hat,
    glasses, freckles, pencil drawing style; also available: sunglasses, a beard).

    ``OUT`` must be new or empty, or hold a toy set made with the same arguments: then the call
    finishes it (an interrupted call resumes) and rewrites nothing that is already there. Every file
    is written atomically. Same arguments -> byte-identical files.
    """
    targets = tuple(DEFAULT_TARGETS if targets is None else targets)
    if n <= 0:
        raise SpfbenchError(f"--n must be positive, got {n}")
    if not 16 <= size <= 2048:
        raise SpfbenchError(f"--size must be between 16 and 2048 pixels, got {size}")
    if not targets:
        raise SpfbenchError("at least one target is needed")
    unknown = [t for t in targets if t not in TOY_TARGETS]
    if unknown:
        raise SpfbenchError(f"unknown toy target(s) {', '.join(map(repr, unknown))}; available: {', '.join(TOY_TARGETS)}")
    out = Path(out)
    spec = {"format_version": FORMAT_VERSION, "generator": "spfbench-toy", "n": n, "seed": seed, "size": size, "targets": list(targets)}

    width = max(5, len(str(n - 1)))
    rows = []
    for i in range(n):
        attrs = toy_attributes(i, seed, targets)
        rows.append(
            {
                "file_name": f"{IMAGES}/{i:0{width}d}.png",
                "base_caption": base_caption(attrs),
                "target_text": attrs["target"],
                "category": TOY_TARGETS[attrs["target"]],
                "attributes": attrs,
            }
        )
    written = write_image_set(out, SPEC_FILE, spec, rows, lambda i, r: render(r["attributes"], size, seed, i), "toy set")
    return ToyDataResult(out, n, written, dict(Counter(r["target_text"] for r in rows)))
