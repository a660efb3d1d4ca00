"""Checks of a command's input that run before any model loads or anything is written (docs/errors.md).

Each check raises :class:`~spfbench.errors.SpfbenchError` with one line: what is wrong and what to do.
The command line prints it as ``error: ...`` and exits 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import SpfbenchError


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(path: Path, option: str) -> None:
    """``path`` does not exist: its nearest existing ancestor must be a writable folder."""
    anc = _nearest_existing(path)
    if not anc.is_dir():
        raise SpfbenchError(f"{option} {path} cannot be created: {anc} is a file, not a folder; give a path outside it")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise SpfbenchError(f"{option} {path} cannot be created: {anc} is not writable; give a path you can write to")


def output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """A folder a command will create or resume in: not a file, and creatable or writable."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise SpfbenchError(f"{option} {path} is a file; give a folder (a new one, or the one this command wrote before)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise SpfbenchError(f"{option} {path} is not writable; give a folder you can write to")
    else:
        _check_creatable(path, option)
    return path


def output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """A file a command will (over)write: not a folder, and its folder creatable or writable."""
    path = Path(path)
    if path.is_dir():
        raise SpfbenchError(f"{option} {path} is a folder; give a file name")
    if path.exists():
        if not os.access(path.parent if str(path.parent) else Path("."), os.W_OK | os.X_OK):
            raise SpfbenchError(f"{option} {path} cannot be replaced: its folder is not writable")
    else:
        _check_creatable(path, option)
    return path


def device(name: str | None, option: str = "--device", launcher: bool = False) -> None:
    """A device the command can use: None/auto (the library's choice), cpu, or an accelerator that is here.
    ``launcher``: the command's processes get their accelerator from accelerate (train, run), so only cpu or
    cuda can be asked for; a particular GPU is picked with CUDA_VISIBLE_DEVICES."""
    if name in (None, "auto"):
        return
    import torch

    if launcher and name not in ("cpu", "cuda"):
        raise SpfbenchError(f"{option} {name}: this command takes cpu or cuda (accelerate places its processes;"
                            " pick GPUs with CUDA_VISIBLE_DEVICES=N)")

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise SpfbenchError(f"{option} {name!r} is not a device ({str(e).splitlines()[0]}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SpfbenchError(f"{option} {name}: no CUDA device is available here; use {option} cpu, or leave it out")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SpfbenchError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 ...); pick one of them")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SpfbenchError(f"{option} {name}: MPS is not available here; use {option} cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise SpfbenchError(f"{option} {name}: devices of type {dev.type!r} are not supported; use cpu or cuda")


def read_json(path: str | os.PathLike, what: str) -> object:
    """JSON from ``path``; a missing, unreadable or corrupt file is one line naming ``what`` it should be."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpfbenchError(f"{path} does not exist; it should hold {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpfbenchError(f"{path} cannot be read ({getattr(e, 'strerror', None) or e}); it should hold {what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SpfbenchError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): a corrupt or"
                            f" half-written copy of {what}; restore it or rebuild it") from None
