"""Portrait training sets: reading, validation, preprocessing, the fingerprint and the encoding cache.

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

from __future__ import annotations

import glob as _glob
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .captions import REQUIRED_COLUMNS, join_caption
from .errors import SpfbenchError
from .io import atomic_write_bytes, atomic_write_json, remove_stale_tmp

METADATA = "metadata.jsonl"
HUB_PREFIX = "hf:"  # hf:NAME[#SPLIT]: datasets.load_dataset(NAME, split=SPLIT)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
VALIDATE_IMAGES_MAX = 50_000  # validate_images=None decodes every image of sets up to this size
FINGERPRINT_VERSION = "spfbench-data-v1"
PREPROCESS_VERSION = "spfbench-preprocess-v1"
CACHE_FORMAT = 1
CACHE_META = "cache.json"
_HF_IMAGE = "image"
_ATTN_LIST = "attn_list"


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


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _required(rec: dict, where: str) -> tuple[str, str]:
    vals = []
    for c in REQUIRED_COLUMNS:
        v = rec.get(c)
        if c not in rec or v is None:
            raise SpfbenchError(f"{where}: column {c} is missing; every row needs {', '.join(REQUIRED_COLUMNS)}")
        if not isinstance(v, str) or not v.strip():
            raise SpfbenchError(f"{where}: {c} is empty or not text")
        vals.append(v.strip())
    return vals[0], vals[1]


def _check_extras(extras: dict, where: str) -> None:
    try:
        json.dumps(extras, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SpfbenchError(f"{where}: extra columns must be JSON values ({e})") from None
    attn = extras.get(_ATTN_LIST)
    if attn is None:
        return
    ok = isinstance(attn, list) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and (p[1] is None or isinstance(p[1], str))
        for p in attn
    )
    if not ok:
        raise SpfbenchError(f"{where}: {_ATTN_LIST} must be a list of [phrase, mask path or null] pairs")


# ---------------------------------------------------------------------------------------------- sources


class _Source:
    """A format reader: the validated records, and the raw bytes of each image."""

    format: str
    root: Path  # where relative mask paths (attn_list) are resolved
    records: list[PortraitRecord]

    def read_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def image_name(self, i: int) -> str:
        """The image, for error messages."""
        raise NotImplementedError

    def files_signature(self) -> tuple:
        raise NotImplementedError

    def signature(self) -> tuple:
        """Cheap stat-based identity of the files (memo key; not the fingerprint)."""
        masks = tuple(_stat(p) for i in range(len(self.records)) for p in self.mask_paths(i))
        return (self.format, self.files_signature(), masks)

    def mask_paths(self, i: int) -> list[Path]:
        attn = self.records[i].extras.get(_ATTN_LIST) or []
        return [self.root / p[1] for p in attn if p[1] is not None]

    def check_masks(self) -> None:
        for i, r in enumerate(self.records):
            for p in self.mask_paths(i):
                if not p.is_file():
                    raise SpfbenchError(f"{r.where}: {_ATTN_LIST} mask {p} does not exist")


def _stat(p: Path) -> tuple:
    try:
        s = p.stat()
    except OSError:
        return (str(p), None)
    return (str(p), s.st_size, s.st_mtime_ns)


class ImageFolder(_Source):
    format = "imagefolder"

    def __init__(self, root: Path):
        self.root = root
        meta = root / METADATA
        try:
            text = meta.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SpfbenchError(f"{meta} is unreadable: {e}") from None
        self.files: list[Path] = []
        self.records = []
        seen: dict[str, int] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            at = f"{meta} line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SpfbenchError(f"{at}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise SpfbenchError(f"{at}: expected a JSON object per line")
            name = rec.get("file_name")
            if not isinstance(name, str) or not name.strip():
                raise SpfbenchError(f"{at}: file_name is missing or empty; every row needs file_name, {', '.join(REQUIRED_COLUMNS)}")
            where = f"{at} ({name})"
            base, target = _required(rec, where)
            norm = os.path.normpath(name)
            if norm in seen:
                raise SpfbenchError(f"{meta}: file_name {name!r} appears on lines {seen[norm]} and {lineno}")
            seen[norm] = lineno
            path = root / name
            if not path.is_file():
                raise SpfbenchError(f"{at}: image file {path} does not exist")
            extras = {k: v for k, v in rec.items() if k not in ("file_name", *REQUIRED_COLUMNS)}
            _check_extras(extras, where)
            self.files.append(path)
            self.records.append(PortraitRecord(len(self.records), base, target, extras, where))
        if not self.records:
            raise SpfbenchError(f"{meta} holds no rows")

    def read_bytes(self, i: int) -> bytes:
        try:
            return self.files[i].read_bytes()
        except OSError as e:
            raise SpfbenchError(f"image {self.files[i]} is unreadable: {e.strerror or e}") from None

    def image_name(self, i: int) -> str:
        return str(self.files[i])

    def files_signature(self) -> tuple:
        return (_stat(self.root / METADATA), tuple(_stat(p) for p in self.files))


def _hf_dataset(root: Path):
    import datasets

    if (root / "dataset_dict.json").is_file():
        try:
            dd = datasets.load_from_disk(str(root))
        except Exception as e:  # noqa: BLE001 - any failure of the library is a bad folder
            raise SpfbenchError(f"HF dataset folder {root} cannot be loaded: {e}") from None
        if "train" not in dd:
            raise SpfbenchError(f"HF dataset folder {root} holds splits {', '.join(dd)} but no 'train' split")
        return dd["train"], root / "train"
    try:
        if json.loads((root / "state.json").read_text()).get("_data_files") == []:
            raise SpfbenchError(f"HF dataset {root} holds no rows")
    except (OSError, ValueError, AttributeError):
        pass  # load_from_disk reports it
    try:
        return datasets.load_from_disk(str(root)), root
    except Exception as e:  # noqa: BLE001
        raise SpfbenchError(f"HF dataset folder {root} cannot be loaded: {e}") from None


class _HFDisk(_Source):
    format = "hf"

    def __init__(self, root: Path):
        self.root = root
        self.label = f"HF dataset {root}"
        ds, split_dir = _hf_dataset(root)
        self.signature_files = sorted(p for p in split_dir.iterdir() if p.is_file())
        self._read_dataset(ds)

    def _read_dataset(self, ds) -> None:
        """Validate a ``datasets.Dataset`` (columns, captions, extras, images) into records and image bytes."""
        import datasets
        import pyarrow.compute as pc

        root = self.label[len("HF dataset "):] if self.label.startswith("HF dataset ") else self.label
        cols = list(ds.column_names)
        for c in (_HF_IMAGE, *REQUIRED_COLUMNS):
            if c not in cols:
                raise SpfbenchError(
                    f"HF dataset {root} lacks column {c}; it needs {_HF_IMAGE}, {', '.join(REQUIRED_COLUMNS)} (found: {', '.join(cols)})"
                )
        if not isinstance(ds.features[_HF_IMAGE], datasets.Image):
            raise SpfbenchError(
                f"HF dataset {root}: column {_HF_IMAGE} is {type(ds.features[_HF_IMAGE]).__name__}, not an Image feature "
                f"(use .cast_column('{_HF_IMAGE}', datasets.Image()) before save_to_disk)"
            )
        extra_cols = [c for c in cols if c not in (_HF_IMAGE, *REQUIRED_COLUMNS)]
        for c in extra_cols:
            if type(ds.features[c]).__name__ in ("Image", "Audio", "Video", "Pdf"):
                raise SpfbenchError(f"HF dataset {root}: extra column {c} is a {type(ds.features[c]).__name__} feature; extras must be JSON values (store mask paths)")
        rows = ds.select_columns([*REQUIRED_COLUMNS, *extra_cols]).to_list()
        if not rows:
            raise SpfbenchError(f"HF dataset {root} holds no rows")
        self.records = []
        for i, rec in enumerate(rows):
            at = f"HF dataset {root} item {i}"
            base, target = _required(rec, at)
            extras = {k: rec[k] for k in extra_cols}
            _check_extras(extras, at)
            self.records.append(PortraitRecord(i, base, target, extras, at))
        # Images as stored bytes (decoded here, by PIL, exactly like the other formats).
        self.images = ds.select_columns([_HF_IMAGE]).cast_column(_HF_IMAGE, datasets.Image(decode=False))
        table = self.images.with_format("arrow")[: len(self.images)]
        col = table.column(_HF_IMAGE)
        no_bytes = pc.is_null(pc.struct_field(col, "bytes")).to_pylist()
        paths = pc.struct_field(col, "path").to_pylist()
        self.external = {}
        for i, (nb, p) in enumerate(zip(no_bytes, paths)):
            if nb:
                if p is None:
                    raise SpfbenchError(f"HF dataset {root} item {i}: image is empty (no bytes, no path)")
                if not Path(p).is_file():
                    raise SpfbenchError(f"HF dataset {root} item {i}: image file {p} does not exist")
                self.external[i] = Path(p)

    def read_bytes(self, i: int) -> bytes:
        if i in self.external:
            return self.external[i].read_bytes()
        return self.images[i][_HF_IMAGE]["bytes"]

    def image_name(self, i: int) -> str:
        return f"{self.label} item {i}"

    def files_signature(self) -> tuple:
        return (tuple(_stat(p) for p in self.signature_files), tuple(_stat(p) for p in self.external.values()))


def hub_name(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(name, split)`` of a ``hf:NAME[#SPLIT]`` data argument (docs/data.md "Hub names"), None for a path."""
    text = os.fspath(path)
    if not text.startswith(HUB_PREFIX):
        return None
    name, _, split = text[len(HUB_PREFIX):].partition("#")
    if not name.strip():
        raise SpfbenchError(f"{text}: give a dataset after {HUB_PREFIX}, e.g. {HUB_PREFIX}owner/name, {HUB_PREFIX}owner/name#train"
                            f" or {HUB_PREFIX}/path/to/folder")
    return name.strip(), split.strip() or "train"


