"""MPS (overall quality, higher is better): Multi-dimensional Preference Score, Kwai-Kolors/MPS (CVPR 2024).

Per triple: the MPS "overall" score of the customized image against the complete caption it was
generated from (``batch.prompts``: base text + target text), as the official inference computes it:

1. prompt -> CLIP BPE tokens (77, padded with ``<|endoftext|>``, truncated), the tokenizer of
   ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (same vocabulary and settings as ``spfbench.clip_tokenizer``);
   token features ``T = text_projection(last_hidden_state)`` (77 x 1024) and the pooled EOS feature
   ``t = text_projection(pooler_output)``;
2. image -> ``CLIPImageProcessor`` of that model (shortest side to 224, bicubic, centre crop 224,
   /255, OpenAI mean/std) -> patch features ``I = visual_projection(last_hidden_state)`` (257 x 1024);
3. condition: the fixed "overall" string (``CONDITION``) -> token features ``C``; for each prompt token
   ``s_i = max_j <T_i, C_j>``, normalised ``s_i / max_i s_i`` (per prompt); tokens with a normalised value
   ``<= THRESHOLD`` (0.3) are masked out (-inf) of the cross-attention;
4. ``f = cross_model(I, T, mask)[:, 0]`` (the CLS token after 4 cross/self layers);
5. score = ``logit_scale.exp() * cos(t, f)``: a logit, the cosine times the learned CLIP temperature.

Choices fixed here (the official scripts disagree): threshold 0.3, as in the official evaluation
scripts (``eval_overall_mps_on_hpdv2.py``, ``..._imagereward.py``) that produced the published
accuracies, and DiffSynth-Studio's ``MPScore``; the training ``forward`` uses 0.01. The condition
string keeps its final full stop, as in the official scripts. The normalisation is per prompt (the
official code divides by the batch maximum, and scores one prompt at a time): batch composition never
changes a score. The score is the raw logit (no softmax against a second image).

Weights: the published ``MPS_overall_checkpoint.pth`` is a pickled whole module (code runs on load). It
is read only with an explicit opt-in (``allow_pickle=True`` / ``SPFBENCH_ALLOW_PICKLE=1``), through an
unpickler that replaces every class outside torch and the standard containers by an inert stand-in, so
neither the authors' ``trainer`` package nor their transformers version is needed (a file can still reach
torch's own callables: hence the opt-in); ``convert_mps`` turns it into safetensors once
(``spfbench weights convert-mps IN OUT``), which then loads with no pickle. Either way the tensors load
strictly into :class:`~spfbench.metrics.mps_model.MpsModel`.

Preset ``full-random``: the full-size :class:`~spfbench.metrics.mps_model.MpsModel` (``build_model(full=True)``,
1.10 B parameters) with its own random initialisation under a fixed seed (:func:`full_random_mps`).
"""

from __future__ import annotations

import _compat_pickle
import hashlib
import os
import pickle
import types
from pathlib import Path

import torch

from ..errors import MissingWeightsError, SpfbenchError
from .base import Backbones, Batch, PerSampleMetric, seeded
from .mps_model import CROSS_FULL, CROSS_TINY, MpsModel, clip_config

CONDITION = (
    "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure,"
    " instance, texture, quantity, attributes, position, number, location, word, things."
)
THRESHOLD = 0.3
FULL_RANDOM_SEED = 0
MPS_FILE = "MPS_overall_checkpoint.pth"
MPS_SAFETENSORS = "MPS_overall_checkpoint.safetensors"
MPS_URL = "https://drive.google.com/file/d/17qrK_aJkVNM75ZEvMEePpLj6L867MLkN/view"  # Kwai-Kolors/MPS README
DIFFSYNTH_FILE = (  # DiffSynth-Studio's conversion (same key layout expected; not verified here)
    "modelscope://DiffSynth-Studio/QualityMetric_reward_pretrained/"
    "MPS_overall_checkpoint/MPS_overall_checkpoint_diffsynth.safetensors"
)
WEIGHT_NAME = "mps"  # the name in `spfbench weights` and `--weights mps=PATH`
ENV_CHECKPOINT, ENV_ALLOW_PICKLE = "SPFBENCH_MPS_CHECKPOINT", "SPFBENCH_ALLOW_PICKLE"

