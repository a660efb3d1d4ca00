"""``spfbench score``: Table 1 metrics of a folder of customized images against a test set.

Folder contract: the customized image of triple ``ID`` is ``IMAGES/ID.png`` (``.jpg``, ``.jpeg`` and
``.webp`` are accepted too). Output folder::

    OUT/score.json      what was scored (test set hash, images folder, metric ids, preset, dtype), status
    OUT/state.pt        checkpoint of every metric's mergeable state (written atomically, resumable)
    OUT/samples.jsonl   one row per triple: id, category, target text, each metric's value (null when
                        the triple could not be scored) and the reason for every null
    OUT/summary.json    one entry per metric: value, n, failures (and metric extras such as ID's
                        detection rate or FID's n_real), plus counts of missing and unreadable images
    OUT/timings.json    seconds per metric and part (load: backbones and cache keys; reference: FID's
                        statistics of the originals; originals: the pairwise metrics' features of the
                        originals, read or computed; pairs: the rest), one entry per attempt with the
                        triples it scored and its peak memory (``spfbench plan`` reads it)

A triple whose customized image is missing or unreadable is recorded as a failure of every metric; the
run goes on. Killed runs resume from the last checkpoint.

What depends on the originals alone is computed once per test set and reused by every method and rerun,
in the test set folder (docs/metrics.md, "Originals' feature cache")::

    TESTSET/cache/<fid id>.<preset>.<key>.pt      FID's reference statistics (n, sums), key = content hash,
                                                  metric, preset, triple ids; written by the main process
    TESTSET/cache/originals/<metric id>.<preset>.<key16>/<triple id>.safetensors
                                                  each pairwise metric's features of one original
                                                  (``PairwiseMetric.original_features``; LPIPS, ID, CLIP-I,
                                                  Seg-Cons, GT-Preserve), key = content hash, metric, its
                                                  feature spec, preset, device type and the sha256 of
                                                  the backbones' tensors as loaded and cast (spfbench/originals_cache.py)

Each process reads the entries of its own triples, computes the missing ones in the batch they arrive in
and writes each whole, atomically (temporary file + rename), so concurrent shards or scorings never leave
a torn entry; an unreadable or mismatched entry is recomputed; a read-only test set is not cached.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .errors import SpfbenchError
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .metrics import DEFAULT_METRICS, Backbones, Batch, Metric, PairwiseMetric, check_ids, create
from .originals_cache import OriginalsCache
from .testset import Triple, load_testset

FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def default_metrics(environment: str) -> list[str]:
    """The metrics an environment scores when none are given (Table 1's eight; Portrait World adds its two
    ground-truth metrics): spfbench.environments."""
    from .environments import get

    return get(environment).default_metrics()


def read_image(path: Path) -> Image.Image:
    """Fully decode an image as RGB; a truncated or corrupt file raises ``OSError``/``ValueError``."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def find_images(folder: Path, ids: list[str]) -> tuple[dict[str, Path], list[str]]:
    """Map triple id -> image file in ``folder``; also return the names of files matching no triple."""
    if not folder.is_dir():
        raise SpfbenchError(f"images folder {folder} does not exist")
    wanted = set(ids)
    found: dict[str, Path] = {}
    stray = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.stem not in wanted:
            stray.append(p.name)
        elif p.stem in found:
            raise SpfbenchError(f"two images for triple {p.stem} in {folder}: {found[p.stem].name} and {p.name}; keep one")
        else:
            found[p.stem] = p
    if not found:
        example = ids[0] if ids else "ID"
        raise SpfbenchError(
            f"no image in {folder} is named by a triple id of the test set (expected e.g. {example}.png);"
            f" {len(stray)} other image files found"
        )
    return found, stray


def text_sha256(data: str) -> str:
    return hashlib.sha256(data.encode()).hexdigest()