def location(path: str | os.PathLike) -> str:
    """How a data argument is recorded (run.json, plans): a ``hf:`` name as given, a path made absolute."""
    return os.fspath(path) if hub_name(path) is not None else str(Path(path).resolve())


class _HFHub(_HFDisk):
    """``hf:NAME[#SPLIT]``: ``datasets.load_dataset(NAME, split=SPLIT)`` (default ``train``). NAME is a Hub dataset id
    (downloaded when online; offline, with ``HF_HUB_OFFLINE=1``, only from the cache) or a local folder of data files
    that ``load_dataset`` reads (parquet, arrow, csv/json with an image column, an imagefolder), offline. The rows are
    then validated exactly as a ``save_to_disk`` folder's. Masks of ``attn_list`` resolve against the local folder
    (a Hub id: against the current folder; give absolute paths)."""

    format = "hub"

    def __init__(self, text: str):
        import datasets

        name, split = hub_name(text)
        local = Path(name).expanduser()
        self.root = local if local.is_dir() else Path.cwd()
        self.label = f"HF dataset {text}"
        try:
            ds = datasets.load_dataset(str(local) if local.is_dir() else name, split=split)
        except Exception as e:  # noqa: BLE001 - any failure of the library is a bad name, split or connection
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            offline = " (offline: a Hub id loads only from the local cache; run once online, or give a local folder)" \
                if not local.is_dir() and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") else ""
            raise SpfbenchError(f"{text}: datasets.load_dataset({name!r}, split={split!r}) failed: {first}{offline}") from None
        if not isinstance(ds, datasets.Dataset):
            raise SpfbenchError(f"{text}: load_dataset returned a {type(ds).__name__}, not one split; name it: {HUB_PREFIX}{name}#train")
        self.signature_files = sorted(Path(f["filename"]) for f in ds.cache_files)
        self._read_dataset(ds)