# Buffers that older transformers (< 4.31) saved in CLIP's state dict and newer ones keep out of it
# (non-persistent ``position_ids``: always arange, rebuilt by the model). Dropped when present.
NON_PERSISTENT = ("model.text_model.embeddings.position_ids", "model.vision_model.embeddings.position_ids")


def cache_dir() -> Path:
    return Path(os.environ.get("SPFBENCH_CACHE") or Path.home() / ".cache" / "spfbench") / "mps"


def default_checkpoint() -> Path:
    return cache_dir() / MPS_SAFETENSORS


def find_checkpoint(bb: Backbones | None = None) -> Path | None:
    """``--weights mps=PATH``, then ``$SPFBENCH_MPS_CHECKPOINT``, then the safetensors (or the pickle) in the cache."""
    given = (bb.weight_path(WEIGHT_NAME) if bb else None) or os.environ.get(ENV_CHECKPOINT)
    if given:
        return Path(given).expanduser()
    for name in (MPS_SAFETENSORS, MPS_FILE):
        if (cache_dir() / name).is_file():
            return cache_dir() / name
    return None


def pickle_allowed(allow_pickle: bool | None = None) -> bool:
    if allow_pickle is not None:
        return allow_pickle
    return os.environ.get(ENV_ALLOW_PICKLE, "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- the official pickle

_SAFE_BUILTINS = {"set", "frozenset", "dict", "list", "tuple", "slice", "bytearray", "complex", "int", "float",
                  "str", "bytes", "bool", "object", "range", "getattr"}


class _Inert(torch.nn.Module):
    """Stands in for every class of the pickle outside torch: keeps the pickled attributes, runs nothing.

    ``nn.Module.state_dict`` only needs ``_parameters``, ``_buffers``, ``_modules`` and the set of
    non-persistent buffers, all pickled attributes, so the published module tree gives its tensors.
    """

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        if isinstance(state, dict):
            torch.nn.Module.__setstate__(self, state)

    def __call__(self, *args, **kwargs):
        raise SpfbenchError("an object unpickled from an MPS checkpoint is inert and cannot run")


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        # protocol-2 pickles (torch.save's) name Python 2 modules, e.g. ``__builtin__.set``: map them first
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        top = module.split(".")[0]
        if top == "torch" or module in {"collections", "copyreg", "_codecs"}:
            return super().find_class(module, name)
        if module == "builtins" and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        # the authors' trainer.*, transformers.*, anything else: attributes only, no code
        return type(name, (_Inert,), {"__module__": f"spfbench-inert:{module}"})


# torch.load's ``pickle_module``: it subclasses ``Unpickler`` and calls ``load`` for legacy files.
_inert_pickle = types.SimpleNamespace(
    Unpickler=_Unpickler, load=lambda f, **kw: _Unpickler(f, **kw).load(), __name__="spfbench_inert_pickle"
)


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_inert_pickle)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as e:
        raise SpfbenchError(f"cannot read {path} as a torch checkpoint: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, dict):  # a plain state dict, possibly under 'state_dict' / 'model'
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise SpfbenchError(f"{path} holds neither the pickled MPS module nor a state dict ({type(obj).__name__})")


def read_state_dict(path: str | Path, allow_pickle: bool | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: safetensors directly; the official pickle only with the opt-in."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(_missing_message(path))
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise SpfbenchError(f"cannot read {path} as safetensors: {e}") from e
    if not pickle_allowed(allow_pickle):
        raise SpfbenchError(
            f"refusing to unpickle {path}: the official MPS file is a pickled module and loading it runs code from"
            f" the file; convert it once with `spfbench weights convert-mps {path} {default_checkpoint()}`, or opt in"
            f" with {ENV_ALLOW_PICKLE}=1 (allow_pickle=True) if you trust it"
        )
    return _read_pickle(path)


def _summary(keys: list[str]) -> str:
    return f"{len(keys)} (e.g. {', '.join(keys[:3])})"


def load_state_into(model: MpsModel, state: dict[str, torch.Tensor], source: str) -> MpsModel:
    """Strict load (after dropping the known non-persistent buffers); a clear one-line error otherwise."""
    state = {k: v for k, v in state.items() if k not in NON_PERSISTENT}
    have = model.state_dict()
    missing = sorted(set(have) - set(state))
    unexpected = sorted(set(state) - set(have))
    shapes = sorted(k for k in set(have) & set(state) if tuple(have[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = [f"missing keys {_summary(missing)}" if missing else "",
                 f"unexpected keys {_summary(unexpected)}" if unexpected else "",
                 f"shape mismatches {_summary(shapes)}" if shapes else ""]
        raise SpfbenchError(f"{source} does not match the MPS model: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True, assign=True)
    return model


def build_model(full: bool = True, device: str | torch.device = "cpu") -> MpsModel:
    config = clip_config(full=full)
    with torch.device(device):
        return MpsModel(config, CROSS_FULL if full else CROSS_TINY)


def _rebuild_position_ids(model: MpsModel) -> None:
    # Non-persistent buffers are not in the file: after loading onto a meta-built model, make them again.
    for emb in (model.model.text_model.embeddings, model.model.vision_model.embeddings):
        n = emb.position_embedding.weight.shape[0]
        emb.position_ids = torch.arange(n, device=emb.position_embedding.weight.device).expand((1, -1))


def load_mps(path: str | Path, full: bool = True, allow_pickle: bool | None = None) -> MpsModel:
    """An :class:`MpsModel` with the checkpoint's weights (built on the meta device: no random init)."""
    state = read_state_dict(path, allow_pickle)
    model = load_state_into(build_model(full, "meta"), state, str(path))
    _rebuild_position_ids(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise SpfbenchError(f"{path}: tensors not filled by the checkpoint: {_summary(left)}")
    return model


def convert_mps(in_path: str | Path, out_path: str | Path) -> Path:
    """Official pickle -> safetensors (calling this is the opt-in to unpickle ``in_path``).

    The tensors are checked against the model strictly before writing; the metadata names the source.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    state = read_state_dict(in_path, allow_pickle=True)
    state = {k: v for k, v in state.items() if k not in NON_PERSISTENT}
    load_state_into(build_model(True, "meta"), dict(state), str(in_path))  # raises on any mismatch
    tensors, seen = {}, set()
    for k, v in state.items():
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:  # safetensors refuses shared storage
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    digest = hashlib.sha256()
    with open(in_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    meta = {"format": "pt", "source": f"Kwai-Kolors/MPS {MPS_FILE} ({MPS_URL})", "source_file": in_path.name,
            "source_sha256": digest.hexdigest(), "converted_by": "spfbench convert_mps",
            "model": "MpsModel (HF CLIPModel ViT-H-14 + Cross_model)"}
    from safetensors.torch import save

    from ..io import atomic_write_bytes

    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, save(tensors, metadata=meta))
    return out_path


def _missing_message(path: Path | None) -> str:
    where = path or default_checkpoint()
    return (
        f"missing weights: MPS overall checkpoint {where} (Kwai-Kolors/MPS {MPS_FILE}, ~1.1 B params); download {MPS_URL},"
        f" then `spfbench weights convert-mps {MPS_FILE} {default_checkpoint()}` (or pass --weights {WEIGHT_NAME}=PATH /"
        f" set {ENV_CHECKPOINT}; DiffSynth's {DIFFSYNTH_FILE.rsplit('/', 1)[-1]} is accepted too)"
    )


# --------------------------------------------------------------------------- scoring


def image_processor(size: int):
    """The CLIP image processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` at ``size`` (PIL backend)."""
    try:  # transformers 5 with image-processor backends: the PIL one (MPS was trained with the PIL processor)
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # older transformers: CLIPImageProcessor is the PIL/NumPy one
        from transformers import CLIPImageProcessor as Processor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                     resample=PILImageResampling.BICUBIC, do_center_crop=True, do_rescale=True, do_normalize=True,
                     image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True)


class MpsScorer:
    """Model + tokenizer + image processor + condition; ``score(images, prompts)`` in one batched pass."""

    def __init__(self, model: MpsModel, device, dtype, condition: str = CONDITION, threshold: float = THRESHOLD):
        from ..clip_tokenizer import clip_tokenizer

        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = torch.device(device), dtype
        self.tokenizer = clip_tokenizer()
        self.processor = image_processor(model.model.config.vision_config.image_size)
        self.condition, self.threshold = condition, threshold
        self._condition_tokens: torch.Tensor | None = None

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids

    def pixels(self, images) -> torch.Tensor:
        return self.processor([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def condition_tokens(self) -> torch.Tensor:
        """Token features of the condition string (1, 77, D); fixed for given weights, computed once."""
        if self._condition_tokens is None:
            self._condition_tokens, _ = self.model.text_features(self.tokenize([self.condition]).to(self.device))
        return self._condition_tokens

    @torch.inference_mode()
    def score(self, images, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenize(list(prompts)).to(self.device)
        px = self.pixels(images).to(self.device, self.dtype)
        return self.model(ids, px, self.condition_tokens(), self.threshold).float().cpu()


@Backbones.register("mps-overall")
def _load_mps(bb: Backbones) -> MpsScorer:
    if not bb.full_size:
        return MpsScorer(tiny_mps(seed=0), bb.device, bb.dtype)
    if bb.random_weights:
        return MpsScorer(full_random_mps(device=bb.init_device), bb.device, bb.dtype)
    path = find_checkpoint(bb)
    if path is None or not path.is_file():
        raise MissingWeightsError(_missing_message(path))
    return MpsScorer(load_mps(path, full=True), bb.device, bb.dtype)


def tiny_mps(seed: int = 0) -> MpsModel:
    """The same classes with a tiny CLIP (2+2 layers, widths 32/48, 32 px) and a tiny cross model, seeded."""
    with seeded(seed):
        return build_model(full=False)


def full_random_mps(seed: int = FULL_RANDOM_SEED, device: str | torch.device = "cpu") -> MpsModel:
    """The published-size model (LAION ViT-H-14 CLIP + the 4-layer cross model), randomly initialised
    under ``seed`` (transformers' and torch's own initialisers). ``device="meta"``: shapes only."""
    with seeded(seed):
        return build_model(full=True, device=device)


class Mps(PerSampleMetric):
    id, column, higher_is_better = "mps@overall", "MPS", True

    def score(self, batch: Batch) -> list[float | None]:
        if batch.prompts is None:
            raise SpfbenchError("MPS scores an image against the prompt it was generated from: the batch has no prompts")
        out: list[float | None] = [None] * len(batch)
        idx = []
        for i, p in enumerate(batch.prompts):
            if p is None or not str(p).strip():
                self.reasons[batch.ids[i]] = "no prompt"
            else:
                idx.append(i)
        if not idx:
            return out
        scorer = self.backbones.get("mps-overall")
        values = scorer.score([batch.customized[i] for i in idx], [batch.prompts[i] for i in idx]).tolist()
        for i, v in zip(idx, values):
            if v != v or v in (float("inf"), float("-inf")):
                self.reasons[batch.ids[i]] = "score is not finite (every prompt token masked?)"
            else:
                out[i] = v
        return out


def weight_rows() -> list[dict]:
    path = find_checkpoint()
    return [{"group": "metric", "name": WEIGHT_NAME, "what": "MPS overall (Kwai-Kolors/MPS: CLIP ViT-H-14 + cross model)",
             "source": MPS_URL, "size": "~2.2 GB (.pth, fp16)", "present": path is not None and path.is_file(),
             "path": str(path or default_checkpoint())}]
