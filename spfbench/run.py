"""``spfbench run``: methods -> customized images -> the eight metrics -> Table 1, in one resumable folder.

Run folder (every step writes as it finishes; a killed run rerun with the same command resumes)::

    RUN/run.json                        spec (test set, data, metrics, preset, limit), methods, environment, status
    RUN/methods/M/config.json           the method's resolved config (file values + artifacts of the methods it requires)
    RUN/methods/M/status.json           running | complete | failed (stage, error, traceback), artifact
    RUN/methods/M/train/                the training run folder (trainers.loop; a finished run is reused as is)
    RUN/methods/M/generation.json       what made the images: the artifact's method.json, base model, sampler
    RUN/methods/M/images/ID.png         customized image of triple ID: complete caption, the triple's seed
    RUN/methods/M/notes/ID.json         what the method did for that triple, if it says (Magnet's edits/fallbacks)
    RUN/methods/M/score/                spfbench score output (samples.jsonl per triple, summary.json, timings.json)
    RUN/methods/M/timings.json          seconds and peak memory of each attempt at each stage (spfbench/timing.py)
    RUN/methods/M/retention/            --retention: images from the base text only, preservation scores
    RUN/methods/M/curve/                --curve: CLIP-T and image fidelity over checkpoints (curve.png)
    RUN/results.{json,csv,md,tex}       Table 1 (retention.{csv,md,tex} with --retention)
    RUN/index.html                      the report

The unit of work is (method, triple): an image file written atomically; scoring resumes from its own
checkpointed state. A method that raises is recorded (stage, error, traceback) and the others go on.
The runner knows no method by name: what a method needs from another (SPF's stage 1, Magnet's UNet) is
declared by its class (``Method.requires``) and fitted first, once.

Under ``accelerate launch`` training is DDP (trainers.loop), generation splits the missing batches
between processes, and scoring splits the triples and merges the metric states (FID from the summed
feature statistics). Definitions: docs/run.md.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpfbenchError
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, encode_png, read_json_object, remove_stale_tmp

FORMAT_VERSION = 1
PRESERVATION = ("FID", "LPIPS", "ID", "CLIP-I", "Seg-Cons")
ALL_METHODS_KEY = "all"  # config file section applied to every method (before its own section)
CURVE_METRICS = ("clip-t@vit-l-14", "hpsv2@v2.1")  # Fig. 5: CLIP-T and an image-fidelity score (ImageReward there)


@dataclass
class MethodOutcome:
    method: str
    status: str
    stage: str | None = None
    error: str | None = None
    artifact: str | None = None
    config: dict | None = None  # the resolved config (kept in config.json, not in status.json)


@dataclass
class Runner:
    testset: Path
    data: Path
    out: Path
    methods: list[str]
    preset: str | None = None  # metric backbones: real | tiny | world (None: the test set's tiny/world, else real)
    config: dict = field(default_factory=dict)  # {"all": {...}, "naive": {...}, ...}
    limit: int | None = None
    metric_ids: list[str] | None = None
    retention: bool = False
    curve: int | None = None  # checkpoint every N steps and score them (Fig. 5)
    curve_limit: int = 100  # triples generated per checkpoint for the curve
    paper: bool = False
    device: str | None = None
    score_batch_size: int = 16
    weights: dict[str, str] = field(default_factory=dict)  # metric weight files (NAME=PATH)
    progress: bool = True
    cache_dir: Path | None = None  # the originals' cached statistics and features (None: TESTSET/cache)

    def __post_init__(self):
        import trainers

        from .scoring import default_metrics
        from .testset import load_testset

        from . import validate

        self.testset, self.data, self.out = Path(self.testset), Path(self.data), Path(self.out)
        validate.output_folder(self.out)
        validate.device(self.device, launcher=True)
        if not self.methods:
            raise SpfbenchError("give at least one --method (`spfbench methods` lists them)")
        if len(set(self.methods)) != len(self.methods):
            raise SpfbenchError("a method is given twice")
        for m in self.methods:
            trainers.method_class(m)  # unknown names fail here, before anything runs
        unknown = sorted(set(self.config) - set(trainers.REGISTRY) - {ALL_METHODS_KEY})
        if unknown:
            raise SpfbenchError(f"config sections {', '.join(unknown)} name no method; use method names or {ALL_METHODS_KEY!r}")
        self.meta, triples = load_testset(self.testset)
        if self.meta.get("status") != "complete":
            raise SpfbenchError(f"test set {self.testset} is not complete: finish it with the same build-testset command first")
        if self.limit is not None:
            if self.limit < 1:
                raise SpfbenchError("--limit must be at least 1")
            triples = triples[: self.limit]
        self.triples = triples
        spec = self.meta["spec"]
        if self.preset is None:  # the metrics' environment is the base model's (spfbench.environments)
            from .environments import of_preset

            self.preset = of_preset(spec["preset"])[0].name
        self.metric_ids = list(self.metric_ids or default_metrics(self.preset))
        from .metrics import check_ids

        check_ids(self.metric_ids)  # before any training: a typo'd metric would otherwise fail after hours of fitting
        for name in self.order():  # every method's config, as fit will read it (artifacts of required methods aside)
            trainers.method_class(name).Config.from_dict(self.method_config(name), source=f"{name} config")
        if self.curve is not None and self.curve < 1:
            raise SpfbenchError("--curve takes a step interval of at least 1")
        # The customized images are made by the test set's own base model, sampler, batch size and dtype, so
        # that every difference from an original is the method's doing.
        self.load_kwargs = {"preset": spec["preset"], "model": spec.get("model"), "vae": spec.get("vae"),
                            "revision": spec.get("revision"), "seed": spec.get("weights_seed", 0)}
        from .generation import GenerationSettings

        self.settings = GenerationSettings(**self.meta["generation"])
        self.gen_batch = int(spec.get("batch_size", 4))
        self.dtype = spec.get("dtype")

    # -- plan ----------------------------------------------------------------------------------------
    def order(self) -> list[str]:
        """The requested methods and every method they require, each after what it requires."""
        from trainers import method_class

        order: list[str] = []

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if name in chain:
                raise SpfbenchError(f"methods require each other in a cycle: {' -> '.join(chain + (name,))}")
            given = self.method_config(name)
            for key, dep in method_class(name).requires.items():
                if given.get(key) is None:  # the config names the artifact (e.g. stage1_artifact): not fitted here
                    visit(dep, chain + (name,))
            if name not in order:
                order.append(name)

        for m in self.methods:
            visit(m, ())
        return order

    def method_config(self, name: str) -> dict:
        return {**self.config.get(ALL_METHODS_KEY, {}), **self.config.get(name, {})}

    def spec(self) -> dict:
        from .data import dataset_fingerprint, location as data_location
        from .scoring import text_sha256

        return {
            "format_version": FORMAT_VERSION,
            "testset": str(self.testset.resolve()),
            "testset_content_sha256": self.meta["content_sha256"],
            "data": data_location(self.data),
            "data_fingerprint": dataset_fingerprint(self.data),
            "metrics": list(self.metric_ids),
            "preset": self.preset,
            "limit": self.limit,
            "triples": len(self.triples),
            "triples_sha256": text_sha256("\n".join(t.id for t in self.triples)),
        }

    def _open(self, spec: dict, state) -> dict:
        path = self.out / "run.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        old = record.get("spec")
        if old is not None and old != spec:
            diff = sorted(k for k in spec if old.get(k) != spec[k])
            raise SpfbenchError(f"{self.out} holds a run with a different {', '.join(diff)}; use another --out (nothing was changed)")
        methods = list(record.get("methods", []))
        methods += [m for m in self.methods if m not in methods]
        record = {"format_version": FORMAT_VERSION, "spec": spec, "methods": methods,
                  "options": {"paper": self.paper, "retention": self.retention or record.get("options", {}).get("retention", False),
                              "curve": self.curve, "config": self.config},
                  "environment": environment(state), "status": "running"}
        if state.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, record)
        return record

    # -- run -----------------------------------------------------------------------------------------
    def run(self) -> dict[str, MethodOutcome]:
        import torch
        from accelerate import PartialState

        # cpu=True also makes CPU processes of torchrun / accelerate launch one distributed group (MULTI_CPU)
        state = PartialState(cpu=self.device == "cpu" or not torch.cuda.is_available())
        record = self._open(self.spec(), state)
        state.wait_for_everyone()
        artifacts: dict[str, Path] = {}
        outcomes: dict[str, MethodOutcome] = {}
        # Phase 1, per method: fit, then its images. Phase 2: every method's images scored with one set of
        # metric models, loaded once and never on the accelerator beside a training.
        for name in self.order():
            outcomes[name] = self._produce(name, artifacts, outcomes, state, table_row=name in self.methods)
        for name in self.methods:
            if outcomes[name].status == "running":
                self._evaluate(outcomes[name], state)
        if state.is_main_process:
            failed = [m for m in self.methods if outcomes[m].status == "failed"]
            record["status"] = "complete" if not failed else ("failed" if len(failed) == len(self.methods) else "partial")
            record["failed_methods"] = failed
            atomic_write_json(self.out / "run.json", record)
            write_reports(self.out)
        state.wait_for_everyone()
        return outcomes

    @contextmanager
    def _stage(self, outcome: MethodOutcome, stage: str, state):
        """Run one stage of a method; an exception marks the method failed at that stage (recorded) and
        the run goes on with the others. Each attempt at a stage appends its seconds and peak memory, and
        what the block puts in the yielded dict (e.g. images made), to ``methods/M/timings.json``."""
        from .timing import append_attempt, timed

        outcome.stage = stage
        folder = self.out / "methods" / outcome.method
        self._status(folder, outcome, state)
        work: dict = {}
        stages: dict = {}
        try:
            with timed(stages, stage):
                yield work
        except KeyboardInterrupt:
            raise
        except Exception as e:
            outcome.status = "failed"
            outcome.error = str(e) if isinstance(e, SpfbenchError) else f"{type(e).__name__}: {e}"
            self._status(folder, outcome, state, tb=traceback.format_exc())
            if state.is_main_process:
                print(f"error: method {outcome.method} failed at {stage}: {outcome.error} (recorded in {folder / 'status.json'})",
                      flush=True)
        finally:
            if state.is_main_process:
                append_attempt(folder / "timings.json", {"stages": stages, "work": work, "processes": state.num_processes,
                                                         "failed": outcome.status == "failed"})

    def _produce(self, name: str, artifacts: dict, outcomes: dict, state, table_row: bool) -> MethodOutcome:
        """Fit (or reuse) the method and generate its customized images (and retention images)."""
        import trainers

        folder = self.out / "methods" / name
        outcome = MethodOutcome(name, "running")
        with self._stage(outcome, "fit", state):
            values = self.method_config(name)
            for key, dep in trainers.method_class(name).requires.items():
                if values.get(key) is not None:
                    continue
                if outcomes[dep].status == "failed":
                    raise SpfbenchError(f"it needs {dep}'s artifact for {key}, and {dep} failed")
                values[key] = str(artifacts[dep].resolve())
            if self.curve is not None and table_row:
                values = {**values, "checkpointing_steps": self.curve, "checkpoints_total_limit": None}
            self._check_config(folder, values, state)
            artifact = trainers.fit(name, values, self.data, folder / "train", progress=self.progress,
                                    source=f"{name} config", device=self.device, weights_seed=self.load_kwargs["seed"],
                                    **{k: self.load_kwargs[k] for k in ("preset", "model", "vae")})
            artifacts[name] = artifact
            outcome.artifact = str(Path(artifact).resolve())
            outcome.config = values
        if outcome.status == "failed" or not table_row:
            if outcome.status != "failed":  # fitted only because another method requires it
                outcome.status, outcome.stage = "complete", None
                self._status(folder, outcome, state)
            return outcome
        with self._stage(outcome, "generate", state) as work:
            work["images"] = self._generate(artifact, self.triples, folder / "images", folder, state)
        if self.retention and outcome.status != "failed":
            with self._stage(outcome, "retention", state) as work:
                base_only = [dataclasses.replace(t, target_caption=t.base_caption) for t in self.triples]
                work["images"] = self._generate(artifact, base_only, folder / "retention" / "images", folder / "retention", state)
        return outcome

    def _evaluate(self, outcome: MethodOutcome, state) -> None:
        """Score the method's images (and retention images), then its training curve."""
        folder = self.out / "methods" / outcome.method
        with self._stage(outcome, "score", state):
            self._score(folder / "images", folder / "score", self.metric_ids)
        if self.retention and outcome.status != "failed":
            with self._stage(outcome, "retention", state):
                keep = [m for m in self.metric_ids if _column(m) in PRESERVATION]
                self._score(folder / "retention" / "images", folder / "retention" / "score", keep)
        # (a method that trained nothing here, Magnet on the shared naive UNet or a LoRA rank sweep with its
        # own rank folders, has no checkpoints of its own: no curve)
        if self.curve is not None and outcome.status != "failed" and (folder / "train" / "checkpoints").is_dir():
            with self._stage(outcome, "curve", state):
                self._curve(outcome.method, outcome.config, folder, state)
        if outcome.status != "failed":
            outcome.status, outcome.stage = "complete", None
            self._status(folder, outcome, state)

    def _check_config(self, folder: Path, values: dict, state) -> None:
        path = folder / "config.json"
        # an attempt that never began training (it failed before) commits to no config: the new one replaces it
        started = (folder / "train").is_dir() and any(not p.name.startswith(".") for p in (folder / "train").iterdir())
        if path.is_file() and started:
            old = json.loads(path.read_text())
            if old != values:
                diff = sorted(k for k in set(old) | set(values) if old.get(k) != values.get(k))
                raise SpfbenchError(f"{folder} was run with a different config ({', '.join(diff)}); use another --out,"
                                    f" or remove {folder} to redo this method")
        elif state.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, values)

    def _status(self, folder: Path, outcome: MethodOutcome, state, tb: str | None = None) -> None:
        if not state.is_main_process:
            return
        folder.mkdir(parents=True, exist_ok=True)
        record = {k: v for k, v in dataclasses.asdict(outcome).items() if k != "config"}
        atomic_write_json(folder / "status.json", {**record, "traceback": tb})

    # -- generation: one PNG per (method, triple), written as each batch finishes ----------------------
    def _generate(self, artifact: Path, triples, images: Path, folder: Path, state, settings=None) -> int:
        from tqdm.auto import tqdm

        import trainers
        from trainers.base import read_artifact_meta

        from .models import load_pipeline

        settings = settings or self.settings
        made_by = {"artifact": str(Path(artifact).resolve()), "method": read_artifact_meta(artifact),
                   "model": self.load_kwargs, "generation": settings.to_dict(), "dtype": self.dtype,
                   "batch_size": self.gen_batch}
        record = folder / "generation.json"
        if record.is_file() and json.loads(record.read_text()) != made_by:
            raise SpfbenchError(f"{images} holds images of a different artifact or sampler (see {record});"
                                f" remove {images} and {record} to regenerate, or use another --out")
        # fixed batches over the whole list (as the test set builder): the same batches whatever was done before
        batches = [triples[i:i + self.gen_batch] for i in range(0, len(triples), self.gen_batch)]
        todo = [b for b in batches if not all((images / f"{t.id}.png").is_file() for t in b)]
        if state.is_main_process:
            images.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp(images)
            atomic_write_json(record, made_by)
        state.wait_for_everyone()
        if not todo:
            return 0
        pipe, _ = load_pipeline(device=state.device, dtype=self.dtype, **self.load_kwargs)
        fitted = trainers.load_artifact(artifact, pipe)
        made = 0
        with state.split_between_processes(todo) as mine:
            bar = tqdm(total=sum(len(b) for b in todo), desc=f"generate {images.parent.name if images.name == 'images' else images}",
                       unit="img", disable=not (self.progress and state.is_main_process))
            for batch in mine:
                out, notes = fitted.generate(batch, settings)
                for i, (t, img) in enumerate(zip(batch, out)):
                    path = images / f"{t.id}.png"
                    if path.is_file():  # a finished image is never rewritten
                        continue
                    if notes is not None:  # the note first: an image on disk means its unit is done
                        (folder / "notes").mkdir(exist_ok=True)
                        atomic_write_json(folder / "notes" / f"{t.id}.json", notes[i])
                    atomic_write_bytes(path, encode_png(img))
                    made += 1
                bar.update(len(batch) * state.num_processes)
            bar.close()
        state.wait_for_everyone()
        return made

    def _score(self, images: Path, out: Path, metric_ids: list[str]) -> dict:
        from accelerate import PartialState

        from .scoring import Scorer

        from .metrics import Backbones

        if getattr(self, "_backbones", None) is None:  # one set of metric models for every method of the run
            device = str(PartialState().device) if self.device != "cpu" else "cpu"
            self._backbones = Backbones(self.preset, device, weights=self.weights)
        scorer = Scorer(self.testset, images, out, metric_ids, preset=self.preset, device=str(self._backbones.device),
                        batch_size=self.score_batch_size, limit=self.limit, weights=self.weights, backbones=self._backbones,
                        cache_dir=self.cache_dir)
        return scorer.run(progress=self.progress)

    def _curve(self, name: str, values: dict, folder: Path, state) -> None:
        from .curve import training_curve

        from .metrics import metric_class

        # Fig. 5's two, plus the run's trade-off metrics (ground truth), so a curve is also a trade-off line
        ids = list(CURVE_METRICS) + [m for m in self.metric_ids if metric_class(m).tradeoff_axis and m not in CURVE_METRICS]
        if state.is_main_process:  # a few images per checkpoint: one process is enough
            training_curve(folder / "train", name, values, self.testset, self.triples[: self.curve_limit], folder / "curve",
                           load_kwargs=self.load_kwargs, metrics_preset=self.preset, metric_ids=ids, settings=self.settings,
                           batch_size=self.gen_batch, device=str(state.device), dtype=self.dtype, progress=self.progress)
        state.wait_for_everyone()