_WDS_SPLIT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split (first dot of the base name)
_WDS_SKIP = re.compile(r"(^|/)(__[^/]*__($|/)|\._)")


@dataclass
class _WdsSample:
    shard: int
    key: str
    image: tuple[int, int] = (0, -1)  # (offset, size)
    image_ext: str = ""
    json_member: tuple[int, int] | None = None


def _wds_shards(path_text: str) -> tuple[list[Path], Path]:
    path = Path(path_text)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        return shards, path
    if path.is_file():
        return [path], path.parent
    patterns = [path_text]
    if "{" in path_text:
        try:
            from braceexpand import braceexpand

            patterns = list(braceexpand(path_text))
        except ImportError:
            pass
    found: list[Path] = []
    for pat in patterns:
        found.extend(Path(p) for p in sorted(_glob.glob(pat)) if Path(p).is_file() and Path(p) not in found)
    return found, (found[0].parent if found else Path("."))


class _WebDataset(_Source):
    format = "webdataset"

    def __init__(self, path_text: str):
        self.path_text = path_text
        self.shards, self.root = _wds_shards(path_text)
        if not self.shards:
            raise SpfbenchError(f"{path_text}: no .tar shards found")
        samples: list[_WdsSample] = []
        seen: dict[str, Path] = {}
        for s, shard in enumerate(self.shards):
            samples.extend(self._index(s, shard, seen))
        if not samples:
            raise SpfbenchError(f"{path_text}: the shards hold no samples")
        self.samples = samples
        self.records = []
        handles: dict[int, object] = {}
        try:
            for smp in samples:
                at = f"{self.shards[smp.shard]} sample {smp.key}"
                if smp.shard not in handles:
                    handles[smp.shard] = open(self.shards[smp.shard], "rb")
                f = handles[smp.shard]
                f.seek(smp.json_member[0])
                raw = f.read(smp.json_member[1])
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise SpfbenchError(f"{at}: {smp.key}.json is not valid JSON ({e})") from None
                if not isinstance(rec, dict):
                    raise SpfbenchError(f"{at}: {smp.key}.json must hold a JSON object")
                base, target = _required(rec, at)
                extras = {k: v for k, v in rec.items() if k not in REQUIRED_COLUMNS}
                _check_extras(extras, at)
                self.records.append(PortraitRecord(len(self.records), base, target, extras, at))
        finally:
            for f in handles.values():
                f.close()

    def _index(self, s: int, shard: Path, seen: dict[str, Path]) -> list[_WdsSample]:
        size = shard.stat().st_size
        try:
            tf = tarfile.open(shard, mode="r:")  # uncompressed only: members must be seekable
        except tarfile.ReadError as e:
            raise SpfbenchError(
                f"shard {shard} is not an uncompressed tar ({e}); compressed shards cannot be read at random, re-pack them as plain .tar"
            ) from None
        out: dict[str, _WdsSample] = {}
        last = None
        try:
            with tf:
                for m in tf:
                    if not m.isfile() or _WDS_SKIP.search(m.name):
                        continue
                    name = m.name[2:] if m.name.startswith("./") else m.name
                    match = _WDS_SPLIT.match(name)
                    if not match:
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    if m.offset_data + m.size > size:
                        raise SpfbenchError(f"shard {shard} is truncated (member {m.name} runs past the end of the file)")
                    smp = out.get(key)
                    if smp is None:
                        if key in seen:
                            raise SpfbenchError(f"sample key {key!r} appears in shard {seen[key]} and in shard {shard}")
                        seen[key] = shard
                        smp = out[key] = _WdsSample(s, key)
                    elif last != key:
                        raise SpfbenchError(f"shard {shard}: sample key {key!r} appears twice (its members are not contiguous)")
                    last = key
                    if ext in IMAGE_EXTENSIONS:
                        if smp.image_ext:
                            raise SpfbenchError(f"shard {shard} sample {key}: two images ({key}.{smp.image_ext}, {key}.{ext}); keep one")
                        smp.image, smp.image_ext = (m.offset_data, m.size), ext
                    elif ext == "json":
                        if smp.json_member is not None:
                            raise SpfbenchError(f"shard {shard} sample {key}: {key}.json appears twice")
                        smp.json_member = (m.offset_data, m.size)
        except tarfile.TarError as e:
            raise SpfbenchError(f"shard {shard} is not a readable tar file ({e})") from None
        for key, smp in out.items():
            if not smp.image_ext:
                raise SpfbenchError(f"shard {shard} sample {key}: no image ({', '.join('.' + e for e in IMAGE_EXTENSIONS)})")
            if smp.json_member is None:
                raise SpfbenchError(f"shard {shard} sample {key}: no {key}.json with base_caption and target_text")
        return list(out.values())

    def read_bytes(self, i: int) -> bytes:
        smp = self.samples[i]
        with open(self.shards[smp.shard], "rb") as f:
            f.seek(smp.image[0])
            return f.read(smp.image[1])

    def image_name(self, i: int) -> str:
        smp = self.samples[i]
        return f"{self.shards[smp.shard]}: {smp.key}.{smp.image_ext}"

    def files_signature(self) -> tuple:
        return tuple(_stat(p) for p in _wds_shards(self.path_text)[0])


