"""``spfbench build-testset``: the (original caption, original portrait, target caption) triples.

Folder layout (format 1, docs/testset.md)::

    DIR/testset.json       format version, the spec that defines the set, model, generation
                           settings, status, triples_sha256 and (when complete) content_sha256
    DIR/testset.jsonl      one row per triple: id, index, base_caption, target_text,
                           target_caption, category, seed, original
    DIR/originals/ID.png   the original portrait of each triple, generated from the base caption
    DIR/originals.sha256   ``sha256sum -c`` compatible checksums, written when the set is complete

Work is cut into fixed batches (batch k = triples [kB, (k+1)B)); shard s of K takes batches k with
k mod K == s. An image is the output of exactly one batch computation, whatever was interrupted or
however the work was sharded, so a resumed or sharded build is byte-identical to a plain one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import queue
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .captions import (
    DEFAULT_VOCAB,
    CaptionRow,
    compose,
    derive_seed,
    join_caption,
    read_caption_file,
    vocab_sha256,
)
from .errors import SpfbenchError
from .generation import GenerationSettings, generate, model_scheduler_config
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, encode_png, remove_stale_tmp

FORMAT_VERSION = 1
META = "testset.json"
MANIFEST = "testset.jsonl"
ORIGINALS = "originals"
CHECKSUMS = "originals.sha256"
DEFAULT_N = 5000


@dataclass(frozen=True)
class Triple:
    id: str
    index: int
    base_caption: str
    target_text: str
    target_caption: str
    category: str
    seed: int
    original: str  # path relative to the test set folder

    def to_row(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    count: int

    @classmethod
    def parse(cls, text: str | None) -> "Shard":
        if text in (None, ""):
            return cls(0, 1)
        try:
            i, k = (int(x) for x in text.split("/"))
        except ValueError:
            raise SpfbenchError(f"--shard {text!r}: expected I/K with integers, e.g. 1/4") from None
        if k < 1 or not 1 <= i <= k:
            raise SpfbenchError(f"--shard {text!r}: need 1 <= I <= K (shards are numbered from 1)")
        return cls(i - 1, k)

    def split(self, rank: int, world: int) -> "Shard":
        """Subdivide this shard among ``world`` processes (accelerate launch)."""
        return Shard(self.index * world + rank, self.count * world)

    def __str__(self) -> str:
        return f"{self.index + 1}/{self.count}"


def plan_triples(n: int | None, seed: int, rows: list[CaptionRow] | None = None, vocab: str = DEFAULT_VOCAB) -> list[Triple]:
    """The triples of a test set: composed from the vocabulary, or taken from caption-file rows."""
    if rows is None:
        n = DEFAULT_N if n is None else n
        if n <= 0:
            raise SpfbenchError(f"--n must be positive, got {n}")
        rows = compose(n, seed, vocab)
    else:
        if n is not None and n <= 0:
            raise SpfbenchError(f"--n must be positive, got {n}")
        if n is not None and n > len(rows):
            raise SpfbenchError(f"--n {n} asked for, but the caption file holds only {len(rows)} rows")
        rows = rows[: n or len(rows)]
    width = max(5, len(str(len(rows) - 1)))
    triples = []
    for i, r in enumerate(rows):
        s = r.seed if r.seed is not None else derive_seed(seed, i)
        tid = r.id or f"{i:0{width}d}-" + hashlib.sha256(f"{r.base_caption}\x1f{r.target_text}\x1f{s}".encode()).hexdigest()[:8]
        triples.append(
            Triple(
                id=tid,
                index=i,
                base_caption=r.base_caption,
                target_text=r.target_text,
                target_caption=join_caption(r.base_caption, r.target_text),
                category=r.category,
                seed=s,
                original=f"{ORIGINALS}/{tid}.png",
            )
        )
    return triples


LONG_CAPTIONS = ("refuse", "truncate")


def caption_tokens(texts: list[str]) -> list[int]:
    """CLIP token counts (start and end tokens included) of ``texts``, untruncated: SD's text encoder reads
    the first :data:`~spfbench.clip_tokenizer.MAX_LENGTH` (77) and drops the rest."""
    from .clip_tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    uniq = sorted(set(texts))
    counts = dict(zip(uniq, (len(ids) for ids in tok(uniq, truncation=False).input_ids)))
    return [counts[t] for t in texts]


def check_caption_lengths(triples: list[Triple], policy: str = "refuse", warn=None) -> dict:
    """Token counts of the triples' captions against CLIP's 77. A target caption longer than that loses its
    end, the target text, before the model sees it (the customized image is the base text's), so by default
    such a triple is refused, naming it; ``policy="truncate"`` keeps it and ``warn``s once per triple.
    Returns the summary recorded in testset.json (``caption_tokens``)."""
    from .clip_tokenizer import MAX_LENGTH

    if policy not in LONG_CAPTIONS:
        raise SpfbenchError(f"--long-captions must be one of {', '.join(LONG_CAPTIONS)}, got {policy!r}")
    base = caption_tokens([t.base_caption for t in triples])
    target = caption_tokens([t.target_caption for t in triples])
    over = [(t, b, c) for t, b, c in zip(triples, base, target) if c > MAX_LENGTH]
    if over and policy == "refuse":
        t, b, c = over[0]
        more = f" (and {len(over) - 1} more)" if len(over) > 1 else ""
        raise SpfbenchError(f"triple {t.id}: its target caption is {c} CLIP tokens, over the text encoder's {MAX_LENGTH}, so the"
                            f" target text {t.target_text!r} would never reach the model{more}; shorten the base caption"
                            f" ({b} tokens), or pass --long-captions truncate to keep such triples")
    for t, b, c in over:
        if warn is not None:
            warn(f"warning: triple {t.id}: target caption of {c} CLIP tokens truncated to {MAX_LENGTH}"
                 f": the target text {t.target_text!r} is {'cut off entirely' if b >= MAX_LENGTH - 1 else 'cut short'}")
    return {"limit": MAX_LENGTH, "policy": policy, "base_max": max(base, default=0), "target_max": max(target, default=0),
            "truncated": [{"id": t.id, "base_tokens": b, "target_tokens": c} for t, b, c in over]}


def manifest_text(triples: list[Triple]) -> str:
    return "".join(json.dumps(t.to_row(), ensure_ascii=False) + "\n" for t in triples)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class BuildResult:
    out: Path
    n: int
    generated: int  # images written by this call
    present: int  # images present after this call
    complete: bool
    shard: Shard
    meta: dict = field(default_factory=dict)


class TestsetBuilder:
    """Builds (or resumes) one test set folder. Construct it to validate; nothing is written until run()."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        preset: str,
        n: int | None = None,
        seed: int = 0,
        captions: str | os.PathLike | None = None,
        vocab: str = DEFAULT_VOCAB,
        settings: GenerationSettings = GenerationSettings(),
        batch_size: int = 4,
        shard: Shard = Shard(0, 1),
        model: str | None = None,
        vae: str | None = None,
        revision: str | None = None,
        weights_seed: int = 0,
        device: str | None = None,
        dtype: str | None = None,
        long_captions: str = "refuse",
        warn=None,
    ):
        from .models import dtype_name, get_preset, resolve_device, resolve_dtype

        self.out = Path(out)
        self.preset = get_preset(preset)
        self.settings = settings.validate()
        if batch_size <= 0:
            raise SpfbenchError(f"--batch-size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.shard = shard
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        rows = read_caption_file(captions) if captions is not None else None
        self.triples = plan_triples(n, seed, rows, vocab)
        self.caption_tokens = check_caption_lengths(self.triples, long_captions, warn)
        # A local path is recorded absolute, so "./rv4" and "/abs/rv4" are the same set on resume.
        model, vae = (str(Path(x).resolve()) if x and Path(x).exists() else x for x in (model, vae))
        self.load_kwargs = dict(model=model, vae=vae, revision=revision, seed=weights_seed)
        captions_spec = {"sha256": sha256_file(Path(captions))} if captions is not None else None
        self.spec = {
            "format_version": FORMAT_VERSION,
            "n": len(self.triples),
            "seed": seed,
            "captions": captions_spec,
            "vocab": None if captions is not None else {"version": vocab, "sha256": vocab_sha256(vocab)},
            "preset": preset,
            "model": model,
            "vae": vae,
            "revision": revision,
            "weights_seed": weights_seed if self.preset.config else None,
            "generation": settings.to_dict(),
            "batch_size": batch_size,
            "dtype": dtype_name(self.dtype),
            "device_type": self.device.type,
        }
        if long_captions != "refuse":  # (recorded only when not the default: earlier sets stay resumable)
            self.spec["long_captions"] = long_captions
        self.manifest = manifest_text(self.triples)

    # ------------------------------------------------------------------ folder checks

    def _check_folder(self) -> dict | None:
        """Validate DIR against this spec before anything is written. Returns the existing meta, if any."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise SpfbenchError(f"--out {out} exists and is not a folder")
        meta_path = out / META
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                old = meta["spec"]
            except (OSError, ValueError, KeyError, TypeError):
                raise SpfbenchError(f"{meta_path} is unreadable or not a spfbench test set; use another --out") from None
            if old != self.spec and self._never_started(meta):
                return None  # an attempt that failed before its model loaded commits to nothing: replaced
            if old != self.spec:
                diffs = [k for k in sorted(set(old) | set(self.spec)) if old.get(k) != self.spec.get(k)]
                detail = "; ".join(f"{k}: {old.get(k)!r} there, {self.spec.get(k)!r} now" for k in diffs[:4])
                hint = "use another --out, or the same arguments to resume"
                was = (old.get("generation") or {}).get("sampler")
                if diffs == ["generation"] and self.spec["generation"]["sampler"] is None and was and \
                        {**old["generation"], "sampler": None} == self.spec["generation"]:
                    hint = (f"it was built with --sampler {was} (named, or the default before no --sampler came to mean"
                            f" the model's own); pass --sampler {was} to resume it, or use another --out")
                raise SpfbenchError(f"{out} holds a different test set ({detail}); {hint}")
            return meta
        # Hidden entries are ignored: another shard's temporary file may already be there.
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise SpfbenchError(f"--out {out} is not empty and holds no {META}; use an empty or new folder")
        return None

    def _never_started(self, meta: dict) -> bool:
        """Whether the folder's test set never got a model (``model`` unset) nor any original image."""
        originals = self.out / ORIGINALS
        return meta.get("model") is None and not (originals.is_dir() and any(p.suffix == ".png" for p in originals.iterdir()))

    def _unprepare(self) -> None:
        """Undo :meth:`_prepare` after an attempt that failed before producing anything (e.g. missing weights):
        the folder is left as if the command never ran, so the corrected command is not refused."""
        originals = self.out / ORIGINALS
        if originals.is_dir() and not any(originals.iterdir()):
            originals.rmdir()
        for name in (META, MANIFEST):
            (self.out / name).unlink(missing_ok=True)
        if self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def _prepare(self, existing: dict | None) -> None:
        """Create the folder. testset.json is the first entry to appear (atomically), so a shard starting
        at the same moment sees either an empty folder or this spec, never a half-made folder."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            if existing is None:
                atomic_write_json(self.out / META, self._initial_meta())
            (self.out / ORIGINALS).mkdir(exist_ok=True)
            manifest_path = self.out / MANIFEST
            if not manifest_path.is_file() or manifest_path.read_text() != self.manifest:
                atomic_write_text(manifest_path, self.manifest)
        except OSError as e:
            raise SpfbenchError(f"cannot write to --out {self.out}: {e.strerror or e}") from None

    # ------------------------------------------------------------------ state

    def image_path(self, t: Triple) -> Path:
        return self.out / t.original

    def batches(self) -> list[list[Triple]]:
        b = self.batch_size
        return [self.triples[i : i + b] for i in range(0, len(self.triples), b)]

    def my_batches(self) -> list[list[Triple]]:
        return [batch for k, batch in enumerate(self.batches()) if k % self.shard.count == self.shard.index]

    def present(self) -> int:
        return sum(self.image_path(t).is_file() for t in self.triples)

    # ------------------------------------------------------------------ run

    def run(self, progress: bool = True, pipeline=None) -> BuildResult:
        """Build or resume. ``pipeline``: an already loaded ``(pipe, ModelInfo)`` of this spec's model, to
        skip loading (the caller vouches that it is the model the spec names)."""
        self._prepare(self._check_folder())
        remove_stale_tmp(self.out)
        remove_stale_tmp(self.out / ORIGINALS)

        todo = [batch for batch in self.my_batches() if not all(self.image_path(t).is_file() for t in batch)]
        generated = 0
        if todo:
            try:
                generated = self._generate(todo, progress, pipeline)
            except SpfbenchError:
                # (one shard only: another may be at work in the folder)
                if self.shard.count == 1 and self._never_started(json.loads((self.out / META).read_text())):
                    self._unprepare()
                raise
        present = self.present()
        complete = present == len(self.triples)
        if complete:
            meta = self.finalize()
        else:
            meta = json.loads((self.out / META).read_text())
        return BuildResult(self.out, len(self.triples), generated, present, complete, self.shard, meta)

    def _initial_meta(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "status": "incomplete",
            "n": len(self.triples),
            "spec": self.spec,
            "model": None,
            "generation": None,
            "categories": dict(sorted(Counter(t.category for t in self.triples).items())),
            "files": {"manifest": MANIFEST, "originals": ORIGINALS + "/", "checksums": CHECKSUMS},
            "triples_sha256": hashlib.sha256(self.manifest.encode()).hexdigest(),
            "caption_tokens": self.caption_tokens,
            "content_sha256": None,
            "environment": None,
        }

    def _generate(self, todo: list[list[Triple]], progress: bool, pipeline=None) -> int:
        from tqdm.auto import tqdm

        from .models import load_pipeline

        if pipeline is None:
            pipeline = load_pipeline(self.preset.name, device=self.device, dtype=self.dtype, **self.load_kwargs)
        pipe, info = pipeline
        resolved = self.settings.resolved(info.native_size, model_scheduler_config(pipe))
        self._record_model(info, resolved)

        mine = [t for batch in self.my_batches() for t in batch]
        done_before = sum(self.image_path(t).is_file() for t in mine)
        writer = _ImageWriter()
        written = 0
        bar = tqdm(total=len(mine), initial=done_before, desc=f"originals (shard {self.shard})", unit="img", disable=not progress)
        try:
            for batch in todo:
                images = generate(pipe, [t.base_caption for t in batch], [t.seed for t in batch], resolved)
                for t, img in zip(batch, images):
                    path = self.image_path(t)
                    if not path.is_file():  # a finished image is never rewritten
                        writer.put(path, img)
                        written += 1
                        bar.update(1)
        finally:
            writer.close()
            bar.close()
        return written

    def _record_model(self, info, resolved: GenerationSettings) -> None:
        meta = json.loads((self.out / META).read_text())
        if meta.get("generation") not in (None, resolved.to_dict()):
            raise SpfbenchError(f"{self.out}'s originals so far were made with {meta['generation']}, but this model resolves"
                                f" the same arguments to {resolved.to_dict()} (its scheduler config changed?): finish the"
                                " set with the model that began it, or use another --out")
        meta["model"] = info.to_dict()
        meta["generation"] = resolved.to_dict()
        meta["environment"] = environment(self.device)
        atomic_write_json(self.out / META, meta)

    def finalize(self) -> dict:
        """Write checksums and the content hash once every image exists (idempotent, any shard may do it)."""
        lines = "".join(f"{sha256_file(self.image_path(t))}  {t.original}\n" for t in self.triples)
        if not (self.out / CHECKSUMS).is_file() or (self.out / CHECKSUMS).read_text() != lines:
            atomic_write_text(self.out / CHECKSUMS, lines)
        meta = json.loads((self.out / META).read_text())
        meta["status"] = "complete"
        meta["content_sha256"] = hashlib.sha256((self.manifest + lines).encode()).hexdigest()
        atomic_write_json(self.out / META, meta)
        remove_stale_tmp(self.out / ORIGINALS)
        return meta


class _ImageWriter:
    """Encodes and writes PNGs on a background thread, so the next batch computes meanwhile."""

    def __init__(self, max_pending: int = 64):
        self.q: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    path, img = item
                    atomic_write_bytes(path, encode_png(img))
                except BaseException as e:  # reported on the main thread
                    self.error = e

    def put(self, path: Path, img) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((path, img))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def environment(device) -> dict:
    import diffusers
    import torch
    import transformers

    env = {
        "spfbench": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": str(getattr(device, "type", device)),
    }
    if getattr(device, "type", None) == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:  # CPU results depend on the intra-op thread count in the last bits (reduction order)
        env["cpu_threads"] = torch.get_num_threads()
    return env


def load_testset(folder: str | os.PathLike) -> tuple[dict, list[Triple]]:
    """Read a test set folder (meta, triples). Later steps (methods, scoring) start from here."""
    folder = Path(folder)
    meta_path, manifest_path = folder / META, folder / MANIFEST
    if not meta_path.is_file() or not manifest_path.is_file():
        raise SpfbenchError(f"{folder} is not a test set folder ({META} and {MANIFEST} expected)")
    from .validate import read_json

    meta = read_json(meta_path, "a test set's description (build-testset writes it)")
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise SpfbenchError(f"{folder}: test set format {got} is not supported (expected {FORMAT_VERSION})")
    triples = []
    for k, line in enumerate(manifest_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            triples.append(Triple(**json.loads(line)))
        except (ValueError, TypeError):
            raise SpfbenchError(f"{manifest_path}, line {k}: not a triple row (corrupt or edited by hand); rebuild the test set"
                                " with its build-testset command into a new --out") from None
    return meta, triples