def _column(metric_id: str) -> str:
    from .metrics import metric_class

    return metric_class(metric_id).column


# -- environment ------------------------------------------------------------------------------------


def git_revision() -> dict:
    """The suite's git commit (and whether its tree had uncommitted changes), when it runs from a clone."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return {"commit": None}
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def environment(state=None) -> dict:
    import importlib.metadata as md
    import platform

    import torch

    versions = {}
    for pkg in ("spfbench", "torch", "torchvision", "diffusers", "transformers", "accelerate", "peft", "open_clip_torch",
                "torchmetrics", "lpips", "insightface", "onnxruntime", "segment_anything", "numpy", "pandas"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    env = {"python": platform.python_version(), "platform": platform.platform(), "packages": versions, "git": git_revision()}
    if state is not None:
        env["processes"] = state.num_processes
        env["device"] = str(state.device)
        if state.device.type == "cuda":
            env["device_name"] = torch.cuda.get_device_name(state.device)
            env["cuda"] = torch.version.cuda
        else:
            env["cpu_threads"] = torch.get_num_threads()
            # the kernels torch picks follow the CPU's instruction set: CPU results reproduce bit for bit
            # only on the same capability (and model), so both are recorded
            env["cpu"] = {"model": _cpu_model(), "capability": torch.backends.cpu.get_cpu_capability()}
    return env


def _cpu_model() -> str | None:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# -- outputs: everything below is rebuilt from the stored samples by `spfbench report` -----------------


def _statuses(run: Path) -> tuple[dict, dict[str, dict]]:
    path = run / "run.json"
    if not path.is_file():
        raise SpfbenchError(f"{run} is not a run folder (run.json missing)")
    record = json.loads(path.read_text())
    statuses = {}
    for m in record["methods"]:
        p = run / "methods" / m / "status.json"
        statuses[m] = json.loads(p.read_text()) if p.is_file() else {"method": m, "status": "not started"}
    return record, statuses


def build_table(run: Path, kind: str = "score"):
    """Table 1 of a run (``kind="score"``) or its retention table (``"retention/score"``): one row per
    requested method; a failed method is a row with its error."""
    from . import table1

    record, statuses = _statuses(run)
    rows = []
    for m, st in statuses.items():
        folder = run / "methods" / m / kind
        if st["status"] == "complete" and (folder / "summary.json").is_file():
            row = table1.read_scores(folder, m)
            meta = Path(st["artifact"]) / "method.json" if st.get("artifact") else None
            if meta is not None and meta.is_file():
                row = dataclasses.replace(row, notes=tuple(json.loads(meta.read_text()).get("notes") or ()))
            rows.append(row)
        elif st["status"] == "failed":
            rows.append(table1.Row(method=m, cells={}, ablation=table1.is_ablation(m), error=f"{st.get('stage')}: {st.get('error')}"))
        else:
            rows.append(table1.Row(method=m, cells={}, ablation=table1.is_ablation(m), error=f"not finished ({st['status']})"))
    return table1.Table(rows=table1.ordered_rows(rows))


def to_json(table, record: dict) -> str:
    from .table1 import paired_differences

    rows = []
    for r in table.rows:
        rows.append({"method": r.method, "ablation": r.ablation, "status": "failed" if r.error else "complete", "error": r.error,
                     "notes": list(r.notes), "metrics": {col: dataclasses.asdict(c) for col, c in r.cells.items()}})
    return json.dumps({"spec": record["spec"], "environment": record.get("environment"), "rows": rows,
                       "paired": paired_differences(table)}, indent=2, ensure_ascii=False) + "\n"


def write_reports(run: Path, paper: bool | None = None) -> dict[str, Path]:
    """results.{json,csv,md,tex}, retention.* when present, and index.html, from the stored samples only."""
    from . import table1
    from .report import write_html

    run = Path(run)
    record, _ = _statuses(run)
    paper = record.get("options", {}).get("paper", False) if paper is None else paper
    table = build_table(run)
    paths = table1.write(table, run, paper=paper)
    atomic_write_text(run / "results.json", to_json(table, record))
    paths["json"] = run / "results.json"
    if any((run / "methods" / m / "retention" / "score" / "summary.json").is_file() for m in record["methods"]):
        retention = build_table(run, "retention/score")
        paths.update({f"retention_{k}": v for k, v in table1.write(retention, run, stem="retention").items()})
    paths["html"] = write_html(run, table, paper=paper)
    return paths


def read_config(path: Path | None) -> dict:
    """A run config file: ``{"all": {...}, "naive": {...}, "spf": {...}}`` (each a method's hyper-parameters)."""
    if path is None:
        return {}
    values = read_json_object(path)
    if not all(isinstance(v, dict) for v in values.values()):
        raise SpfbenchError(f"config file {path} must map method names (or {ALL_METHODS_KEY!r}) to objects of option: value")
    return values
