"""Training-set rows and the constants of the formats (docs/data.md "Row")."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..captions import REQUIRED_COLUMNS, join_caption
from ..errors import SpfbenchError

METADATA = "metadata.jsonl"
HUB_PREFIX = "hf:"  # hf:NAME[#SPLIT]: datasets.load_dataset(NAME, split=SPLIT)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
VALIDATE_IMAGES_MAX = 50_000  # validate_images=None decodes every image of sets up to this size
FINGERPRINT_VERSION = "spfbench-data-v1"
PREPROCESS_VERSION = "spfbench-preprocess-v1"
CACHE_FORMAT = 1
CACHE_META = "cache.json"
HF_IMAGE = "image"
ATTN_LIST = "attn_list"




# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PortraitRecord:
    """One row of a training set, without its image."""

    index: int
    base_caption: str
    target_text: str
    extras: dict
    where: str  # for messages: "DIR/metadata.jsonl line 3 (images/a.png)", "shard.tar sample 00003", ...

    @property
    def caption(self) -> str:
        return join_caption(self.base_caption, self.target_text)


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def required_captions(rec: dict, where: str) -> tuple[str, str]:
    vals = []
    for c in REQUIRED_COLUMNS:
        v = rec.get(c)
        if c not in rec or v is None:
            raise SpfbenchError(f"{where}: column {c} is missing; every row needs {', '.join(REQUIRED_COLUMNS)}")
        if not isinstance(v, str) or not v.strip():
            raise SpfbenchError(f"{where}: {c} is empty or not text")
        vals.append(v.strip())
    return vals[0], vals[1]


def check_extras(extras: dict, where: str) -> None:
    try:
        json.dumps(extras, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SpfbenchError(f"{where}: extra columns must be JSON values ({e})") from None
    attn = extras.get(ATTN_LIST)
    if attn is None:
        return
    ok = isinstance(attn, list) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and (p[1] is None or isinstance(p[1], str))
        for p in attn
    )
    if not ok:
        raise SpfbenchError(f"{where}: {ATTN_LIST} must be a list of [phrase, mask path or null] pairs")