def detect_format(path: str | os.PathLike) -> str:
    """``imagefolder``, ``hf``, ``webdataset`` or ``hub`` (a ``hf:`` name), from the argument and what the path
    holds (raises SpfbenchError otherwise)."""
    text = os.fspath(path)
    if hub_name(text) is not None:
        return "hub"
    p = Path(text)
    if not p.exists() and any(ch in text for ch in "*?[{"):
        return "webdataset"
    if p.is_file():
        if p.suffix.lower() == ".tar":
            return "webdataset"
        raise SpfbenchError(f"{p} is a file; give a dataset folder ({METADATA}, an HF datasets folder or .tar shards) or a .tar shard")
    if not p.exists():
        raise SpfbenchError(f"dataset folder {p} does not exist")
    if not p.is_dir():
        raise SpfbenchError(f"{p} is not a folder")
    if (p / METADATA).is_file():
        return "imagefolder"
    if (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()):
        return "hf"
    if any(p.glob("*.tar")):
        return "webdataset"
    hint = " (metadata.csv is not read: convert it to metadata.jsonl)" if (p / "metadata.csv").exists() else ""
    raise SpfbenchError(
        f"{p} holds no training data: expected {METADATA} (imagefolder), an HF datasets folder (save_to_disk) or .tar shards{hint}"
    )


