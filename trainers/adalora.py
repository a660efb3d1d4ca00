"""adalora: peft AdaLoRA on the UNet's attention projections (Table 1's "AdaLoRA" row).

peft's ``AdaLoraConfig`` + ``get_peft_model`` (``unet.add_adapter`` would build no ``RankAllocator``).
Each target ``W`` becomes ``W x + B diag(E) A x * lora_alpha / init_r``; A, B start ~ N(0, 0.02), E at
zero. The rank budget (number of kept (A row, E entry, B column) triplets) is ``init_r`` per module for
the first ``tinit`` optimizer steps, falls on peft's cubic schedule to ``target_r`` per module (on
average: modules compete for it) at step ``total_step - tfinal``, and stays fixed for the last
``tfinal`` steps. ``total_step`` is the number of optimizer steps (``max_train_steps``).

Where rank allocation runs (peft's ``update_and_allocate``). peft's documented order is::

    loss.backward(); optimizer.step(); model.base_model.update_and_allocate(global_step); optimizer.zero_grad()

with ``global_step`` the 0-based index of the optimizer step just taken (peft's AdaLoRA examples count it
from 0 and increment it after the call). The shared loop's hook ``after_backward(models, step)`` runs
*before* ``optimizer.step`` with ``step`` = the 0-based index of the step being taken, so this module
copies the (clipped, synchronised) adapter gradients there and runs ``update_and_allocate(step)`` right
after ``optimizer.step`` -- at the start of the next ``loss`` call, or before a checkpoint or the
artifact is written, whichever comes first (:meth:`AdaLora.after_step` does it immediately if the loop
provides such a hook). The sensitivity ``|p * grad|`` therefore sees the updated weights and the
gradients of that step, and the masking of pruned ``lora_E`` entries is not undone by the optimizer
step that follows it, exactly as in peft's order. (Masking *before* ``optimizer.step`` would let Adam
move the just-pruned singular values off zero again.)

The orthogonal regulariser: peft adds it in ``AdaLoraModel.forward`` only when the wrapped model's output
has a ``.loss``; a UNet's has none, so :meth:`AdaLora.loss` adds the same term itself:
``orth_reg_weight * mean over the adapter's lora_A and lora_B of ||P P^T - I||_F`` (A: r x in, P P^T;
B: out x r, P^T P; the Frobenius norm, not squared; pruned triplets included, as peft does).

Artifact: ``adapter/`` written by ``PeftModel.save_pretrained`` (``adapter_config.json`` with the final
``rank_pattern``, ``adapter_model.safetensors`` with the pruned triplets dropped). ``apply_artifact``
builds ``PeftModel.from_pretrained`` around the fresh ``pipe.unet`` (peft resizes every module to its
kept rank from the saved ``rank_pattern``) and merges it (``merge_and_unload``): ``pipe.unet`` is again
a plain ``UNet2DConditionModel`` holding ``W + dW``. The adapter folder is peft's AdaLoRA format, which
``load_lora_weights`` does not read; beside it, :func:`export_plain_lora` writes the same update as a plain
LoRA (``pytorch_lora_weights.safetensors``, diffusers format, per-module ranks in its metadata) that
``pipe.load_lora_weights(folder)`` loads: the field's way to use the artifact elsewhere.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spfbench.errors import SpfbenchError

from .base import Models, TrainConfig, TrainedMethod, diffusion_loss, encode_batch
from .lora import adapter_init_rng

ADAPTER = "default"
ADAPTER_DIR = "adapter"
ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # RankAllocator dicts: parameter name -> tensor


@dataclass
class AdaLoraConfig(TrainConfig):
    learning_rate: float = 1e-4  # as our LoRA (diffusers' LoRA example); peft's AdaLoRA LLM examples use 1e-3
    init_r: int = 12  # peft AdaLoraConfig defaults from here to orth_reg_weight
    target_r: int = 8
    tinit: int | None = None  # None: 10% of max_train_steps (peft's AdaLoraConfig docstring example 10/20/100)
    tfinal: int | None = None  # None: 20% of max_train_steps
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    lora_alpha: float = 8  # peft LoraConfig default; the update is scaled by lora_alpha / init_r
    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])

    @property
    def total_step(self) -> int:
        return self.max_train_steps

    @property
    def resolved_tinit(self) -> int:
        return int(math.floor(0.1 * self.max_train_steps)) if self.tinit is None else self.tinit

    @property
    def resolved_tfinal(self) -> int:
        return int(math.floor(0.2 * self.max_train_steps)) if self.tfinal is None else self.tfinal

    def validate(self) -> None:
        super().validate()
        for name in ("init_r", "target_r", "deltaT"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpfbenchError(f"{name} must be a positive integer, got {v!r}")
        if self.target_r > self.init_r:
            raise SpfbenchError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise SpfbenchError(f"{name} must be a non-negative integer or null, got {v!r}")
        tinit, tfinal = self.resolved_tinit, self.resolved_tfinal
        if tinit >= self.max_train_steps - tfinal:
            raise SpfbenchError(
                f"adalora: tinit ({tinit}) + tfinal ({tfinal}) leave no rank-reduction phase in {self.max_train_steps} steps;"
                " lower tinit/tfinal or raise max_train_steps"
            )
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise SpfbenchError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            raise SpfbenchError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if not self.lora_alpha > 0:
            raise SpfbenchError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise SpfbenchError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")


def peft_adalora_config(cfg: AdaLoraConfig):
    import peft

    alpha = cfg.lora_alpha
    return peft.AdaLoraConfig(
        init_r=cfg.init_r,
        target_r=cfg.target_r,
        tinit=cfg.resolved_tinit,
        tfinal=cfg.resolved_tfinal,
        deltaT=cfg.deltaT,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        orth_reg_weight=cfg.orth_reg_weight,
        total_step=cfg.total_step,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=0.0,
        target_modules=list(cfg.target_modules),
    )


def orthogonal_regularizer(module: torch.nn.Module, adapter: str = ADAPTER) -> torch.Tensor:
    """peft's AdaLoRA regulariser (``AdaLoraModel.forward``), unweighted: the mean over the adapter's lora_A
    and lora_B matrices of ``||P P^T - I||_F`` (lora_A) / ``||P^T P - I||_F`` (lora_B)."""
    terms = []
    for n, p in module.named_parameters():
        if (".lora_A." in n or ".lora_B." in n) and n.endswith(f".{adapter}"):
            cov = p @ p.T if ".lora_A." in n else p.T @ p
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
    if not terms:
        return torch.zeros((), device=next(module.parameters()).device)
    return torch.stack(terms).mean()


def _key(name: str) -> str:
    """A rank_pattern key without the adapter name (peft strips it when saving; mask_using_rank_pattern
    accepts both)."""
    return name.replace(f".{ADAPTER}", "")


class AdaLora(TrainedMethod):
    name = "adalora"
    description = "peft AdaLoRA (SVD-form LoRA with importance-based rank allocation) on the UNet attention projections"
    Config = AdaLoraConfig
    # config fields that set the rank schedule (total_step = max_train_steps; tinit/tfinal default to fractions
    # of it): a run resumed with another value would follow another schedule
    schedule_fields = ("max_train_steps",)

    def __init__(self, config: AdaLoraConfig | None = None):
        super().__init__(config)
        self.peft_model = None
        self._pending: tuple[int, dict[str, torch.Tensor]] | None = None  # (step, gradients) awaiting allocation

    # -- training hooks ---------------------------------------------------------------------------
    def setup(self, models: Models) -> list[torch.nn.Parameter]:
        from peft import get_peft_model

        unet = models.unet
        unet.requires_grad_(False)
        # injects SVDLinear layers into unet in place; the PeftModel only carries the RankAllocator and
        # save_pretrained. models.unet stays the plain UNet2DConditionModel object the loop expects.
        with adapter_init_rng(self.config.seed, models.device):
            self.peft_model = get_peft_model(unet, peft_adalora_config(self.config))
        models.extra["adalora_peft_model"] = self.peft_model
        params = []
        for n, p in unet.named_parameters():
            if any(f".lora_{m}.{ADAPTER}" in n for m in "AEB"):
                p.data = p.data.float()
                p.requires_grad_(True)
                params.append(p)
            elif f".ranknum.{ADAPTER}" in n:
                p.requires_grad_(False)  # peft's constant current rank; peft 0.21.0 leaves it trainable
            elif p.requires_grad:
                raise SpfbenchError(f"adalora: unexpected trainable parameter {n}")
        if not params:
            raise SpfbenchError(f"adalora: no module of the UNet matches target_modules {self.config.target_modules}")
        unet.train()
        return params

    @property
    def tuner(self):
        """peft's AdaLoraModel (holds the RankAllocator and update_and_allocate)."""
        if self.peft_model is None:
            raise SpfbenchError("adalora: setup() has not run")
        return self.peft_model.base_model

    def loss(self, models: Models, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        self.flush()
        latents, text = encode_batch(models, batch, generator)
        loss_diff = diffusion_loss(models, latents, text, generator)
        numbers = {"loss_diffusion": loss_diff.detach().item(), "rank_budget": self.rank_budget()}
        if self.config.orth_reg_weight > 0:
            reg = orthogonal_regularizer(self.tuner.model)
            numbers["loss_orth"] = reg.detach().item()
            return loss_diff + self.config.orth_reg_weight * reg, numbers
        return loss_diff, numbers

    def after_backward(self, models: Models, step: int) -> None:
        self.flush()  # (a previous step's allocation, if nothing ran it yet)
        grads = {}
        for n, p in self.tuner.model.named_parameters():
            if ".lora_" in n and ADAPTER in n and p.requires_grad:
                grads[n] = None if p.grad is None else p.grad.detach().clone()
        self._pending = (step, grads)

    def after_step(self, models: Models, step: int) -> None:
        """For a loop that calls a hook after ``optimizer.step`` and before ``zero_grad``."""
        self.flush()

    def flush(self) -> None:
        """Run the pending ``update_and_allocate(step)`` on the weights after that step's optimizer update,
        with that step's gradients (peft's order: after optimizer.step, before zero_grad)."""
        if self._pending is None:
            return
        step, grads = self._pending
        self._pending = None
        named = dict(self.tuner.model.named_parameters())
        saved = {n: named[n].grad for n in grads}
        try:
            for n, g in grads.items():
                named[n].grad = g if g is not None else torch.zeros_like(named[n])
            self.tuner.update_and_allocate(step)
        finally:
            for n, g in saved.items():
                named[n].grad = g

    # -- rank budget --------------------------------------------------------------------------------
    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """The current allocation (module's lora_E key without adapter name -> kept triplets), None before the
        first allocation."""
        rp = self.tuner.peft_config[ADAPTER].rank_pattern
        return None if not rp else {_key(k): [bool(x) for x in v] for k, v in rp.items()}

    def rank_budget(self) -> int:
        """Kept triplets over all modules (init_r x modules before the first allocation)."""
        rp = self.rank_pattern()
        if rp is None:
            return self.tuner.rankallocator.init_bgt
        return int(sum(sum(v) for v in rp.values()))

    def _apply_mask(self) -> None:
        rp = self.tuner.peft_config[ADAPTER].rank_pattern
        if rp:
            self.tuner.rankallocator.mask_using_rank_pattern(self.tuner.model, rp)

    # -- checkpoints --------------------------------------------------------------------------------
    def trainable_state(self, models: Models) -> dict[str, torch.Tensor]:
        """Adapter weights at full shape (pruned entries are zeros), the RankAllocator's smoothed scores and the
        rank pattern: everything a resumed run needs to continue as the uninterrupted one."""
        self.flush()
        state = {}
        for n, p in self.tuner.model.named_parameters():
            if any(f".lora_{m}.{ADAPTER}" in n for m in "AEB"):
                state[f"weight.{n}"] = p.detach().clone()
        alloc = self.tuner.rankallocator
        for part in ALLOCATOR_STATE:  # (ipt too: peft restarts a parameter's averages when it is missing there)
            for n, v in getattr(alloc, part).items():
                state[f"{part}.{n}"] = v.detach().clone()
        for k, v in (self.rank_pattern() or {}).items():
            state[f"rank_pattern.{k}"] = torch.tensor(v, dtype=torch.uint8)
        return state

    def load_trainable_state(self, models: Models, state: dict[str, torch.Tensor]) -> None:
        named = {n: p for n, p in self.tuner.model.named_parameters() if any(f".lora_{m}.{ADAPTER}" in n for m in "AEB")}
        weights = {k[len("weight."):]: v for k, v in state.items() if k.startswith("weight.")}
        if set(weights) != set(named):
            missing, extra = sorted(set(named) - set(weights)), sorted(set(weights) - set(named))
            raise SpfbenchError(f"adalora: checkpoint does not match the adapter (missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for n, v in weights.items():
                named[n].copy_(v)
        alloc = self.tuner.rankallocator
        alloc.reset_ipt()
        for k, v in state.items():
            part, _, n = k.partition(".")
            if part in ALLOCATOR_STATE:
                if n not in named:
                    raise SpfbenchError(f"adalora: checkpoint holds allocator state of an unknown parameter {n}")
                getattr(alloc, part)[n] = v.clone().to(named[n].device)
        rp = {k[len("rank_pattern."):]: [bool(x) for x in v.tolist()] for k, v in state.items() if k.startswith("rank_pattern.")}
        self.tuner.peft_config[ADAPTER].rank_pattern = rp or None
        self._pending = None

    # -- artifact -----------------------------------------------------------------------------------
    def save_artifact(self, models: Models, folder: Path) -> None:
        self.flush()
        # the artifact drops pruned triplets; zero them in the live model too so that both are the same model
        # (matters only when training ends between two allocations, i.e. tfinal = 0 and deltaT > 1)
        self._apply_mask()
        out = Path(folder) / ADAPTER_DIR
        with warnings.catch_warnings():
            # a module whose every triplet was pruned is saved at rank 0 (peft supports r = 0 for AdaLoRA); peft's
            # check for un-gathered ZeRO-3/FSDP shards mistakes those empty tensors for shards
            warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*")
            self.peft_model.save_pretrained(out, safe_serialization=True)
        (out / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        export_plain_lora(models.unet, folder)

    @classmethod
    def apply_artifact(cls, pipe, folder: Path, config: TrainConfig) -> None:
        peft_model = load_adapter(pipe.unet, folder)
        pipe.unet = peft_model.merge_and_unload().eval()


def plain_lora_layers(unet: torch.nn.Module, adapter: str = ADAPTER) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """AdaLoRA's update as plain LoRA matrices: per module ``dW = B diag(E) A * alpha / (ranknum + 1e-5)`` (peft's
    ``SVDLinear.get_delta_weight``) is ``B' A'`` with ``A' = A[kept]`` and ``B' = B[:, kept] * E[kept] * alpha /
    (ranknum + 1e-5)``, kept = the triplets whose singular value is not zero (a pruned one is exactly zero and a
    zero one adds nothing either way). Returns the peft-format state dict (``<module>.lora_A.weight``,
    ``<module>.lora_B.weight``) and each module's kept rank; modules with no triplet left are absent."""
    layers, ranks = {}, {}
    for name, module in unet.named_modules():
        if not (hasattr(module, "lora_E") and adapter in module.lora_E):
            continue
        e = module.lora_E[adapter].detach().float().reshape(-1)
        kept = torch.nonzero(e).reshape(-1)
        if kept.numel() == 0:
            continue
        a = module.lora_A[adapter].detach().float()[kept]
        scale = float(module.scaling[adapter]) / (float(module.ranknum[adapter]) + 1e-5)
        b = module.lora_B[adapter].detach().float()[:, kept] * e[kept].reshape(1, -1) * scale
        layers[f"{name}.lora_A.weight"] = a.contiguous().cpu()
        layers[f"{name}.lora_B.weight"] = b.contiguous().cpu()
        ranks[name] = int(kept.numel())
    return layers, ranks


def export_plain_lora(unet: torch.nn.Module, folder: Path, adapter: str = ADAPTER) -> None:
    """``folder/pytorch_lora_weights.safetensors``: the trained update as a plain LoRA in the diffusers format that
    ``pipe.load_lora_weights(folder)`` loads (docs/methods.md "AdaLoRA's artifact"). Ranks differ per module, so the
    adapter's peft ``LoraConfig`` travels as metadata: r and lora_alpha the most common kept rank, ``rank_pattern``
    and ``alpha_pattern`` the others (alpha = rank everywhere: the scale is folded into B), target_modules the
    modules that kept a triplet."""
    from collections import Counter

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig as PeftLoraConfig

    from .lora import WEIGHT_NAME

    layers, ranks = plain_lora_layers(unet, adapter)
    if not ranks:  # every triplet pruned: the model is the base model; no LoRA to write
        return
    r = Counter(ranks.values()).most_common(1)[0][0]
    others = {n: k for n, k in ranks.items() if k != r}
    config = PeftLoraConfig(r=r, lora_alpha=r, rank_pattern=others, alpha_pattern=dict(others), target_modules=sorted(ranks),
                            init_lora_weights=True)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(layers), weight_name=WEIGHT_NAME, safe_serialization=True,
        unet_lora_adapter_metadata=config.to_dict(),
    )


def load_adapter(unet, folder: Path):
    """The artifact's adapter around ``unet`` (a PeftModel; every module resized to its kept rank)."""
    from peft import PeftModel

    path = Path(folder) / ADAPTER_DIR
    if not (path / "adapter_config.json").is_file():
        raise SpfbenchError(f"{folder} holds no {ADAPTER_DIR}/adapter_config.json (not an adalora artifact)")
    with warnings.catch_warnings():
        # peft checks rank_pattern keys against LoRA's meaning (module -> rank); AdaLoRA's (lora_E -> mask)
        # are applied by AdaLoraModel itself when the weights load
        warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match.*")
        return PeftModel.from_pretrained(unet, path, is_trainable=False)