@dataclass
class Scorer:
    testset: Path
    images: Path
    out: Path
    metric_ids: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    preset: str = "real"
    device: str | None = None
    dtype: str = "fp32"
    batch_size: int = 16
    limit: int | None = None
    weights: dict[str, str] = field(default_factory=dict)
    checkpoint_seconds: float = 120.0
    backbones: Backbones | None = None  # shared, already loaded models (spfbench run scores every method with one set)
    cache_originals: bool = True  # read and write the originals' features in TESTSET/cache/originals (False: compute them)
    cache_dir: Path | None = None  # where the originals' statistics and features are cached (None: TESTSET/cache)

    def __post_init__(self):
        self.testset, self.images, self.out = Path(self.testset), Path(self.images), Path(self.out)
        check_ids(self.metric_ids)
        if self.batch_size < 1:
            raise SpfbenchError("--batch-size must be at least 1")
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if self.dtype not in dtypes:
            raise SpfbenchError(f"unknown dtype {self.dtype!r}; use fp32, fp16 or bf16")
        from . import validate

        validate.output_folder(self.out)
        validate.device(self.device)
        self.meta, triples = load_testset(self.testset)
        if self.meta.get("status") != "complete":
            raise SpfbenchError(f"test set {self.testset} is not complete: finish it with the same build-testset command first")
        if self.limit is not None:
            if self.limit < 1:
                raise SpfbenchError("--limit must be at least 1")
            triples = triples[: self.limit]
        self.triples: list[Triple] = triples
        find_images(self.images, [t.id for t in self.triples])  # a wrong --images fails here, before anything is written
        if self.backbones is None:
            self.backbones = Backbones(self.preset, self.device, dtypes[self.dtype], weights=self.weights)
        elif self.backbones.environment != self.preset:
            raise SpfbenchError(f"shared backbones are of environment {self.backbones.environment!r}, the scoring asks for {self.preset!r}")
        self.metrics: dict[str, Metric] = {m: create(m, self.backbones) for m in self.metric_ids}

    # -- the spec of this scoring: a rerun with the same spec resumes, a different one is refused
    def spec(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "testset": str(self.testset.resolve()),
            "testset_content_sha256": self.meta["content_sha256"],
            "images": str(self.images.resolve()),
            "metrics": list(self.metric_ids),
            "preset": self.preset,
            "dtype": self.dtype,
            "triples": len(self.triples),
            "triples_sha256": text_sha256("\n".join(t.id for t in self.triples)),
        }

    def _open(self) -> None:
        """Create OUT or check that it holds this same scoring."""
        self.out.mkdir(parents=True, exist_ok=True)
        spec_path = self.out / "score.json"
        if spec_path.is_file():
            old = json.loads(spec_path.read_text()).get("spec")
            if old != self.spec() and not self._scored_anything():  # an attempt that scored nothing commits to nothing
                old = self.spec()
                atomic_write_json(spec_path, {"spec": self.spec(), "status": "running"})
            if old != self.spec():
                diff = sorted(k for k in self.spec() if (old or {}).get(k) != self.spec()[k])
                raise SpfbenchError(
                    f"{self.out} holds a scoring with a different {', '.join(diff)}; use another --out (nothing was changed)"
                )
        else:
            atomic_write_json(spec_path, {"spec": self.spec(), "status": "running"})

    def _scored_anything(self) -> bool:
        """Whether OUT holds any scored triple (in ``state.pt`` or a process's part file)."""
        for path in [self.out / "state.pt", *sorted(self.out.glob("state.part-*.pt"))]:
            if path.is_file() and torch.load(path, map_location="cpu", weights_only=True).get("done"):
                return True
        return (self.out / "summary.json").is_file()

    def _state(self, done: list[str], inputs: dict) -> dict:
        return {"done": done, "inputs": inputs, "metrics": {k: m.state() for k, m in self.metrics.items()}}

    def _write_state(self, path: Path, state: dict) -> None:
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(path, buf.getvalue())

    def _consolidate(self) -> tuple[list[str], dict]:
        """Merge ``state.pt`` and every process's ``state.part-R.pt`` into the metrics (reset first) and
        into one ``state.pt``; the part files go. Parts hold disjoint triples, so a resumed run may use any
        number of processes."""
        done: list[str] = []
        inputs: dict[str, str] = {}
        for m in self.metrics.values():
            m.reset()
        paths = [self.out / "state.pt"] + sorted(self.out.glob("state.part-*.pt"))
        for path in paths:
            if not path.is_file():
                continue
            st = torch.load(path, map_location="cpu", weights_only=True)
            seen = set(done)
            done.extend(t for t in st["done"] if t not in seen)
            inputs.update(st["inputs"])
            for k, m in self.metrics.items():
                if k in st["metrics"]:
                    m.merge(st["metrics"][k])
        self._write_state(self.out / "state.pt", self._state(done, inputs))
        for path in paths[1:]:
            path.unlink(missing_ok=True)
        return done, inputs

    # -- cached statistics of the originals alone (FID's "real" side), one file per (metric, preset, triples)
    def _reference(self, metric: Metric, progress: bool) -> None:
        key = text_sha256(f"{self.meta['content_sha256']}|{metric.id}|{self.preset}|{self.spec()['triples_sha256']}")[:16]
        path = self._cache_root() / f"{metric.id}.{self.preset}.{key}.pt"
        if path.is_file():
            metric.set_reference(torch.load(path, map_location="cpu", weights_only=True))
            return
        from tqdm.auto import tqdm

        for chunk in tqdm(_chunks(self.triples, self.batch_size), desc=f"{metric.id} reference", disable=not progress,
                          total=-(-len(self.triples) // self.batch_size)):
            metric.update_reference([t.id for t in chunk], [read_image(self.testset / t.original) for t in chunk])
        import io

        buf = io.BytesIO()
        torch.save(metric.reference_state(), buf)
        try:
            path.parent.mkdir(exist_ok=True)
            atomic_write_bytes(path, buf.getvalue())
        except OSError:  # a read-only test set: the statistics are simply not cached
            pass

    def _cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else self.testset / "cache"

    def run(self, progress: bool = True) -> dict:
        """Score (or resume). Under ``accelerate launch`` every process scores its share of the triples not
        yet done and keeps its own ``state.part-R.pt``; the main process then merges the gathered metric
        states (FID from the summed feature statistics) and writes the outputs."""
        from accelerate import PartialState
        from tqdm.auto import tqdm

        ps = PartialState()
        rank, world, main = ps.process_index, ps.num_processes, ps.is_main_process
        if main:
            self._open()
            self._consolidate()
        ps.wait_for_everyone()
        saved = torch.load(self.out / "state.pt", map_location="cpu", weights_only=True)
        for m in self.metrics.values():
            m.reset()
        found, stray = find_images(self.images, [t.id for t in self.triples])
        clock = StageClock(self.metrics)
        references = [m for m in self.metrics.values() if m.has_reference]
        if main:  # the main process computes (or loads) the cached reference first; the others then load it
            for m in references:
                with clock(m.id, "reference"):
                    self._reference(m, progress)
        ps.wait_for_everyone()
        if not main:
            for m in references:
                with clock(m.id, "reference"):
                    self._reference(m, False)

        self.caches: dict[str, OriginalsCache] = {}
        if self.cache_originals:
            for k, m in self.metrics.items():
                if isinstance(m, PairwiseMetric):
                    with clock(k, "load"):  # the cache key fingerprints the backbones: they load here
                        self.caches[k] = OriginalsCache(self.testset, self.meta["content_sha256"], m, root=self.cache_dir)

        finished = set(saved["done"])
        todo = [t for t in self.triples if t.id not in finished][rank::world]
        done: list[str] = []
        inputs: dict[str, str] = {}  # triple id -> why its customized image is unusable
        part = self.out / f"state.part-{rank}.pt"
        last_save = time.monotonic()
        bar = tqdm(total=len(self.triples), initial=len(finished), desc="scoring", unit="triple", disable=not (progress and main))
        for chunk in _chunks(todo, self.batch_size):
            usable = []
            for t in chunk:
                reason = None
                if t.id not in found:
                    reason = f"no customized image (expected {self.images / (t.id + '.png')})"
                else:
                    try:
                        customized = read_image(found[t.id])
                    except (OSError, ValueError, Image.DecompressionBombError) as e:
                        reason = f"unreadable customized image {found[t.id].name}: {e}"
                if reason:
                    inputs[t.id] = reason
                    for m in self.metrics.values():
                        m.record_failure(t.id, reason)
                else:
                    usable.append((t, customized))
            if usable:
                batch = Batch(
                    ids=[t.id for t, _ in usable],
                    originals=[read_image(self.testset / t.original) for t, _ in usable],
                    customized=[im for _, im in usable],
                    target_texts=[t.target_text for t, _ in usable],
                    prompts=[t.target_caption for t, _ in usable],
                )
                batch.original_features = {}
                for k, c in self.caches.items():
                    with clock(k, "originals"):
                        batch.original_features[k] = c.get(batch.ids, batch.originals)
                for k, m in self.metrics.items():
                    with clock(k, "pairs"):
                        m.update(batch)
            done.extend(t.id for t in chunk)
            bar.update(len(chunk) * world)
            if time.monotonic() - last_save > self.checkpoint_seconds:
                self._write_state(part, self._state(done, inputs))
                last_save = time.monotonic()
        bar.close()
        self._write_state(part, self._state(done, inputs))
        if main:
            clock.record(self.out / "timings.json", triples=len(done) * world, processes=world)
        ps.wait_for_everyone()
        summary = None
        if main:
            _, inputs = self._consolidate()
            summary = self._write_outputs(inputs, stray)
        ps.wait_for_everyone()
        return summary if summary is not None else json.loads((self.out / "summary.json").read_text())

    def _write_outputs(self, inputs: dict, stray: list[str]) -> dict:
        per_sample = {k: m for k, m in self.metrics.items() if m.per_sample}
        lines = []
        for t in self.triples:
            row = {"id": t.id, "category": t.category, "target_text": t.target_text}
            errors = {}
            for k, m in per_sample.items():
                row[k] = m.values.get(t.id)
                if row[k] is None and t.id in m.reasons:
                    errors[k] = m.reasons[t.id]
            if t.id in inputs:
                errors = {"input": inputs[t.id]}
            row["errors"] = errors
            lines.append(json.dumps(row, ensure_ascii=False))
        atomic_write_text(self.out / "samples.jsonl", "\n".join(lines) + "\n")
        missing = sum(r.startswith("no customized image") for r in inputs.values())
        summary = {
            "testset": str(self.testset),
            "testset_content_sha256": self.meta["content_sha256"],
            "images": str(self.images),
            "preset": self.preset,
            "triples": len(self.triples),
            "missing_images": missing,
            "unreadable_images": len(inputs) - missing,
            "unmatched_files": len(stray),
            "unmatched_examples": stray[:5],
            "metrics": {k: m.compute() for k, m in self.metrics.items()},
        }
        atomic_write_json(self.out / "summary.json", summary)
        atomic_write_json(self.out / "score.json", {"spec": self.spec(), "status": "complete"})
        return summary


class StageClock:
    """Seconds per (metric id, part) of one scoring attempt, and the attempt's peak memory; ``record``
    appends the attempt to ``timings.json``. On CUDA each timed block ends with a synchronize so the
    seconds are the work's, not the launch's."""

    def __init__(self, metrics):
        self.seconds: dict[str, dict[str, float]] = {k: {} for k in metrics}
        self.cuda = torch.cuda.is_available()
        from .timing import reset_peak_memory

        reset_peak_memory()

    @contextmanager
    def __call__(self, metric_id: str, part: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            parts = self.seconds.setdefault(metric_id, {})
            parts[part] = parts.get(part, 0.0) + time.perf_counter() - t0

    def record(self, path: Path, **work) -> None:
        from .timing import append_attempt, peak_memory

        append_attempt(path, {"metrics": {k: {p: round(v, 4) for p, v in parts.items()} for k, parts in self.seconds.items()},
                              **work, **peak_memory()})


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def format_summary(summary: dict) -> str:
    """A plain-text table: metric id, Table 1 column, arrow, value, n, failures."""
    rows = [("metric", "column", "", "value", "n", "failures")]
    for k, r in summary["metrics"].items():
        v = r.get("value")
        rows.append((k, r["column"], "↑" if r["higher_is_better"] else "↓", "-" if v is None else f"{v:.4f}", str(r["n"]), str(r["failures"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    notes = [f"{k}: {r['error']}" for k, r in summary["metrics"].items() if r.get("error")]
    counts = f"{summary['triples']} triples; {summary['missing_images']} missing, {summary['unreadable_images']} unreadable customized images"
    if summary.get("unmatched_files"):  # e.g. a misnamed file: the image of a triple that counts as missing
        ex = ", ".join(summary.get("unmatched_examples") or [])
        counts += f"; {summary['unmatched_files']} image file(s) named by no triple id{f' ({ex})' if ex else ''}"
    return "\n".join([text, counts, *notes])