def _open_source(path: str | os.PathLike) -> _Source:
    fmt = detect_format(path)
    if fmt == "imagefolder":
        src: _Source = ImageFolder(Path(path))
    elif fmt == "hf":
        src = _HFDisk(Path(path))
    elif fmt == "hub":
        src = _HFHub(os.fspath(path))
    else:
        src = _WebDataset(os.fspath(path))
    if not src.records:
        raise SpfbenchError(f"dataset {os.fspath(path)} holds no rows")
    src.check_masks()
    return src


# ---------------------------------------------------------------------------------------------- scan


@dataclass
class _Scan:
    """The validated source and, once computed, the sha256 of every image (and mask) file."""

    source: _Source
    signature: tuple = ()
    image_sha256: list[str] | None = None
    decoded: bool = False
    fingerprint: str | None = None


_MEMO: dict[str, _Scan] = {}  # absolute path -> last scan, reused while the files' stats are unchanged


def _decode(data: bytes, name: str):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SpfbenchError(f"image {name} cannot be decoded ({e}); re-export it or remove its row") from None
    return img


def _scan(path: str | os.PathLike, *, decode: bool, hashes: bool, progress: bool = False) -> _Scan:
    key = location(path)
    prev = _MEMO.get(key)
    if prev is not None and prev.source.signature() == prev.signature:
        scan = prev
    else:
        _MEMO.pop(key, None)
        source = _open_source(path)
        scan = _Scan(source, source.signature())
    need_hash = hashes and scan.image_sha256 is None
    need_decode = decode and not scan.decoded
    if need_hash or need_decode:
        _read_all(scan, need_decode, progress)
    _MEMO[key] = scan
    return scan


def _read_all(scan: _Scan, decode: bool, progress: bool) -> None:
    """One pass over every image: sha256 of its bytes, and (decode=True) a full decode."""
    from tqdm.auto import tqdm

    src = scan.source
    n = len(src.records)

    def work(i: int) -> str:
        data = src.read_bytes(i)
        if decode:
            _decode(data, src.image_name(i))
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


def _fingerprint(scan: _Scan) -> str:
    if scan.fingerprint is None:
        src = scan.source
        h = hashlib.sha256(FINGERPRINT_VERSION.encode() + b"\n")
        for i, r in enumerate(src.records):
            masks = {}
            for pair in r.extras.get(_ATTN_LIST) or []:
                if pair[1] is not None:
                    masks[pair[1]] = hashlib.sha256((src.root / pair[1]).read_bytes()).hexdigest()
            row = {"image_sha256": scan.image_sha256[i], "base_caption": r.base_caption, "target_text": r.target_text, "extras": r.extras}
            if masks:
                row["mask_sha256"] = masks
            h.update(_canonical(row).encode("utf-8") + b"\n")
        scan.fingerprint = h.hexdigest()
    return scan.fingerprint


def _resolve_validate(validate_images: bool | None, n: int) -> bool:
    return n <= VALIDATE_IMAGES_MAX if validate_images is None else bool(validate_images)


def dataset_fingerprint(path: str | os.PathLike, *, validate_images: bool | None = None, progress: bool = False) -> str:
    """sha256 of the training set's content, the same for the same data in any of the three formats.

    Validates the set first (as :class:`PortraitDataset` does). Definition (docs/data.md): sha256 over
    ``spfbench-data-v1\\n`` then, per item in order, the canonical JSON of {image_sha256 (of the image
    file's bytes), base_caption, target_text, extras[, mask_sha256]} and a newline. File names, mtimes
    and the format do not enter it; any changed byte of an image, caption or extra does.
    """
    n = len(_scan(path, decode=False, hashes=False).source.records)
    return _fingerprint(_scan(path, decode=_resolve_validate(validate_images, n), hashes=True, progress=progress))


def describe_dataset(path: str | os.PathLike, *, validate_images: bool | None = None, progress: bool = False) -> dict:
    """Validate a training set and summarise it: format, size, target texts, extra columns, fingerprint."""
    fp = dataset_fingerprint(path, validate_images=validate_images, progress=progress)
    scan = _MEMO[os.path.abspath(os.fspath(path))]
    recs = scan.source.records
    return {
        "format": scan.source.format,
        "n": len(recs),
        "images_decoded": scan.decoded,
        "targets": dict(Counter(r.target_text for r in recs).most_common()),
        "extra_columns": sorted({k for r in recs for k in r.extras}),
        "fingerprint": fp,
    }


# ---------------------------------------------------------------------------------------------- preprocessing


