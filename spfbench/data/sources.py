"""The format readers: imagefolder, HF datasets folder, Hub names (``hf:``) and WebDataset shards, each validated
into records and raw image bytes (docs/data.md "Formats", "Validation")."""

from __future__ import annotations

import glob as _glob
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..captions import REQUIRED_COLUMNS
from ..errors import SpfbenchError
from ..io import jsonl_objects
from .records import ATTN_LIST, HF_IMAGE, HUB_PREFIX, IMAGE_EXTENSIONS, METADATA, PortraitRecord, check_extras, required_captions

# ---------------------------------------------------------------------------------------------- sources


class Source:
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
        masks = tuple(file_stat(p) for i in range(len(self.records)) for p in self.mask_paths(i))
        return (self.format, self.files_signature(), masks)

    def mask_paths(self, i: int) -> list[Path]:
        attn = self.records[i].extras.get(ATTN_LIST) or []
        return [self.root / p[1] for p in attn if p[1] is not None]

    def check_masks(self) -> None:
        for i, r in enumerate(self.records):
            for p in self.mask_paths(i):
                if not p.is_file():
                    raise SpfbenchError(f"{r.where}: {ATTN_LIST} mask {p} does not exist")


def file_stat(p: Path) -> tuple:
    try:
        s = p.stat()
    except OSError:
        return (str(p), None)
    return (str(p), s.st_size, s.st_mtime_ns)


class ImageFolder(Source):
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
        for lineno, rec in jsonl_objects(text, str(meta)):
            at = f"{meta} line {lineno}"
            name = rec.get("file_name")
            if not isinstance(name, str) or not name.strip():
                raise SpfbenchError(f"{at}: file_name is missing or empty; every row needs file_name, {', '.join(REQUIRED_COLUMNS)}")
            where = f"{at} ({name})"
            base, target = required_captions(rec, where)
            norm = os.path.normpath(name)
            if norm in seen:
                raise SpfbenchError(f"{meta}: file_name {name!r} appears on lines {seen[norm]} and {lineno}")
            seen[norm] = lineno
            path = root / name
            if not path.is_file():
                raise SpfbenchError(f"{at}: image file {path} does not exist")
            extras = {k: v for k, v in rec.items() if k not in ("file_name", *REQUIRED_COLUMNS)}
            check_extras(extras, where)
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
        return (file_stat(self.root / METADATA), tuple(file_stat(p) for p in self.files))


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


class _HFDisk(Source):
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
        for c in (HF_IMAGE, *REQUIRED_COLUMNS):
            if c not in cols:
                raise SpfbenchError(
                    f"HF dataset {root} lacks column {c}; it needs {HF_IMAGE}, {', '.join(REQUIRED_COLUMNS)} (found: {', '.join(cols)})"
                )
        if not isinstance(ds.features[HF_IMAGE], datasets.Image):
            raise SpfbenchError(
                f"HF dataset {root}: column {HF_IMAGE} is {type(ds.features[HF_IMAGE]).__name__}, not an Image feature "
                f"(use .cast_column('{HF_IMAGE}', datasets.Image()) before save_to_disk)"
            )
        extra_cols = [c for c in cols if c not in (HF_IMAGE, *REQUIRED_COLUMNS)]
        for c in extra_cols:
            if type(ds.features[c]).__name__ in ("Image", "Audio", "Video", "Pdf"):
                raise SpfbenchError(f"HF dataset {root}: extra column {c} is a {type(ds.features[c]).__name__} feature; extras must be JSON values (store mask paths)")
        rows = ds.select_columns([*REQUIRED_COLUMNS, *extra_cols]).to_list()
        if not rows:
            raise SpfbenchError(f"HF dataset {root} holds no rows")
        self.records = []
        for i, rec in enumerate(rows):
            at = f"HF dataset {root} item {i}"
            base, target = required_captions(rec, at)
            extras = {k: rec[k] for k in extra_cols}
            check_extras(extras, at)
            self.records.append(PortraitRecord(i, base, target, extras, at))
        # Images as stored bytes (decoded here, by PIL, exactly like the other formats).
        self.images = ds.select_columns([HF_IMAGE]).cast_column(HF_IMAGE, datasets.Image(decode=False))
        table = self.images.with_format("arrow")[: len(self.images)]
        col = table.column(HF_IMAGE)
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
        return self.images[i][HF_IMAGE]["bytes"]

    def image_name(self, i: int) -> str:
        return f"{self.label} item {i}"

    def files_signature(self) -> tuple:
        return (tuple(file_stat(p) for p in self.signature_files), tuple(file_stat(p) for p in self.external.values()))


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


class _WebDataset(Source):
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
                base, target = required_captions(rec, at)
                extras = {k: v for k, v in rec.items() if k not in REQUIRED_COLUMNS}
                check_extras(extras, at)
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
        return tuple(file_stat(p) for p in _wds_shards(self.path_text)[0])


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


def open_source(path: str | os.PathLike) -> Source:
    fmt = detect_format(path)
    if fmt == "imagefolder":
        src: Source = ImageFolder(Path(path))
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


