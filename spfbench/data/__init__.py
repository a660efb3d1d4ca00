"""Portrait training sets: reading, validation, preprocessing, the fingerprint and the encoding cache.

One module per topic: ``records`` (rows, constants), ``sources`` (the format readers), ``scan`` (validation pass,
hashing, fingerprint), ``items`` (preprocessing, :class:`PortraitDataset`), ``cache`` (the encoding cache); this
package exports their public names.

Three on-disk formats, told apart by what the path holds (definitions: docs/data.md):

* **imagefolder** ``DIR/metadata.jsonl``: one JSON object per line, ``file_name`` (image path relative to
  DIR), ``base_caption``, ``target_text``, any extra columns (kept as-is, e.g. ``attn_list``).
* **HF datasets folder** (``Dataset.save_to_disk`` output, or a ``DatasetDict`` with a ``train`` split):
  columns ``image`` (an ``Image`` feature), ``base_caption``, ``target_text``, extras.
* **WebDataset shards**: a ``.tar`` file, a folder of them, or a glob / brace pattern; a sample is the
  members sharing a key (``KEY.png|jpg|jpeg|webp`` + ``KEY.json`` holding the captions and extras).
  Shards are indexed once (member offsets from the tar headers) and read at random.

and one name form: ``hf:NAME[#SPLIT]`` loads ``datasets.load_dataset(NAME, split=SPLIT)`` (a Hub id when
online or cached, a local folder of data files offline), validated as the HF datasets folder.

Every item is the same whatever the format: ``pixel_values`` (3, R, R) in [-1, 1], the complete caption
``join_caption(base_caption, target_text)``, the two parts, ``index`` and ``extras``. All validation
happens when a dataset is opened, before any training starts; every problem is a one-line
:class:`SpfbenchError` naming the file and line, item or sample.
"""

from .cache import CachedDataset, cache_encodings, cache_key
from .items import PortraitDataset, collate, flip_decision, preprocess
from .records import HUB_PREFIX, METADATA, VALIDATE_IMAGES_MAX, PortraitRecord
from .scan import dataset_fingerprint, describe_dataset
from .sources import ImageFolder, detect_format, hub_name, location

__all__ = [
    "PortraitDataset",
    "PortraitRecord",
    "CachedDataset",
    "ImageFolder",
    "cache_encodings",
    "cache_key",
    "collate",
    "dataset_fingerprint",
    "describe_dataset",
    "detect_format",
    "flip_decision",
    "hub_name",
    "location",
    "preprocess",
    "HUB_PREFIX",
    "METADATA",
    "VALIDATE_IMAGES_MAX",
]