def _to_rgb(img):
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def preprocess(image, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """A PIL image -> float32 tensor (3, R, R) in [-1, 1].

    center_crop=True: resize so the shorter side is R (bicubic, antialiased; the longer side becomes
    ``int(R * long / short)``, as torchvision's ``Resize(R)``), then crop the centre R x R (offsets
    ``round((size - R) / 2)``, as ``CenterCrop``). center_crop=False: resize to R x R (aspect not kept).
    Transparent images are composited over white first.
    """
    from PIL import Image

    img = _to_rgb(image)
    w, h = img.size
    R = int(resolution)
    if center_crop:
        if w <= h:
            nw, nh = R, int(R * h / w)
        else:
            nw, nh = int(R * w / h), R
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC)
        top, left = int(round((nh - R) / 2.0)), int(round((nw - R) / 2.0))
        if (nw, nh) != (R, R):
            img = img.crop((left, top, left + R, top + R))
    elif (w, h) != (R, R):
        img = img.resize((R, R), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32)
    return t / 127.5 - 1.0


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether item ``index`` is flipped in ``epoch`` (random_flip): a sha256 bit, independent of order,
    workers and restarts."""
    d = hashlib.sha256(f"spfbench-flip/{seed}/{epoch}/{index}".encode()).digest()
    return bool(d[0] & 1)


# ---------------------------------------------------------------------------------------------- datasets


class _ItemsBase(torch.utils.data.Dataset):
    records: list[PortraitRecord]
    random_flip: bool
    seed: int
    epoch: int

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Flips of random_flip depend on (seed, epoch, index); call before each epoch for fresh flips
        (the DataLoader's workers see it only if they are started after the call)."""
        self.epoch = int(epoch)

    def flipped(self, index: int) -> bool:
        return self.random_flip and flip_decision(self.seed, self.epoch, index)

    def _strings(self, index: int) -> dict:
        r = self.records[index]
        return {
            "caption": r.caption,
            "base_caption": r.base_caption,
            "target_text": r.target_text,
            "index": r.index,
            "extras": json.loads(json.dumps(r.extras)),  # a copy: a caller may not change the records
        }

    def _check_index(self, index) -> int:
        index = int(index)
        if not 0 <= index < len(self.records):
            raise IndexError(f"item {index} out of range (dataset of {len(self.records)})")
        return index


class PortraitDataset(_ItemsBase):
    """A validated portrait training set; items are dicts of ``pixel_values`` (3, R, R) float32 in
    [-1, 1], ``caption`` (complete), ``base_caption``, ``target_text``, ``index`` and ``extras``.

    Opening it validates everything except image decoding, which runs when ``validate_images`` is True
    (None: True for sets of up to 50,000 items). Deterministic: the only randomness is random_flip, a
    horizontal flip decided by :func:`flip_decision` (seed, epoch, index).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        *,
        seed: int = 0,
        validate_images: bool | None = None,
        progress: bool = False,
    ):
        if int(resolution) <= 0:
            raise SpfbenchError(f"resolution must be positive, got {resolution}")
        self.path = path
        scan = _scan(path, decode=False, hashes=False)
        if _resolve_validate(validate_images, len(scan.source.records)):
            scan = _scan(path, decode=True, hashes=True, progress=progress)
        self._scan = scan
        self.source = scan.source
        self.records = scan.source.records
        self.format = scan.source.format
        self.root = scan.source.root
        self.resolution = int(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)
        self.seed = int(seed)
        self.epoch = 0

    @property
    def fingerprint(self) -> str:
        """:func:`dataset_fingerprint` of this set (hashes the images on first use if validation did not)."""
        if self._scan.image_sha256 is None:
            _read_all(self._scan, False, False)
        return _fingerprint(self._scan)

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.records]

    def resolve(self, relative: str) -> Path:
        """A path from an extra column (e.g. an attn_list mask), resolved against the dataset root."""
        return self.root / relative

    def load_image(self, index: int):
        """The item's image as an RGB PIL image, before resizing (EXIF orientation applied)."""
        index = self._check_index(index)
        return _to_rgb(_decode(self.source.read_bytes(index), self.source.image_name(index)))

    def pixels(self, index: int, flip: bool = False) -> torch.Tensor:
        t = preprocess(self.load_image(index), self.resolution, self.center_crop)
        return torch.flip(t, dims=[-1]) if flip else t

    def __getitem__(self, index) -> dict:
        index = self._check_index(index)
        return {"pixel_values": self.pixels(index, self.flipped(index)), **self._strings(index)}

    def preprocess_spec(self) -> dict:
        return {"version": PREPROCESS_VERSION, "resolution": self.resolution, "center_crop": self.center_crop}


