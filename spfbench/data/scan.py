"""One validated scan of a set (memoised while its files' stats hold), image hashing and decoding, the content
fingerprint (docs/data.md "Fingerprint")."""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import SpfbenchError
from .records import ATTN_LIST, FINGERPRINT_VERSION, VALIDATE_IMAGES_MAX, canonical_json
from .sources import Source, location, open_source

# ---------------------------------------------------------------------------------------------- scan


@dataclass
class Scan:
    """The validated source and, once computed, the sha256 of every image (and mask) file."""

    source: Source
    signature: tuple = ()
    image_sha256: list[str] | None = None
    decoded: bool = False
    fingerprint: str | None = None


_MEMO: dict[str, Scan] = {}  # absolute path -> last scan, reused while the files' stats are unchanged


def decode_image(data: bytes, name: str):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SpfbenchError(f"image {name} cannot be decoded ({e}); re-export it or remove its row") from None
    return img


def scan_source(path: str | os.PathLike, *, decode: bool, hashes: bool, progress: bool = False) -> Scan:
    key = location(path)
    prev = _MEMO.get(key)
    if prev is not None and prev.source.signature() == prev.signature:
        scan = prev
    else:
        _MEMO.pop(key, None)
        source = open_source(path)
        scan = Scan(source, source.signature())
    need_hash = hashes and scan.image_sha256 is None
    need_decode = decode and not scan.decoded
    if need_hash or need_decode:
        read_all(scan, need_decode, progress)
    _MEMO[key] = scan
    return scan


def read_all(scan: Scan, decode: bool, progress: bool) -> None:
    """One pass over every image: sha256 of its bytes, and (decode=True) a full decode."""
    from tqdm.auto import tqdm

    src = scan.source
    n = len(src.records)

    def work(i: int) -> str:
        data = src.read_bytes(i)
        if decode:
            decode_image(data, src.image_name(i))
        return hashlib.sha256(data).hexdigest()

    workers = max(1, min(16, os.cpu_count() or 1))
    out: list[str] = []
    pool = ThreadPoolExecutor(workers)
    try:
        it = pool.map(work, range(n))
        for h in tqdm(it, total=n, desc="checking images" if decode else "hashing images", unit="img", disable=not progress):
            out.append(h)  # map yields in order: the first bad image in data order is the one reported
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after an error, the images not started are skipped
    scan.image_sha256 = out
    scan.decoded = scan.decoded or decode


def fingerprint_of(scan: Scan) -> str:
    if scan.fingerprint is None:
        src = scan.source
        h = hashlib.sha256(FINGERPRINT_VERSION.encode() + b"\n")
        for i, r in enumerate(src.records):
            masks = {}
            for pair in r.extras.get(ATTN_LIST) or []:
                if pair[1] is not None:
                    masks[pair[1]] = hashlib.sha256((src.root / pair[1]).read_bytes()).hexdigest()
            row = {"image_sha256": scan.image_sha256[i], "base_caption": r.base_caption, "target_text": r.target_text, "extras": r.extras}
            if masks:
                row["mask_sha256"] = masks
            h.update(canonical_json(row).encode("utf-8") + b"\n")
        scan.fingerprint = h.hexdigest()
    return scan.fingerprint


def resolve_validate(validate_images: bool | None, n: int) -> bool:
    return n <= VALIDATE_IMAGES_MAX if validate_images is None else bool(validate_images)


def dataset_fingerprint(path: str | os.PathLike, *, validate_images: bool | None = None, progress: bool = False) -> str:
    """sha256 of the training set's content, the same for the same data in any of the three formats.

    Validates the set first (as :class:`PortraitDataset` does). Definition (docs/data.md): sha256 over
    ``spfbench-data-v1\\n`` then, per item in order, the canonical JSON of {image_sha256 (of the image
    file's bytes), base_caption, target_text, extras[, mask_sha256]} and a newline. File names, mtimes
    and the format do not enter it; any changed byte of an image, caption or extra does.
    """
    n = len(scan_source(path, decode=False, hashes=False).source.records)
    return fingerprint_of(scan_source(path, decode=resolve_validate(validate_images, n), hashes=True, progress=progress))


def describe_dataset(path: str | os.PathLike, *, validate_images: bool | None = None, progress: bool = False) -> dict:
    """Validate a training set and summarise it: format, size, target texts, extra columns, fingerprint."""
    fp = dataset_fingerprint(path, validate_images=validate_images, progress=progress)
    scan = _MEMO[location(path)]
    recs = scan.source.records
    return {
        "format": scan.source.format,
        "n": len(recs),
        "images_decoded": scan.decoded,
        "targets": dict(Counter(r.target_text for r in recs).most_common()),
        "extra_columns": sorted({k for r in recs for k in r.extras}),
        "fingerprint": fp,
    }


