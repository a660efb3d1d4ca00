"""Draw a Portrait World portrait from its attributes (PIL only, deterministic).

``render(attrs, size=64, variant=None)``: every attribute of :data:`attributes.SCHEMA` is visible:

* subject: children have a smaller head set lower and a narrower body; old subjects have forehead and
  cheek wrinkles; men have a squarer face, thicker brows and skin-coloured lips, women an oval face and
  red lips;
* position: the whole figure sits at x = 0.30 / 0.50 / 0.70 of the width (13 px apart at 64 px);
* pose: "turned left/right" moves the eyes, nose and mouth 0.05 of the width towards that side (from
  the viewer), hides the ear on that side and points the nose that way; "front" is symmetric;
* style "pencil drawing": dark pencil lines on the image's edges over a pale, strongly desaturated
  copy of it (a coloured-pencil sketch: mostly grey, hue kept faintly so that hair, skin, clothing and
  background colours stay readable, and preservation under a style target stays measurable).

``variant`` (an int, e.g. the image index) adds a small deterministic jitter (head offset, head size,
colour brightness) that changes no attribute; None draws the canonical portrait. The canvas, colour
tables, scenes and shared pieces come from :mod:`spfbench.painter` (which the toy data draws with too).

Ground-truth part masks (``part_masks`` / ``render_parts``): every shape is drawn inside a named part of
:data:`PARTS`; with recording on, the very same drawing calls are repeated on a label map (one label per
(part, colour), so PIL rasterises each call exactly as on the image), and a pixel belongs to the part
drawn last on it (at the drawing scale; at the output size, the part covering most of the pixel's
k x k block, ties to the part listed first in :data:`PARTS`). The masks partition the image. The pencil
style is a per-pixel filter over the whole canvas and moves no part. Geometry lives only in ``_draw`` (and
the painter's pieces it calls).
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..painter import CLOTHING_RGB, HAIR_COLORS, PLAIN_BACKGROUNDS, SKIN_TONES, Painter, shade
from .attributes import validate

POSITION_X = {"left": 0.30, "center": 0.50, "right": 0.70}
POSE_DX = {"front": 0.0, "turned left": -0.05, "turned right": 0.05}
HAT_RGB = (92, 58, 34)
HAT_BAND = (200, 40, 44)
LIPS_F = (206, 46, 70)
# the targets' looks (docs/world.md, "Target looks"; the v2 looks, which the shipped reader and world CLIP
# know; bolder v3 looks are being built): freckles are spots of FRECKLE_RADIUS (a fraction of the
# width) at FRECKLE_SPOTS (offsets from the face's centre line, mirrored on both cheeks), darker on light
# skin and lighter on dark skin; glasses are an open frame GLASSES_RIM line widths thick round visible
# eyes (lenses GLASSES_RADIUS wide), sunglasses a thin dark frame with dark lenses
FRECKLE_RADIUS = 0.018
FRECKLE_SPOTS = ((0.03, 0.02), (0.06, 0.035), (0.09, 0.02), (0.045, 0.055), (0.075, 0.06), (0.1, 0.045))
FRECKLE_ON_LIGHT = (125, 55, 30)
FRECKLE_ON_DARK = (222, 150, 110)
GLASSES_FRAME = (20, 20, 24)
GLASSES_RIM = 2
GLASSES_RADIUS = 0.058
SUNGLASSES_FRAME = (20, 20, 24)
SUNGLASSES_LENS = (16, 16, 22)

# The named parts every shape is drawn in (drawing order aside). "neck": the skin below the head (neck,
# T-shirt/hoodie neckline, tank-top shoulders); "face": the face and the ears.
PARTS = ("background", "hair", "neck", "garment", "face", "eyes", "brows", "nose", "mouth", "wrinkles",
         "freckles", "eyewear", "hat")


def _jitter(variant, slot: str) -> float:
    """A number in [-1, 1) (0 when variant is None)."""
    if variant is None:
        return 0.0
    h = hashlib.sha256(f"spfbench-world-render/{variant}/{slot}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**63 - 1.0


def _tint(rgb, f: float):
    return shade(rgb, 1.0 + f)


def render(attrs: dict, size: int = 64, variant: int | None = None):
    """One portrait, an RGB PIL image of ``size`` x ``size`` (drawn at up to 4x, then reduced)."""
    return _draw(attrs, size, variant, record=False)[0]


def render_parts(attrs: dict, size: int = 64, variant: int | None = None):
    """``(render(attrs, size, variant), part_masks(attrs, size, variant))`` from one drawing."""
    img, labels, label_part = _draw(attrs, size, variant, record=True)
    k = labels.shape[0] // size
    part_of = np.array([PARTS.index(p) for p in label_part], dtype=np.int64)[labels]  # (S, S) part index
    if k > 1:
        blocks = part_of.reshape(size, k, size, k)
        counts = np.stack([(blocks == j).sum(axis=(1, 3)) for j in range(len(PARTS))])
        part_of = counts.argmax(axis=0)  # the part covering most of each pixel; ties: first in PARTS
    return img, {p: part_of == j for j, p in enumerate(PARTS)}


def part_masks(attrs: dict, size: int = 64, variant: int | None = None) -> dict[str, np.ndarray]:
    """Part name (every one of :data:`PARTS`) -> (size, size) bool array of the pixels that part shows in
    ``render(attrs, size, variant)``, recorded from the same drawing calls (module docstring). The masks
    are disjoint and cover the image; a part not drawn (e.g. "hat" without a hat) is all False."""
    return render_parts(attrs, size, variant)[1]


def _draw(attrs: dict, size: int, variant, record: bool):
    """(image, label map as a (S, S) uint8 array or None, label value -> part) of one portrait."""
    validate(attrs)
    p = Painter(size, PARTS if record else None)
    d, P, box = p.draw, p.P, p.box
    lw = p.line_width(0.014)
    bright = 0.04 * _jitter(variant, "bright")

    # ---- background
    bg = attrs["background"]
    if bg in PLAIN_BACKGROUNDS:
        p.fill(_tint(PLAIN_BACKGROUNDS[bg], bright))
    elif bg == "brick wall":
        p.brick_wall(8, lw)
    elif bg == "beach":
        p.beach(0.45, 0.62, (0.88, 0.1))
    else:  # forest
        p.forest([0.02 + t * 0.24 for t in range(5)], 0.16, ((36, 122, 52), (60, 122, 52)))

    subject = attrs["subject"]
    child = subject in ("boy", "girl")
    old = subject.startswith("old")
    male = subject in ("man", "boy", "old man")
    skin = _tint(SKIN_TONES[attrs["skin_tone"]], bright)
    hair = _tint(HAIR_COLORS[attrs["hair_color"]], bright)
    cloth = _tint(CLOTHING_RGB[attrs["clothing_color"]], bright)
    cx = POSITION_X[attrs["position"]] + 0.012 * _jitter(variant, "dx")
    scale = 1.0 + 0.03 * _jitter(variant, "scale")
    if child:
        cy, rx, ry = 0.52, 0.125 * scale, 0.15 * scale
    else:
        cy, rx, ry = 0.43, 0.155 * scale, 0.19 * scale
    cy += 0.01 * _jitter(variant, "dy")
    pose = attrs["pose"]
    fdx = POSE_DX[pose]
    fx = cx + fdx  # the centre line of the face's features
    style = attrs["hair_style"]
    # the side of the back of the head (where a ponytail hangs): opposite to the turn
    back = 1 if pose in ("front", "turned left") else -1

    # ---- hair behind the head
    d.part = "hair"
    if style == "long":
        d.rounded_rectangle([P(cx - rx - 0.045), P(cy - ry - 0.02), P(cx + rx + 0.045), P(cy + ry + 0.16)], radius=P(0.08), fill=hair)
    elif style == "bob":
        d.rounded_rectangle([P(cx - rx - 0.045), P(cy - ry - 0.03), P(cx + rx + 0.045), P(cy + 0.07)], radius=P(0.07), fill=hair)
    elif style == "ponytail":
        d.ellipse(box(cx + back * (rx + 0.045), cy + 0.03, 0.05, 0.14), fill=hair)
    elif style == "curly":
        for j in range(9):
            a = j / 8
            side = -1 if j % 2 == 0 else 1
            d.ellipse(box(cx + side * (rx + 0.01), cy - ry * 0.6 + a * ry * 1.1, 0.04, 0.04), fill=hair)

    # ---- torso and garment
    half = 0.26 if child else 0.36
    top = 0.82 if child else 0.78
    d.part = "neck"
    p.neck(cx, cy + ry, top, shade(skin, 0.88))
    d.part = "garment"
    d.rounded_rectangle([P(cx - half), P(top), P(cx + half), P(1.3)], radius=P(0.1), fill=cloth)
    dark = shade(cloth, 0.6) if sum(cloth) > 150 else (120, 120, 128)
    garment = attrs["garment"]
    d.part = "neck"  # bare skin: the neckline, the tank top's shoulders
    if garment in ("T-shirt", "hoodie"):
        p.neckline(cx, top, shade(skin, 0.88))
    if garment == "tank top":
        d.rectangle([P(cx - half), P(top), P(cx + half), P(1.0)], fill=shade(skin, 0.95))
    d.part = "garment"
    if garment == "tank top":
        d.rectangle([P(cx - half * 0.6), P(top + 0.07), P(cx + half * 0.6), P(1.0)], fill=cloth)
        for s in (-1, 1):
            d.rectangle([P(cx + s * half * 0.6 - 0.035 * (s > 0)), P(top), P(cx + s * half * 0.6 + 0.035 * (s < 0)), P(top + 0.08)], fill=cloth)
    elif garment == "shirt":
        for s in (-1, 1):
            d.polygon([(P(cx + s * 0.1), P(top - 0.01)), (P(cx), P(top + 0.06)), (P(cx + s * 0.02), P(top + 0.1))], fill=(248, 248, 248))
        for b in range(3):
            d.ellipse(box(cx, top + 0.1 + b * 0.045, 0.011, 0.011), fill=dark)
    elif garment == "turtleneck":
        d.rounded_rectangle([P(cx - 0.075), P(top - 0.09), P(cx + 0.075), P(top + 0.03)], radius=P(0.02), fill=shade(cloth, 0.85))
    elif garment == "jacket":
        d.polygon([(P(cx - 0.08), P(top)), (P(cx + 0.08), P(top)), (P(cx), P(1.0))], fill=(236, 236, 236))
        for s in (-1, 1):
            d.line([(P(cx + s * 0.08), P(top)), (P(cx + s * 0.012), P(1.0))], fill=dark, width=lw)
            d.polygon([(P(cx + s * 0.08), P(top)), (P(cx + s * 0.17), P(top + 0.02)), (P(cx + s * 0.05), P(top + 0.12))], fill=dark)
    elif garment == "hoodie":
        d.arc([P(cx - 0.18), P(top - 0.07), P(cx + 0.18), P(top + 0.1)], 0, 180, fill=dark, width=lw * 2)
        for s in (-1, 1):
            d.line([(P(cx + s * 0.035), P(top + 0.05)), (P(cx + s * 0.035), P(top + 0.17))], fill=dark, width=lw)
    d.part = "hair"
    if style == "long":  # strands over the shoulders
        for s in (-1, 1):
            d.rounded_rectangle([P(cx + s * rx - 0.045), P(cy), P(cx + s * rx + 0.045), P(cy + ry + 0.16)], radius=P(0.03), fill=hair)

    # ---- ears, face
    d.part = "face"
    for s in (-1, 1):
        if (pose == "turned left" and s < 0) or (pose == "turned right" and s > 0):
            continue  # the ear on the turned side is hidden
        p.ear(cx + s * rx, cy, shade(skin, 0.9))
    face = box(cx, cy, rx, ry)
    if male:
        d.rounded_rectangle(face, radius=P(rx * 0.55), fill=skin)
    else:
        d.ellipse(face, fill=skin)

    # ---- hair on top of the head
    d.part = "hair"
    d.chord([P(cx - rx - 0.012), P(cy - ry - 0.025), P(cx + rx + 0.012), P(cy + ry * 0.05)], 180, 360, fill=hair)
    if style == "short":
        for s in (-1, 1):
            d.rectangle([P(cx + s * rx - 0.015), P(cy - 0.06), P(cx + s * rx + 0.015), P(cy + 0.02)], fill=hair)
    elif style in ("long", "bob"):
        for s in (-1, 1):
            d.rectangle([P(cx + s * rx - 0.03), P(cy - 0.06), P(cx + s * rx + 0.02 * s), P(cy + 0.09)], fill=hair)
    elif style == "curly":
        for j in range(7):
            a = j / 6
            d.ellipse(box(cx - rx + a * 2 * rx, cy - ry + 0.005 - 0.03 * (1 - abs(a - 0.5) * 2), 0.04, 0.035), fill=hair)

    # ---- eyes, brows, nose, mouth
    ey = cy - 0.02
    ex = 0.055 if child else 0.065
    er = 0.03 if child else 0.026
    expr = attrs["expression"]
    brow = shade(hair, 0.75) if attrs["hair_color"] not in ("blonde", "grey") else shade(hair, 0.55)
    for s in (-1, 1):
        x = fx + s * ex
        d.part = "eyes"
        d.ellipse(box(x, ey, er, er * 0.75), fill=(250, 250, 250))
        d.ellipse(box(x + fdx * 0.25, ey, er * 0.55, er * 0.6), fill=(40, 30, 24))
        d.part = "brows"
        by = ey - (0.065 if expr == "surprised" else 0.045)
        d.line([(P(x - 0.032), P(by + 0.004)), (P(x + 0.032), P(by - 0.004 * s))], fill=brow, width=lw * (2 if male else 1))
    nose = shade(skin, 0.7)
    d.part = "nose"
    if pose == "front":
        d.line([(P(fx), P(cy)), (P(fx - 0.012), P(cy + 0.055)), (P(fx + 0.012), P(cy + 0.055))], fill=nose, width=lw)
    else:
        tip = -1 if pose == "turned left" else 1
        d.polygon([(P(fx), P(cy - 0.005)), (P(fx + tip * 0.04), P(cy + 0.055)), (P(fx), P(cy + 0.06))], fill=nose)
    my = cy + (0.085 if child else 0.105)
    lips = LIPS_F if not male else shade(skin, 0.62)
    mw = 0.065
    d.part = "mouth"
    if expr == "smiling":
        d.arc([P(fx - mw), P(my - 0.06), P(fx + mw), P(my + 0.03)], 10, 170, fill=lips, width=lw * 2)
    elif expr == "laughing":
        d.chord([P(fx - mw), P(my - 0.035), P(fx + mw), P(my + 0.055)], 0, 180, fill=(96, 24, 30), outline=lips, width=lw)
        d.rectangle([P(fx - mw * 0.7), P(my + 0.008), P(fx + mw * 0.7), P(my + 0.022)], fill=(250, 250, 250))
    elif expr == "surprised":
        d.ellipse(box(fx, my + 0.015, 0.026, 0.038), fill=(96, 24, 30), outline=lips, width=lw)
    else:
        d.line([(P(fx - mw * 0.85), P(my)), (P(fx + mw * 0.85), P(my))], fill=lips, width=lw * 2)
    if old:
        d.part = "wrinkles"
        wr = shade(skin, 0.55)
        for r in range(2):
            yy = cy - ry * 0.62 + r * 0.03
            d.arc([P(fx - 0.08), P(yy), P(fx + 0.08), P(yy + 0.05)], 200, 340, fill=wr, width=lw)
        for s in (-1, 1):
            d.line([(P(fx + s * 0.035), P(cy + 0.05)), (P(fx + s * 0.07), P(my + 0.03))], fill=wr, width=lw)

    # ---- target attributes
    if attrs["freckles"] == "yes":
        d.part = "freckles"
        lum = 0.3 * skin[0] + 0.59 * skin[1] + 0.11 * skin[2]
        fc = FRECKLE_ON_LIGHT if lum > 130 else FRECKLE_ON_DARK
        for s in (-1, 1):
            for ox, oy in FRECKLE_SPOTS:
                d.ellipse(box(fx + s * ox, cy + 0.01 + oy, FRECKLE_RADIUS, FRECKLE_RADIUS), fill=fc)
    if attrs["eyewear"] != "none":
        d.part = "eyewear"
        sun = attrs["eyewear"] == "sunglasses"
        frame = SUNGLASSES_FRAME if sun else GLASSES_FRAME
        rim = max(1, round(lw * (1 if sun else GLASSES_RIM)))
        gr = 0.042 if sun else min(GLASSES_RADIUS, ex - 0.006)  # lenses never overlap (a child's eyes are closer)
        p.glasses(fx, cx, rx, ex, ey, gr, frame, rim, SUNGLASSES_LENS if sun else None)
    if attrs["headwear"] == "hat":
        d.part = "hat"
        p.hat(cx, cy - ry, rx, (-0.15, 0.05), (0.0, 0.04), 0.03, HAT_RGB, HAT_BAND)

    # ---- style
    if attrs["style"] == "pencil drawing":
        p.pencil_colour()
    return p.finish(), (np.asarray(p.labels) if record else None), d.label_part