def collate(items: list[dict]) -> dict:
    """A batch: tensors stacked, ``index`` as a LongTensor, strings and extras as lists."""
    if not items:
        raise ValueError("collate: empty batch")
    batch = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if isinstance(vals[0], torch.Tensor):
            batch[key] = torch.stack(vals)
        elif key == "index":
            batch[key] = torch.tensor(vals, dtype=torch.long)
        else:
            batch[key] = vals
    return batch


# ---------------------------------------------------------------------------------------------- cache


def cache_key(dataset: PortraitDataset, model_key: str) -> str:
    """sha256 of what cached encodings depend on: the data fingerprint, the preprocessing, whether
    flipped copies are stored, and the caller's model_key (model identity, dtype, ...)."""
    spec = {
        "format": CACHE_FORMAT,
        "fingerprint": dataset.fingerprint,
        "preprocess": dataset.preprocess_spec(),
        "flipped": dataset.random_flip,
        "model_key": model_key,
    }
    return hashlib.sha256(_canonical(spec).encode()).hexdigest()


def _as_tensors(out, name: str, n: int) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        out = {name: out}
    if not isinstance(out, dict) or not all(isinstance(v, torch.Tensor) for v in out.values()):
        raise TypeError(f"the {name} encoder must return a tensor or a dict of tensors, got {type(out).__name__}")
    for k, v in out.items():
        if v.shape[0] != n:
            raise ValueError(f"the {name} encoder returned {k} with batch size {v.shape[0]} for {n} inputs")
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _shard_path(folder: Path, s: int) -> Path:
    return folder / f"shard-{s:05d}.safetensors"


def _shard_ok(path: Path, rows: int, key: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("key") == key and f.get_slice("index").get_shape() == [rows]
    except Exception:  # noqa: BLE001 - an unreadable shard is recomputed
        return False


def cache_encodings(
    dataset: PortraitDataset,
    encode_image: Callable[[torch.Tensor], torch.Tensor | dict],
    encode_text: Callable[[list[str]], torch.Tensor | dict],
    cache_dir: str | os.PathLike,
    *,
    model_key: str,
    batch_size: int = 16,
    shard_size: int = 256,
    progress: bool = True,
    encode_record: Callable[[list[PortraitRecord]], dict] | None = None,
) -> "CachedDataset":
    """Encode every item once and store the results; returns a :class:`CachedDataset` over them.

    ``encode_image(pixel_values (B, 3, R, R) float32 CPU) -> tensor (B, ...)`` (e.g. scaled VAE latents;
    stored as ``latents``) and ``encode_text(list of B complete captions) -> tensor (B, L, D)`` (stored as
    ``encoder_hidden_states``); either may return a dict of tensors instead, stored under its keys.
    Results are stored as returned (dtype included) in ``cache_dir/KEY[:24]/shard-NNNNN.safetensors``
    (``shard_size`` items each, written atomically); KEY is :func:`cache_key`, so a changed dataset,
    preprocessing or ``model_key`` gets a fresh folder. Shards already written are reused, so an
    interrupted run resumes. With random_flip, the flipped images are encoded too (``encode_image``'s
    keys get a ``.flipped`` twin). ``encode_record(list of B records) -> dict of tensors (B, ...)``, when
    given, adds what depends on the item's texts only (e.g. a method's base-caption encoding; not flipped).
    Keys of the three encoders may not clash. Whatever ``encode_record`` computes must be named by
    ``model_key`` too.
    """
    from safetensors.torch import save
    from tqdm.auto import tqdm

    if not isinstance(model_key, str) or not model_key:
        raise SpfbenchError("cache_encodings: model_key must be a non-empty string naming the encoders")
    if batch_size <= 0 or shard_size <= 0:
        raise SpfbenchError("cache_encodings: batch_size and shard_size must be positive")
    key = cache_key(dataset, model_key)
    folder = Path(cache_dir) / key[:24]
    n = len(dataset)
    meta_path = folder / CACHE_META
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            shard_size = int(meta["shard_size"])  # the layout belongs to the cache
            if meta["key"] != key or meta["n"] != n:
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError):
            raise SpfbenchError(f"{meta_path} is not a cache of this dataset and model; delete {folder}") from None
    else:
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "n": n,
            "shard_size": shard_size,
            "fingerprint": dataset.fingerprint,
            "preprocess": dataset.preprocess_spec(),
            "flipped": dataset.random_flip,
            "model_key": model_key,
        }
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpfbenchError(f"cannot create cache folder {folder}: {e.strerror or e}") from None
        atomic_write_json(meta_path, meta)
    remove_stale_tmp(folder)

    n_shards = (n + shard_size - 1) // shard_size
    spans = [(s, s * shard_size, min(n, (s + 1) * shard_size)) for s in range(n_shards)]
    todo = [(s, a, b) for s, a, b in spans if not _shard_ok(_shard_path(folder, s), b - a, key)]
    if todo:
        bar = tqdm(total=n, initial=n - sum(b - a for _, a, b in todo), desc="caching encodings", unit="img", disable=not progress)
        try:
            for s, a, b in todo:
                parts: dict[str, list[torch.Tensor]] = {}
                for c in range(a, b, batch_size):
                    idx = list(range(c, min(b, c + batch_size)))
                    pix = torch.stack([dataset.pixels(i) for i in idx])
                    enc = _as_tensors(encode_image(pix), "latents", len(idx))
                    if dataset.random_flip:
                        flipped = _as_tensors(encode_image(torch.flip(pix, dims=[-1])), "latents", len(idx))
                        enc.update({f"{k}.flipped": v for k, v in flipped.items()})
                    txt = _as_tensors(encode_text([dataset.records[i].caption for i in idx]), "encoder_hidden_states", len(idx))
                    clash = set(enc) & set(txt)
                    if clash:
                        raise ValueError(f"image and text encoders both return {', '.join(sorted(clash))}")
                    if encode_record is not None:
                        rec = _as_tensors(encode_record([dataset.records[i] for i in idx]), "record", len(idx))
                        clash = (set(enc) | set(txt)) & set(rec)
                        if clash:
                            raise ValueError(f"the record encoder returns {', '.join(sorted(clash))}, already returned by another encoder")
                        txt.update(rec)
                    for k, v in {**enc, **txt}.items():
                        parts.setdefault(k, []).append(v)
                    bar.update(len(idx))
                tensors = {k: torch.cat(v) for k, v in parts.items()}
                tensors["index"] = torch.arange(a, b, dtype=torch.long)
                atomic_write_bytes(_shard_path(folder, s), save(tensors, metadata={"key": key, "shard": str(s)}))
        finally:
            bar.close()
    return CachedDataset(folder, dataset)


