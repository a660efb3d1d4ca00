"""Captions of the test set: the composer with its versioned vocabulary, the join, and caption files.

A triple is (base caption, target text, complete caption = join(base, target)). The base caption has
the paper's shape, "A woman, playing a guitar, with a red background, in a white T-shirt": subject,
action or pose, background or scene, clothing. The target text is one attribute ("a hat", "freckles",
"pencil drawing style") with a category (age, style, clothing, ...). Definitions: docs/testset.md.

Every random choice is ``sha256(f"{seed}/{index}/{slot}")`` modulo the number of options: it does not
depend on the Python or NumPy version, and triple i is the same whatever N is (prefix-stable).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import SpfbenchError
from .io import jsonl_objects

VOCAB_DIR = Path(__file__).parent / "vocab"
DEFAULT_VOCAB = "v1"
REQUIRED_COLUMNS = ("base_caption", "target_text")


@dataclass(frozen=True)
class CaptionRow:
    base_caption: str
    target_text: str
    category: str
    seed: int | None = None  # only when a caption file gives one
    id: str | None = None  # only when a caption file gives one


def join_caption(base_caption: str, target_text: str) -> str:
    """The complete caption: base text, then target text, separated by ", " (a final "." is dropped).

    The single definition used by the test set, the training data and every method's generation.
    """
    return f"{base_text(base_caption)}, {target_text.strip()}"


def base_text(base_caption: str) -> str:
    """The base caption as the complete caption holds it: trimmed, a final "." removed (as :func:`join_caption`)."""
    return base_caption.strip().rstrip(".").rstrip()


def phrase_spans(base_caption: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the comma-separated phrases in ``base_text(base_caption)``, each trimmed,
    empty parts dropped."""
    text = base_text(base_caption)
    spans, start = [], 0
    for part in text.split(","):
        end = start + len(part)
        lead = len(part) - len(part.lstrip())
        trail = len(part) - len(part.rstrip())
        if part.strip():
            spans.append((start + lead, end - trail))
        start = end + 1
    return spans


def split_base_phrases(base_caption: str) -> list[str]:
    """The phrases E_base[i] of a base caption: split on commas, trimmed, empty parts dropped, a final
    "." removed ("A woman, playing a guitar, with a red background, in a white T-shirt" -> 4 phrases)."""
    text = base_text(base_caption)
    return [text[s:e] for s, e in phrase_spans(base_caption)]


