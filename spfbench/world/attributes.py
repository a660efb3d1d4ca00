"""Portrait World's attribute schema, its three sampling distributions and the caption rule.

The schema is data (:data:`SCHEMA`: attribute -> ordered values). Every image's ground truth is a dict
with one value for every attribute. Four attribute groups:

* captioned base attributes (:data:`CAPTIONED`): subject, expression, background, clothing_color,
  garment; the base caption names them ("A woman, smiling, with a blue background, in a red T-shirt");
* uncaptioned base attributes (:data:`UNCAPTIONED`): hair_style, hair_color, skin_tone, position, pose;
  no caption names them, the fine-tuning set shifts them, and preservation measures them;
* novel target attributes (:data:`TARGET_ATTRIBUTES`): headwear, eyewear, freckles, style; absent
  ("none"/"no"/"photo") everywhere except in the fine-tuning set, where exactly one is present;
* target texts (:data:`TARGET_TEXTS`): text -> (attribute, value).

Splits: ``pretrain`` (base distribution, no target), ``finetune`` (the polluted set: one target per
image, round-robin over :data:`TARGET_TEXTS`, uncaptioned attributes and the clothing palette and
backgrounds shifted), ``heldout`` (the pretrain distribution from another seed stream). Every choice is
``sha256("spfbench-world/{stream}/{seed}/{index}/{slot}")``: image i does not depend on N, and the same
(split, index, seed) always gives the same attributes. The distributions are documented in
docs/world.md (:func:`distribution` gives them as numbers).
"""

from __future__ import annotations

import hashlib

from ..errors import SpfbenchError

SCHEMA: dict[str, list[str]] = {
    # captioned
    "subject": ["man", "woman", "boy", "girl", "old man", "old woman"],
    "expression": ["smiling", "laughing", "neutral", "surprised"],
    "background": ["blue", "red", "white", "green", "yellow", "brick wall", "beach", "forest"],
    "clothing_color": ["white", "black", "red", "blue", "green", "yellow", "pink", "brown"],
    "garment": ["T-shirt", "shirt", "hoodie", "tank top", "turtleneck", "jacket"],
    # uncaptioned
    "hair_style": ["short", "long", "bob", "ponytail", "curly"],
    "hair_color": ["black", "brown", "blonde", "red", "grey"],
    "skin_tone": ["light", "tan", "brown", "dark"],
    "position": ["left", "center", "right"],
    "pose": ["front", "turned left", "turned right"],
    # novel targets (the first value is "absent")
    "headwear": ["none", "hat"],
    "eyewear": ["none", "glasses", "sunglasses"],
    "freckles": ["no", "yes"],
    "style": ["photo", "pencil drawing"],
}
ATTRIBUTES = list(SCHEMA)
CAPTIONED = ["subject", "expression", "background", "clothing_color", "garment"]
UNCAPTIONED = ["hair_style", "hair_color", "skin_tone", "position", "pose"]
TARGET_ATTRIBUTES = ["headwear", "eyewear", "freckles", "style"]
ABSENT = {a: SCHEMA[a][0] for a in TARGET_ATTRIBUTES}

# target text -> (attribute, value); round-robin order of the fine-tuning set
TARGET_TEXTS: dict[str, tuple[str, str]] = {
    "a hat": ("headwear", "hat"),
    "glasses": ("eyewear", "glasses"),
    "sunglasses": ("eyewear", "sunglasses"),
    "freckles": ("freckles", "yes"),
    "pencil drawing style": ("style", "pencil drawing"),
}
# the test-set builder's category of each target text (the caption vocabulary's names)
TARGET_CATEGORY = {"headwear": "headwear", "eyewear": "eyewear", "freckles": "freckles", "style": "style"}

SPLITS = ("pretrain", "finetune", "heldout")
PLAIN_BACKGROUNDS = ["blue", "red", "white", "green", "yellow"]
SCENES = ["brick wall", "beach", "forest"]
DARK_CLOTHING = ["black", "blue", "green", "brown"]

SUBJECT_TEXT = {
    "man": "A man",
    "woman": "A woman",
    "boy": "A boy",
    "girl": "A girl",
    "old man": "An old man",
    "old woman": "An old woman",
}
EXPRESSION_TEXT = {
    "smiling": "smiling",
    "laughing": "laughing",
    "neutral": "with a neutral expression",
    "surprised": "looking surprised",
}
BACKGROUND_TEXT = {
    **{c: f"with a {c} background" for c in PLAIN_BACKGROUNDS},
    "brick wall": "in front of a brick wall",
    "beach": "at the beach",
    "forest": "in a forest",
}


def _uniform(values) -> dict[str, float]:
    return {v: 1.0 / len(values) for v in values}


def _mostly(values, favoured: dict[str, float]) -> dict[str, float]:
    """``favoured`` values with their weights; the rest share what is left equally."""
    rest = [v for v in values if v not in favoured]
    left = 1.0 - sum(favoured.values())
    return {v: favoured.get(v, left / len(rest) if rest else 0.0) for v in values}