class CachedDataset(_ItemsBase):
    """Items of a finished encoding cache: the cached tensors (``latents``, ``encoder_hidden_states`` or
    the encoders' own keys) plus ``caption``, ``base_caption``, ``target_text``, ``index``, ``extras``.
    Rows are read lazily from memory-mapped safetensors shards; with random_flip the flipped encoding
    is returned when :func:`flip_decision` says so."""

    def __init__(self, folder: str | os.PathLike, dataset: PortraitDataset):
        self.folder = Path(folder)
        meta_path = self.folder / CACHE_META
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            raise SpfbenchError(f"{self.folder} is not an encoding cache ({CACHE_META} missing or unreadable)") from None
        if self.meta.get("fingerprint") != dataset.fingerprint or self.meta.get("n") != len(dataset):
            raise SpfbenchError(f"encoding cache {self.folder} belongs to other data; rebuild it with cache_encodings")
        self.records = dataset.records
        self.random_flip = dataset.random_flip
        self.seed = dataset.seed
        self.epoch = dataset.epoch
        self.resolution = dataset.resolution
        self.format = dataset.format
        self.shard_size = int(self.meta["shard_size"])
        n_shards = (len(self.records) + self.shard_size - 1) // self.shard_size
        for s in range(n_shards):
            rows = min(len(self.records), (s + 1) * self.shard_size) - s * self.shard_size
            if not _shard_ok(_shard_path(self.folder, s), rows, self.meta["key"]):
                raise SpfbenchError(f"encoding cache {self.folder} is incomplete (shard {s}); run cache_encodings again")
        self._handles: dict[int, object] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles stay with their process
        return state

    def _handle(self, s: int):
        from safetensors import safe_open

        h = self._handles.get(s)
        if h is None:
            if len(self._handles) >= 16:
                self._handles.pop(next(iter(self._handles)))
            h = self._handles[s] = safe_open(str(_shard_path(self.folder, s)), framework="pt")
        return h

    def __getitem__(self, index) -> dict:
        index = self._check_index(index)
        s, j = divmod(index, self.shard_size)
        h = self._handle(s)
        flip = self.flipped(index)
        item = {}
        for k in h.keys():
            if k == "index" or k.endswith(".flipped"):
                continue
            src = f"{k}.flipped" if flip and f"{k}.flipped" in h.keys() else k
            item[k] = h.get_slice(src)[j : j + 1][0]
        item.update(self._strings(index))
        return item


__all__ = [
    "PortraitDataset",
    "PortraitRecord",
    "CachedDataset",
    "cache_encodings",
    "cache_key",
    "collate",
    "dataset_fingerprint",
    "describe_dataset",
    "detect_format",
    "flip_decision",
    "preprocess",
    "METADATA",
    "VALIDATE_IMAGES_MAX",
]
