"""Atomic file writes: a reader sees either the old file, no file, or the whole new file.

Temporary files are named ``.<name>.<host>.<pid>.tmp`` in the target's folder, so a killed process
leaves nothing that looks like an output, and :func:`remove_stale_tmp` can tell its leftovers from
the files of a process still writing (possibly another shard of the same job).
"""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

_HOST = socket.gethostname().replace(".", "_")


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_once(data: bytes, folder: str | os.PathLike, stem: str, suffix: str) -> Path:
    """``data`` as ``FOLDER/STEM-<sha256[:12]>SUFFIX``: written atomically the first time, reused after (the
    name changes with the content, so a stale file is never read)."""
    import hashlib

    path = Path(folder) / f"{stem}-{hashlib.sha256(data).hexdigest()[:12]}{suffix}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def encode_png(image) -> bytes:
    """PNG bytes of a PIL image, with no metadata (so equal pixels give equal bytes)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def remove_stale_tmp(folder: str | os.PathLike) -> int:
    """Delete temporary files in ``folder`` left by dead processes of this host. Returns how many."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.glob(".*.tmp"):
        parts = p.name[:-4].rsplit(".", 2)  # ".name", host, pid
        if len(parts) != 3 or parts[1] != _HOST or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        if pid != os.getpid() and _pid_alive(pid):
            continue
        try:
            p.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_json_object(path: str | os.PathLike, what: str = "config file") -> dict:
    """A JSON file that must hold an object; a missing file or bad JSON is one clear error."""
    from .errors import SpfbenchError

    path = Path(path)
    if not path.is_file():
        raise SpfbenchError(f"{what} {path} does not exist")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpfbenchError(f"{what} {path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(values, dict):
        raise SpfbenchError(f"{what} {path} must hold a JSON object")
    return values


def jsonl_objects(text: str, where: str):
    """``(line number, object)`` of every non-blank line of a JSONL text; a line that is not valid JSON or not an
    object is one clear error naming ``where`` and the line."""
    from .errors import SpfbenchError

    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpfbenchError(f"{where} line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise SpfbenchError(f"{where} line {lineno}: expected a JSON object per line")
        yield lineno, rec


def check_output_folder(out: Path, spec_file: str, spec: dict, what: str, option: str = "--out") -> None:
    """``out`` is new, empty, or holds this same ``spec`` (then the writer resumes); anything else is refused
    before a file is touched."""
    from .errors import SpfbenchError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpfbenchError(f"{option} {out} exists and is not a folder")
    spec_path = out / spec_file
    if spec_path.is_file():
        try:
            old = json.loads(spec_path.read_text())
        except (OSError, ValueError):
            raise SpfbenchError(f"{spec_path} is unreadable; use another {option}") from None
        if old != spec:
            diffs = [k for k in spec if old.get(k) != spec[k]]
            detail = "; ".join(f"{k}: {old.get(k)!r} there, {spec[k]!r} now" for k in diffs[:3])
            raise SpfbenchError(f"{out} holds a different {what} ({detail}); use another {option} or the same arguments")
    elif out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise SpfbenchError(f"{option} {out} is not empty and holds no {spec_file}; use an empty or new folder")


def write_image_set(out: Path, spec_file: str, spec: dict, rows: list[dict], draw, what: str, option: str = "--out") -> int:
    """Write an imagefolder set resumably: ``spec_file``, one PNG per row (``row["file_name"]``, drawn by
    ``draw(index, row)`` only when missing) and ``metadata.jsonl`` (the rows). Returns the images written now.
    Another set in ``out`` is refused before anything is touched (:func:`check_output_folder`)."""
    from .errors import SpfbenchError

    out = Path(out)
    check_output_folder(out, spec_file, spec, what, option=option)
    metadata = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / spec_file).is_file():
            atomic_write_json(out / spec_file, spec)
        folders = sorted({(out / r["file_name"]).parent for r in rows})
        remove_stale_tmp(out)
        written = 0
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            if folder != out:
                remove_stale_tmp(folder)
        for i, r in enumerate(rows):
            path = out / r["file_name"]
            if not path.is_file():
                atomic_write_bytes(path, encode_png(draw(i, r)))
                written += 1
        meta_path = out / "metadata.jsonl"
        if not meta_path.is_file() or meta_path.read_text(encoding="utf-8") != metadata:
            atomic_write_text(meta_path, metadata)
    except OSError as e:
        raise SpfbenchError(f"cannot write to {option} {out}: {e.strerror or e}") from None
    return written