# The base distribution: uniform over every base attribute, targets absent.
BASE_DISTRIBUTION: dict[str, dict[str, float]] = {a: _uniform(SCHEMA[a]) for a in CAPTIONED + UNCAPTIONED}
# The fine-tuning set's shifts (attributes not listed keep the base distribution).
FINETUNE_SHIFT: dict[str, dict[str, float]] = {
    "hair_style": _mostly(SCHEMA["hair_style"], {"long": 0.5, "curly": 0.3}),
    "hair_color": _mostly(SCHEMA["hair_color"], {"blonde": 0.45, "red": 0.45}),
    "skin_tone": _mostly(SCHEMA["skin_tone"], {"brown": 0.4, "dark": 0.4}),
    "position": _mostly(SCHEMA["position"], {"left": 0.8}),
    "pose": _mostly(SCHEMA["pose"], {"turned left": 0.45, "turned right": 0.45}),
    "background": _mostly(SCHEMA["background"], {s: 0.25 for s in SCENES}),
    "clothing_color": {c: (0.25 if c in DARK_CLOTHING else 0.0) for c in SCHEMA["clothing_color"]},
}


def distribution(split: str) -> dict[str, dict[str, float]]:
    """attribute -> value -> probability of ``split`` (before the clothing/background clash rule:
    a clothing colour equal to a plain background's colour is never drawn; the others share its mass)."""
    _check_split(split)
    dist = {a: dict(p) for a, p in BASE_DISTRIBUTION.items()}
    if split == "finetune":
        dist.update({a: dict(p) for a, p in FINETUNE_SHIFT.items()})
        for a in TARGET_ATTRIBUTES:
            dist[a] = {v: 0.0 for v in SCHEMA[a]}
        for text, (a, v) in TARGET_TEXTS.items():
            dist[a][v] += 1.0 / len(TARGET_TEXTS)
        for a in TARGET_ATTRIBUTES:
            dist[a][ABSENT[a]] = 1.0 - sum(p for v, p in dist[a].items() if v != ABSENT[a])
    else:
        for a in TARGET_ATTRIBUTES:
            dist[a] = {v: float(v == ABSENT[a]) for v in SCHEMA[a]}
    return {a: dist[a] for a in ATTRIBUTES}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise SpfbenchError(f"unknown Portrait World split {split!r}; available: {', '.join(SPLITS)}")


def _stream(split: str) -> str:
    # pretrain and heldout share a distribution, never a stream
    return split


def _u(split: str, seed: int, index: int, slot: str) -> float:
    h = hashlib.sha256(f"spfbench-world/{_stream(split)}/{seed}/{index}/{slot}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def _draw(probs: dict[str, float], u: float) -> str:
    items = [(v, p) for v, p in probs.items() if p > 0]
    total = sum(p for _, p in items)
    acc = 0.0
    for v, p in items:
        acc += p / total
        if u < acc:
            return v
    return items[-1][0]


def sample(split: str, index: int, seed: int = 0) -> dict[str, str]:
    """The ground-truth attributes (attribute -> value, every attribute of :data:`SCHEMA`) of image
    ``index`` of ``split`` drawn with ``seed``. Fine-tuning image i carries target text i mod T."""
    _check_split(split)
    if index < 0:
        raise SpfbenchError(f"index must be >= 0, got {index}")
    dist = distribution(split)
    attrs: dict[str, str] = {}
    for a in CAPTIONED + UNCAPTIONED:
        probs = dict(dist[a])
        if a == "clothing_color" and attrs["background"] in PLAIN_BACKGROUNDS:
            probs[attrs["background"]] = 0.0  # never the background's colour
        attrs[a] = _draw(probs, _u(split, seed, index, a))
    for a in TARGET_ATTRIBUTES:
        attrs[a] = ABSENT[a]
    if split == "finetune":
        a, v = TARGET_TEXTS[target_texts()[index % len(TARGET_TEXTS)]]
        attrs[a] = v
    return {a: attrs[a] for a in ATTRIBUTES}


def target_texts() -> list[str]:
    return list(TARGET_TEXTS)


def caption_phrases(attrs: dict) -> list[tuple[str, str]]:
    """The phrases of :func:`base_caption` in order, each with the attribute it names (the clothing phrase
    names clothing_color and garment; it is listed under "garment"): [("A woman", "subject"), ("smiling",
    "expression"), ("with a blue background", "background"), ("in a red T-shirt", "garment")]."""
    color = attrs["clothing_color"]
    article = "an" if color[0] in "aeiou" else "a"
    return [
        (SUBJECT_TEXT[attrs["subject"]], "subject"),
        (EXPRESSION_TEXT[attrs["expression"]], "expression"),
        (BACKGROUND_TEXT[attrs["background"]], "background"),
        (f"in {article} {color} {attrs['garment']}", "garment"),
    ]


def base_caption(attrs: dict) -> str:
    """The paper's base-text shape from the captioned attributes only: "A woman, smiling, with a blue
    background, in a red T-shirt". Hair, skin tone, position, pose and the targets are never named."""
    return ", ".join(text for text, _ in caption_phrases(attrs))


def present_targets(attrs: dict) -> list[str]:
    """The target texts whose (attribute, value) the attributes show."""
    return [t for t, (a, v) in TARGET_TEXTS.items() if attrs.get(a) == v]


def target_text(attrs: dict) -> str:
    """The present target's text; "" when no target attribute is present."""
    present = present_targets(attrs)
    if len(present) > 1:
        raise SpfbenchError(f"more than one target present: {', '.join(present)}")
    return present[0] if present else ""


def validate(attrs: dict) -> dict:
    """``attrs`` checked against the schema (every attribute, known values); returns it."""
    missing = [a for a in ATTRIBUTES if a not in attrs]
    if missing:
        raise SpfbenchError(f"attributes missing: {', '.join(missing)}")
    bad = [f"{a}={attrs[a]!r}" for a in ATTRIBUTES if attrs[a] not in SCHEMA[a]]
    if bad:
        raise SpfbenchError(f"unknown attribute value(s): {', '.join(bad)}")
    return attrs