def _hash_int(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


def derive_seed(seed: int, index: int) -> int:
    """The generation seed of triple ``index`` in a test set built with ``--seed seed`` (31 bits)."""
    return _hash_int("spfbench-seed", seed, index) & 0x7FFFFFFF


def _pick(options: list, seed: int, index: int, slot: str):
    if not options:
        raise SpfbenchError(f"vocabulary slot {slot!r} has no option compatible with the other choices")
    return options[_hash_int("spfbench-caption", seed, index, slot) % len(options)]


@lru_cache(maxsize=None)
def _vocab_text(version: str) -> str:
    path = VOCAB_DIR / f"{version}.json"
    if not path.is_file():
        have = sorted(p.stem for p in VOCAB_DIR.glob("*.json"))
        raise SpfbenchError(f"unknown caption vocabulary {version!r}; available: {', '.join(have)}")
    return path.read_text()


def load_vocab(version: str = DEFAULT_VOCAB) -> dict:
    return json.loads(_vocab_text(version))


def vocab_sha256(version: str = DEFAULT_VOCAB) -> str:
    return hashlib.sha256(_vocab_text(version).encode()).hexdigest()


def categories(version: str = DEFAULT_VOCAB) -> list[str]:
    return list(load_vocab(version)["targets"])


def _compatible(tags: set[str], requires: list[str]) -> bool:
    for r in requires:
        if r.startswith("not:"):
            if r[4:] in tags:
                return False
        elif r not in tags:
            return False
    return True


def compose(n: int, seed: int = 0, version: str = DEFAULT_VOCAB) -> list[CaptionRow]:
    """``n`` (base caption, target text, category) rows.

    Categories go round-robin in vocabulary order (triple i gets category i mod C), so every prefix of
    the set is balanced across categories; the rest is drawn per triple among compatible options.
    """
    vocab = load_vocab(version)
    cats = list(vocab["targets"].items())
    rows = []
    for i in range(n):
        category, spec = cats[i % len(cats)]
        target = _pick(spec["texts"], seed, i, "target")
        subjects = [s for s in vocab["subjects"] if _compatible(set(s["tags"]), spec.get("requires", []))]
        subject = _pick(subjects, seed, i, "subject")
        tags = set(subject["tags"])
        garments = [
            g for g in vocab["clothing_garments"] if all(t in tags for t in vocab.get("garment_tags", {}).get(g, []))
        ]
        action = _pick(vocab["actions"], seed, i, "action")
        background = _pick(vocab["backgrounds"], seed, i, "background")
        color = _pick(vocab["clothing_colors"], seed, i, "color")
        garment = _pick(garments, seed, i, "garment")
        article = "an" if color[0] in "aeiou" else "a"
        base = f"{subject['text']}, {action}, {background}, in {article} {color} {garment}"
        rows.append(CaptionRow(base_caption=base, target_text=target, category=category))
    return rows


def _read_delimited(path: Path, text: str, delimiter: str) -> tuple[list[tuple[int, dict]], set]:
    """(line of each row, row) and the header's columns of a CSV/TSV text; a quote left open (which would
    swallow the rows after it into one field) is an error naming the line where the row began."""
    import io

    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    records, start = [], 1
    try:
        columns = set(reader.fieldnames or [])
        start = reader.line_num + 1
        for rec in reader:
            if None in rec or any(isinstance(v, str) and ("\n" in v or "\r" in v) for v in rec.values()):
                extra = " (more fields than the header)" if None in rec else " (a field spans several lines)"
                raise SpfbenchError(f"caption file {path}, row at line {start}: malformed{extra}; is a quote left open?"
                                    " Quote a field that holds a comma, and close every quote")
            records.append((reader.line_num, rec))  # a well-formed row is one line: the one just read
            start = reader.line_num + 1
    except csv.Error as e:
        raise SpfbenchError(f"caption file {path}, row at line {start}: {e}; is a quote left open?") from None
    return records, columns


def read_caption_file(path: str | Path) -> list[CaptionRow]:
    """Rows of a CSV or JSONL file with ``base_caption`` and ``target_text`` (optional: ``category``,
    ``seed``, ``id``). Every problem is reported with the file and row; nothing is skipped silently."""
    path = Path(path)
    if not path.is_file():
        raise SpfbenchError(f"caption file {path} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel's UTF-8 CSV) is not part of the header
    except (OSError, UnicodeDecodeError) as e:
        raise SpfbenchError(f"caption file {path} is unreadable: {e}") from None
    if path.suffix.lower() in {".jsonl", ".json", ".ndjson"}:
        records = list(jsonl_objects(text, f"caption file {path},"))
        columns = set().union(*(r.keys() for _, r in records)) if records else set()
    elif path.suffix.lower() in {".csv", ".tsv"}:
        records, columns = _read_delimited(path, text, "\t" if path.suffix.lower() == ".tsv" else ",")
    else:
        raise SpfbenchError(f"caption file {path}: use a .csv, .tsv or .jsonl file")
    if not records:
        raise SpfbenchError(f"caption file {path} holds no rows")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise SpfbenchError(
            f"caption file {path} lacks column(s) {', '.join(missing)}; it needs {', '.join(REQUIRED_COLUMNS)}"
            f" (found: {', '.join(sorted(columns)) or 'none'})"
        )
    rows, seen_ids = [], {}
    for lineno, rec in records:
        vals = {}
        for c in REQUIRED_COLUMNS:
            v = rec.get(c)
            if not isinstance(v, str) or not v.strip():
                raise SpfbenchError(f"caption file {path}, row at line {lineno}: {c} is empty or not text")
            vals[c] = v.strip()
        seed = rec.get("seed")
        if seed not in (None, ""):
            try:
                seed = int(seed)
            except (TypeError, ValueError):
                raise SpfbenchError(f"caption file {path}, line {lineno}: seed {seed!r} is not an integer") from None
            if not 0 <= seed < 2**63:
                raise SpfbenchError(f"caption file {path}, line {lineno}: seed {seed} is out of range")
        else:
            seed = None
        tid = rec.get("id")
        if tid not in (None, ""):
            tid = str(tid)
            if not all(ch.isalnum() or ch in "-_." for ch in tid) or tid.startswith("."):
                raise SpfbenchError(f"caption file {path}, line {lineno}: id {tid!r} must use letters, digits, '-', '_', '.'")
            if tid in seen_ids:
                raise SpfbenchError(f"caption file {path}: id {tid!r} appears on lines {seen_ids[tid]} and {lineno}")
            seen_ids[tid] = lineno
        else:
            tid = None
        category = str(rec.get("category") or "custom").strip() or "custom"
        rows.append(CaptionRow(vals["base_caption"], vals["target_text"], category, seed, tid))
    if seen_ids and len(seen_ids) != len(rows):
        raise SpfbenchError(f"caption file {path}: give an id on every row or on none")
    return rows
