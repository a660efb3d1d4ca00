"""SPF-Portrait (paper section 3): dual-path contrastive fine-tuning, stage 2, and its ablations.

* **Reference path**: a frozen copy of the *original* UNet (``models.extra["reference_unet"]``, eval, no
  gradients, optionally half precision), fed E_base only: the base caption encoded alone.
* **Response path**: ``models.unet``, started from stage 1 (``SpfConfig.stage1_artifact``, a ``naive``
  artifact; None: from the base model), fed the complete caption [E_base, E_tar] (one encoding of
  ``join_caption(base, target)``); only its cross-attention (``attn2``) parameters train.
* Losses from :mod:`trainers.spf_losses` (eq. 3-12), captured Q / K / probabilities from the one capture
  mechanism (:mod:`trainers.attention`), gamma and L_enhanced in CLIP ViT-L/14 space (the metrics'
  backbone loader; a tiny random CLIP for the ``tiny`` preset).

Stage 1 is not run inside this method: it is a ``naive`` run whose artifact ``stage1_artifact`` names.
Every decision is written in ``docs/spf.md`` ("Training procedure").
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch

from spfbench.captions import split_base_phrases
from spfbench.errors import SpfbenchError

from . import spf_diagnostics as D
from . import spf_losses as L
from .attention import AttentionStore, install_capture
from .base import EncodingExtras, Models, TrainConfig, TrainedMethod, diffusion_target, encode_batch, encode_text

REFERENCE = "reference_unet"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# per-item constants in the batch when TrainConfig.cache_encodings stored them (Spf.encoding_extras)
GT_EMBEDDING = "spf_clip_gt"  # (B, D) CLIP image embedding of the ground-truth pixels (L_enhanced's E_I(x0))
TEXT_BASE = "spf_text_base"  # (B, 77, C) the base caption encoded alone by the SD text encoder (E_base)
EXTRAS_VERSION = 1  # bump when what encoding_extras computes changes: the encoding cache then rebuilds


class _Lru:
    """A bounded in-memory cache: the least recently used entry goes first once ``size`` is exceeded."""

    def __init__(self, size: int):
        self.size, self._d = int(size), OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key) -> bool:
        return key in self._d

    def get(self, key):
        self._d.move_to_end(key)
        return self._d[key]

    def put(self, key, value) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)


@dataclass
class SpfConfig(TrainConfig):
    # The paper gives no learning rate (sec. 4.1 defers to an appendix we do not have): naive's 1e-5.
    learning_rate: float = 1e-5
    lambda1: float = 0.6  # L_enhanced (sec. 4.1)
    lambda2: float = 0.2  # L_M-text
    lambda3: float = 0.1  # L_M-fine
    use_text: bool = True  # L_(M-)text-consistent (spf-no-text: False)
    use_fine: bool = True  # L_(M-)fine-grained (spf-no-fine: False)
    use_enhanced: bool = True  # L_enhanced (spf-no-enh: False)
    use_sfcm: bool = True  # the SFCM M-hat weights the alignment losses (spf-no-sfcm: False = eq. 3/4, M-hat = 0)
    stage1_artifact: str | None = None  # a naive artifact folder (holding unet/): the response path's start
    min_timestep: int = 0  # stage-2 timesteps t ~ U{min_timestep .. max_timestep - 1}
    max_timestep: int | None = None  # None: the scheduler's num_train_timesteps (the same range as L_diff)
    # the environment whose CLIP backbone SPF uses (spfbench.environments: real, tiny, full-random, world, a plugin's);
    # "auto": the base model's environment (a bare UNet of unknown preset: real for 768-d text, else tiny)
    clip_preset: str = "auto"
    clip_model: str = "vit-l-14"  # vit-l-14 (the paper) | vit-b-32
    # gamma's and L_enhanced's CLIP from another weight file than the metrics' (so CLIP-T is not scored in the
    # space SPF was trained in): on the world a world-CLIP .safetensors (e.g. one trained with another seed,
    # docs/world.md), on real presets an open_clip checkpoint of clip_model. None: the preset's own
    clip_weights: str | None = None
    reference_dtype: str = "auto"  # auto (= the run's compute dtype) | fp32 | fp16 | bf16
    mask_mode: str = "pool"  # spf_losses.text_consistent_loss
    norm: str = "mse"  # mse | l2 | l2sq (spf_losses.NORMS; docs/spf.md "Readings")
    layer_reduction: str = "mean"  # mean | sum
    # how eq. 5's M and eq. 6's A_base[i] are put on one scale before eq. 7 subtracts them: "none" (default
    # since issue 21: as eq. 5-7 are written, raw channel-mean |eps difference| and raw layer-mean attention
    # probabilities, M-hat clamped to [0, 1]; docs/spf.md decision 8), "minmax" (each map min-max normalised
    # to [0, 1]: M per sample, A_base per phrase; the default before) or "max" (divided by its maximum)
    sfcm_normalize: str = "none"
    # what the alignment losses compare: "query" (Q after to_q, eq. 3/4 as written) or "hidden" (the attn2
    # input features, what to_q projects: the UNet's own features; F pools them with the same softmax)
    features: str = "query"
    # every N-th optimizer step, log what the paths do (trainers/spf_diagnostics.py): attn2 input features and
    # noise predictions on the base text, reference against response, and M / M-hat against the target masks
    # when the data has them (attn_list); one extra no-grad UNet forward on those steps. 0: off
    diagnostics_every: int = 10
    # recompute the VAE decode and the CLIP vision pass of L_enhanced in the backward pass instead of keeping
    # their activations (the decode is ~64 % of a stage-2 step's FLOPs and most of its activation memory)
    checkpoint_enhanced: bool = False

    def validate(self) -> None:
        super().validate()
        for name in ("lambda1", "lambda2", "lambda3"):
            if getattr(self, name) < 0:
                raise SpfbenchError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.clip_preset != "auto":
            from spfbench.environments import get, names

            if self.clip_preset not in names():
                raise SpfbenchError(f"clip_preset must be auto or an environment ({', '.join(names())}), got {self.clip_preset!r}")
            get(self.clip_preset)
        if self.clip_model not in ("vit-l-14", "vit-b-32"):
            raise SpfbenchError(f"clip_model must be vit-l-14 or vit-b-32, got {self.clip_model!r}")
        if self.clip_weights is not None and not Path(self.clip_weights).is_file():
            raise SpfbenchError(f"clip_weights {self.clip_weights}: no such file (give a CLIP weight file: a world CLIP .safetensors, or an open_clip checkpoint)")
        if self.reference_dtype not in ("auto", *_DTYPES):
            raise SpfbenchError(f"reference_dtype must be auto, fp32, fp16 or bf16, got {self.reference_dtype!r}")
        if self.mask_mode not in ("pool", "renorm"):
            raise SpfbenchError(f"mask_mode must be pool or renorm, got {self.mask_mode!r}")
        if self.norm not in L.NORMS:
            raise SpfbenchError(f"norm must be one of {', '.join(L.NORMS)}, got {self.norm!r}")
        if self.sfcm_normalize not in ("minmax", "max", "none"):
            raise SpfbenchError(f"sfcm_normalize must be minmax, max or none, got {self.sfcm_normalize!r}")
        if self.features not in ("query", "hidden"):
            raise SpfbenchError(f"features must be query or hidden, got {self.features!r}")
        if self.diagnostics_every < 0:
            raise SpfbenchError(f"diagnostics_every must be >= 0 (0: off), got {self.diagnostics_every}")
        if self.layer_reduction not in ("mean", "sum"):
            raise SpfbenchError(f"layer_reduction must be mean or sum, got {self.layer_reduction!r}")
        if self.min_timestep < 0 or (self.max_timestep is not None and self.max_timestep <= self.min_timestep):
            raise SpfbenchError(f"need 0 <= min_timestep < max_timestep, got {self.min_timestep}, {self.max_timestep}")
        if self.stage1_artifact is not None and not (Path(self.stage1_artifact) / "unet").is_dir():
            raise SpfbenchError(f"stage1_artifact {self.stage1_artifact}: no unet/ folder (give a naive artifact, OUT/artifact)")


class SfcmParts(NamedTuple):
    """What :meth:`Spf.sfcm_parts` returns (the ``viz sfcm`` panels)."""

    m_hat: torch.Tensor  # (B, S, S) eq. 7
    m: torch.Tensor  # (B, S, S) normalised noise difference, eq. 5
    exclusion: torch.Tensor  # (B, S, S) sum_i A_base[i] (1 - gamma(i)) (padding phrases weigh 0)
    phrase_maps: torch.Tensor  # (B, P, S, S) A_base, eq. 6, min-max per phrase
    gamma: torch.Tensor  # (B, P) the gamma used (padding phrases: 1)
    phrase_mask: torch.Tensor  # (B, P) which phrases exist
    phrases: list  # list[list[str]] the base phrases of each sample


def _is_attn2(name: str) -> bool:
    return ".attn2." in name


class Spf(TrainedMethod):
    name = "spf"
    description = "SPF-Portrait: dual-path contrastive stage 2 (SFCM alignment + response enhancement)"
    Config = SpfConfig
    requires = {"stage1_artifact": "naive"}  # stage 1 is the naive run (sec. 3.1)
    # bounds of the in-memory per-item caches (used without cache_encodings; docs/spf.md decision 30):
    # E_I(x0) per (dataset index, flipped): D floats each (ViT-L/14: 768 x 4 B = 3 KiB; 65536 -> <= 192 MiB);
    # E_base per base caption: 77 x C values each (SD1.5: 77 x 768 x 4 B = 231 KiB in fp32; 1024 -> <= 231 MiB)
    gt_cache_size: ClassVar[int] = 65536
    text_cache_size: ClassVar[int] = 1024

    def __init__(self, config: SpfConfig | None = None):
        super().__init__(config)
        self._gt_emb = _Lru(self.gt_cache_size)  # (index, flipped) -> (D,) float32, CPU
        self._text_base = _Lru(self.text_cache_size)  # base caption -> (77, C) text encoder dtype, CPU
        self._gamma: dict[tuple[str, str], torch.Tensor] = {}  # (base caption, target text) -> (P,)
        self._target_emb: dict[str, torch.Tensor] = {}  # target text -> CLIP text embedding (D,)
        self._phrases: dict[str, tuple[list[str], list[list[int]], list[int]]] = {}
        self._clip = None
        self.dataset = None
        self._step = 0  # the optimizer step the next loss call belongs to (after_step keeps it)
        self._target_masks: dict[int, torch.Tensor | None] = {}

    # -- what is needed ---------------------------------------------------------------------------
    @property
    def _align(self) -> bool:
        return self.config.use_text or self.config.use_fine

    @property
    def _map(self) -> bool:
        return self.config.use_sfcm and self._align

    def bind_dataset(self, dataset) -> None:
        """The training set: its target masks (the ``attn_list`` entry of the target text) feed the
        localisation diagnostics when it has them."""
        self.dataset = dataset

    def after_step(self, models: Models, step: int) -> None:
        self._step = step + 1

    def _diagnose_now(self) -> bool:
        every = self.config.diagnostics_every
        return every > 0 and (self._step + 1) % every == 0  # the step the loop logs as step + 1

    # -- setup ------------------------------------------------------------------------------------
    def setup(self, models: Models) -> list[torch.nn.Parameter]:
        cfg = self.config
        unet = models.unet
        ref_dtype = models.weight_dtype if cfg.reference_dtype == "auto" else _DTYPES[cfg.reference_dtype]
        # The reference path: the ORIGINAL model (copied before stage 1's weights are loaded), frozen.
        ref = copy.deepcopy(unet)
        ref.requires_grad_(False)
        ref.eval()
        torch.nn.Module.to(ref, dtype=ref_dtype)
        models.extra[REFERENCE] = ref
        if cfg.stage1_artifact is not None:
            load_stage1(unet, cfg.stage1_artifact)
        unet.requires_grad_(False)
        params = []
        for name, p in unet.named_parameters():
            if _is_attn2(name):
                p.requires_grad_(True)
                params.append(p)
        unet.train()
        # One capture mechanism on both paths, recording only what the enabled losses read.
        # (hidden: switched per step in loss)
        self.res_store = AttentionStore(query=self._align, key=cfg.use_text, probs=False, keep_grad=True)
        self.ref_store = AttentionStore(query=self._align, key=cfg.use_text, probs=self._map, keep_grad=False)
        self._handles = [install_capture(unet, self.res_store), install_capture(ref, self.ref_store)]
        return params

    # -- CLIP -------------------------------------------------------------------------------------
    def clip_preset(self, models: Models) -> str:
        """The environment the CLIP comes from (``clip_preset``, with ``auto`` resolved)."""
        from spfbench import environments

        if self.config.clip_preset != "auto":
            return self.config.clip_preset
        if models.preset is not None:
            return environments.of_preset(models.preset)[0].name
        unet = getattr(models.unet, "module", models.unet)
        cross = unet.config.cross_attention_dim
        return environments.for_text_width(max(cross) if isinstance(cross, (tuple, list)) else cross).name

    def _clip_backbones(self, models: Models):
        from spfbench.environments import get
        import spfbench.metrics.clip  # noqa: F401  (registers the clip-* loaders)

        bb = get(self.clip_preset(models)).backbones(device=models.device)
        if self.config.clip_weights is not None:
            bb.weights[bb.weight_name(f"clip-{self.config.clip_model}")] = self.config.clip_weights
        return bb

    def clip(self, models: Models):
        if self._clip is None:
            self._clip = self._clip_backbones(models).get(f"clip-{self.config.clip_model}")
            self._clip.model.requires_grad_(False)
        return self._clip

    def _caption_info(self, models: Models, base: str):
        if base not in self._phrases:
            tok = models.tokenizer
            self._phrases[base] = (split_base_phrases(base), L.phrase_token_positions(base, tok),
                                   L.base_token_positions(base, tok))
        return self._phrases[base]

    def gamma(self, models: Models, base: str, target: str) -> torch.Tensor:
        """gamma(i) of the base phrases against the target text, computed once per caption pair."""
        key = (base, target)
        if key not in self._gamma:
            phrases = self._caption_info(models, base)[0]
            clip = self.clip(models)
            self._gamma[key] = L.phrase_gamma(clip.encode_texts, phrases, target).detach().float().cpu().clone()
        return self._gamma[key]

    def target_embedding(self, models: Models, target: str) -> torch.Tensor:
        if target not in self._target_emb:
            self._target_emb[target] = self.clip(models).encode_texts([target])[0].float().clone()
        return self._target_emb[target]

    # -- per-item constants: E_I(x0) and E_base --------------------------------------------------------
    def _needs_text_base(self) -> bool:  # the reference forward (alignment losses, SFCM, diagnostics)
        return self._align or self.config.diagnostics_every > 0

    @torch.no_grad()
    def gt_embedding(self, models: Models, pixels: torch.Tensor) -> torch.Tensor:
        """E_I(x0) of L_enhanced: the CLIP image embedding (B, D) float32 of ground-truth pixels (B, 3, R, R)
        in [-1, 1], through the same differentiable preprocessing as the prediction's (``clip_preprocess``)."""
        clip = self.clip(models)
        size = clip.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else int(size)
        gt = pixels.to(models.device).float()
        return clip.model.encode_image(L.clip_preprocess(gt, size=size).to(clip.dtype)).float()

    def encoding_extras(self, models: Models) -> EncodingExtras | None:
        """With ``cache_encodings``: E_I(x0) of each item's pixels (and of their flip) and E_base of its base
        caption, stored once in the encoding cache; the key names the CLIP (preset, model and the sha256 of its
        tensors) and what is stored (the SD text encoder is already in the cache's model key)."""
        image = (lambda pixels: {GT_EMBEDDING: self.gt_embedding(models, pixels)}) if self.config.use_enhanced else None
        record = ((lambda records: {TEXT_BASE: encode_text(models, [r.base_caption for r in records]).float()})
                  if self._needs_text_base() else None)
        if image is None and record is None:
            return None
        clip = None
        if image is not None:  # the CLIP by what it computes with (its tensors), whichever file it came from
            from spfbench.metrics.base import module_sha256

            clip = f"{self.clip_preset(models)}/clip-{self.config.clip_model}/{module_sha256(self.clip(models).model)}"
        key = {"version": EXTRAS_VERSION, "clip": clip,
               "stored": [k for k, f in ((GT_EMBEDDING, image), (TEXT_BASE, record)) if f is not None]}
        return EncodingExtras(json.dumps(key, sort_keys=True), image, record)

    def _item_keys(self, batch) -> list | None:
        """(dataset index, flipped) per sample, when the batch comes from the bound training set."""
        if self.dataset is None or "index" not in batch:
            return None
        return [(int(i), bool(self.dataset.flipped(int(i)))) for i in batch["index"]]

    def batch_gt_embedding(self, models: Models, batch: dict) -> torch.Tensor:
        """E_I(x0) (B, D) of the batch: from the encoding cache, else from the in-memory cache keyed by
        (dataset index, flipped), else computed from ``pixel_values`` (and kept)."""
        if GT_EMBEDDING in batch:
            return batch[GT_EMBEDDING].to(models.device).float()
        if "pixel_values" not in batch:
            raise SpfbenchError(f"{self.name}: the batch has neither pixel_values nor {GT_EMBEDDING} (an encoding cache built without SPF's extras)")
        keys = self._item_keys(batch)
        if keys is None:
            return self.gt_embedding(models, batch["pixel_values"])
        have = {k: self._gt_emb.get(k) for k in dict.fromkeys(keys) if k in self._gt_emb}
        missing = [b for b, k in enumerate(keys) if k not in have]
        if missing:
            emb = self.gt_embedding(models, batch["pixel_values"][missing]).cpu()
            for b, e in zip(missing, emb):
                have[keys[b]] = e.clone()
                self._gt_emb.put(keys[b], have[keys[b]])
        return torch.stack([have[k] for k in keys]).to(models.device)

    def batch_text_base(self, models: Models, batch: dict) -> torch.Tensor:
        """E_base (B, 77, C): the base captions encoded alone, from the encoding cache, else from the
        in-memory cache keyed by the base caption, else encoded (and kept)."""
        if TEXT_BASE in batch:
            return batch[TEXT_BASE].to(models.device)
        bases = list(batch["base_caption"])
        have = {c: self._text_base.get(c) for c in dict.fromkeys(bases) if c in self._text_base}
        missing = [c for c in dict.fromkeys(bases) if c not in have]
        if missing:
            for c, e in zip(missing, encode_text(models, missing).cpu()):
                have[c] = e.clone()
                self._text_base.put(c, have[c])
        return torch.stack([have[c] for c in bases]).to(models.device)

    # -- the stage-2 loss -------------------------------------------------------------------------
    def loss(self, models: Models, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        ref: torch.nn.Module = models.extra[REFERENCE]
        sched = models.noise_scheduler
        latents, text = encode_batch(models, batch, generator)  # text: the complete caption, one encoding
        bases, targets = list(batch["base_caption"]), list(batch["target_text"])
        text_base = self.batch_text_base(models, batch)  # E_base alone: the reference path's only input
        # same draws, in the same order, as trainers.base.diffusion_loss
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents)
        t_max = cfg.max_timestep or sched.config.num_train_timesteps
        t = torch.randint(cfg.min_timestep, t_max, (latents.shape[0],), generator=generator, device=generator.device)
        t = t.to(latents.device)
        noisy = sched.add_noise(latents, noise, t)
        target = diffusion_target(sched, latents, noise, t)

        diagnose = self._diagnose_now()
        # the attn2 inputs are kept only on the steps that read them (the "hidden" reading, or a diagnostic step)
        self.res_store.save_hidden = self.ref_store.save_hidden = cfg.features == "hidden" or diagnose
        out_res = models.unet(noisy, t, text).sample  # response path (captures Q, K with grad)
        l_diff = torch.nn.functional.mse_loss(out_res.float(), target.float(), reduction="mean")
        numbers = {}
        latent_hw = tuple(latents.shape[-2:])

        l_text = l_fine = l_enh = None
        if self._align or diagnose:
            ref_dtype = next(ref.parameters()).dtype
            with torch.no_grad():
                out_ref = ref(noisy.to(ref_dtype), t, text_base.to(ref_dtype)).sample.float()
            names = self.res_store.names()
            m_hat = maps = None
            if self._map:
                probs = [self.ref_store[n].probs for n in names]
                maps = self.sfcm_parts(models, bases, targets, out_ref, out_res, probs, latent_hw)
                m_hat = maps.m_hat
                numbers.update({f"m_hat_{k}": v for k, v in D.map_summary(m_hat).items()})
            if diagnose:
                numbers.update(self._diagnostics(models, batch, names, noisy, t, text_base, out_ref, maps))
        if self._align:
            if cfg.features == "hidden":  # the attn2 input features in Q's place (docs/spf.md, "Readings")
                f_res = [L.split_heads(self.res_store[n].hidden, self.res_store[n].heads) for n in names]
                f_ref = [L.split_heads(self.ref_store[n].hidden, self.ref_store[n].heads) for n in names]
            else:
                f_res = f_ref = None
            q_res = [self.res_store[n].query for n in names]
            q_ref = [self.ref_store[n].query for n in names]
            if cfg.use_text:
                pos = [self._caption_info(models, b)[2] for b in bases]
                n = max(1, max(len(p) for p in pos))
                idx = torch.tensor([p + [0] * (n - len(p)) for p in pos], dtype=torch.long, device=latents.device)
                tmask = torch.tensor([[True] * len(p) + [False] * (n - len(p)) for p in pos], device=latents.device)
                l_text = L.text_consistent_loss(
                    q_ref, [self.ref_store[n].key for n in names], q_res, [self.res_store[n].key for n in names],
                    ref_token_idx=idx, res_token_idx=idx, token_mask=tmask, m_hat=m_hat, mask_mode=cfg.mask_mode,
                    norm=cfg.norm, layer_reduction=cfg.layer_reduction, latent_hw=latent_hw, v_ref=f_ref, v_res=f_res,
                )
            if cfg.use_fine:
                l_fine = L.fine_grained_loss(f_ref or q_ref, f_res or q_res, m_hat=m_hat, norm=cfg.norm,
                                             layer_reduction=cfg.layer_reduction, latent_hw=latent_hw)
        if cfg.use_enhanced:
            l_enh = self._enhanced(models, batch, noisy, out_res, t, targets)
        self.res_store.reset()
        self.ref_store.reset()

        total, parts = L.spf_loss(l_diff, l_enh, l_text, l_fine, cfg.lambda1, cfg.lambda2, cfg.lambda3)
        names_out = {"diff": "loss_diffusion", "enhanced": "loss_enhanced", "text": "loss_text", "fine": "loss_fine",
                     "total": "loss_total"}
        numbers.update({names_out[k]: v.item() for k, v in parts.items()})
        return total, numbers

    @torch.no_grad()
    def _diagnostics(self, models, batch, names, noisy, t, text_base, out_ref, maps) -> dict:
        """Logged numbers (trainers/spf_diagnostics.py): per layer, relative MSE of the attn2 input features of
        this step's two forwards (response on [E_base, E_tar], reference on E_base); the response path's noise
        prediction on E_base alone against the reference's (one extra forward, nothing recorded); M's summary;
        and, where the batch's samples have target masks, M's and M-hat's AUC and IoU."""
        feats = D.layer_relative_mse([self.ref_store[n].hidden for n in names], [self.res_store[n].hidden for n in names])
        out = {"diag_hidden_rel": sum(feats) / max(1, len(feats)), "diag_hidden_rel_layers": [round(v, 6) for v in feats]}
        with self._handles[0].using(None):
            eps_base = models.unet(noisy, t, text_base).sample.float()
        out["diag_eps_base_rel"] = D.relative_mse(out_ref, eps_base)
        if maps is not None:
            out.update({f"m_{k}": v for k, v in D.map_summary(maps.m).items()})
            masks = self._batch_target_masks(batch, list(batch["target_text"]))
            if masks is not None:
                keep, stack = masks
                for name, m in (("m", maps.m), ("m_hat", maps.m_hat)):
                    loc = D.localisation(m[keep], stack.to(m.device))
                    out[f"diag_{name}_auc"], out[f"diag_{name}_iou"] = loc["auc"], loc["iou"]
        return out

    def _batch_target_masks(self, batch, targets):
        """(indices of the batch's samples with a target mask, their (n, R, R) masks), or None."""
        if self.dataset is None or "index" not in batch:
            return None
        from .tokencompose import load_mask

        extras = batch.get("extras") or [{}] * len(targets)
        keep, masks = [], []
        for b, (idx, tgt) in enumerate(zip(batch["index"], targets)):
            idx = int(idx)
            if idx not in self._target_masks:
                path = next((mp for ph, mp in (extras[b].get("attn_list") or []) if ph == tgt and mp is not None), None)
                self._target_masks[idx] = None if path is None else load_mask(
                    self.dataset.resolve(path), self.dataset.resolution, self.dataset.center_crop)
            m = self._target_masks[idx]
            if m is None:
                continue
            if self.dataset.random_flip and self.dataset.flipped(idx):
                m = torch.flip(m, dims=[-1])
            keep.append(b)
            masks.append(m)
        return (keep, torch.stack(masks)) if keep else None

    def sfcm_parts(self, models: Models, bases, targets, out_ref, out_res, probs, latent_hw, gamma=None) -> "SfcmParts":
        """The SFCM of a batch and its parts (eq. 5-7), as ``loss`` computes it: the reference path's
        captured probabilities ``probs`` (one (B, heads, N_img, T) tensor per cross-attention layer), the
        two paths' outputs, gamma from CLIP (``gamma`` (B, P) overrides it, e.g. all ones)."""
        info = [self._caption_info(models, b) for b in bases]
        weights, pmask = L.phrase_token_matrix([i[1] for i in info], n_txt=probs[0].shape[-1])
        device = out_ref.device
        norm = self.config.sfcm_normalize
        a_base = L.phrase_attention_maps(probs, weights.to(device), latent_hw=latent_hw, normalize=norm)
        if gamma is None:
            gam = torch.ones(pmask.shape)
            for b, (base, tgt) in enumerate(zip(bases, targets)):
                g = self.gamma(models, base, tgt)
                gam[b, : g.shape[0]] = g[: gam.shape[1]]
        else:
            gam = torch.as_tensor(gamma, dtype=torch.float32).expand(pmask.shape).clone()
        parts = L.sfcm(out_ref, out_res.detach(), a_base, gam.to(device), phrase_mask=pmask.to(device),
                       normalize=norm, return_parts=True)
        return SfcmParts(parts.m_hat, parts.m, parts.exclusion, a_base, gam, pmask, [i[0] for i in info])

    def _enhanced(self, models, batch, noisy, out_res, t, targets) -> torch.Tensor:
        """L_enhanced: x0-hat decoded by the frozen VAE WITH gradients, CLIP image embedding with gradients."""
        clip = self.clip(models)
        vae, sf = models.vae, models.vae.config.scaling_factor
        vae_dtype = next(vae.parameters()).dtype
        size = clip.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else int(size)
        x0_hat = L.predict_x0(noisy, out_res, t, models.noise_scheduler)

        def embed_prediction(x0: torch.Tensor) -> torch.Tensor:
            decoded = vae.decode((x0 / sf).to(vae_dtype)).sample.float()
            return clip.model.encode_image(L.clip_preprocess(decoded, size=size).to(clip.dtype))

        if self.config.checkpoint_enhanced:
            from torch.utils.checkpoint import checkpoint

            emb_pred = checkpoint(embed_prediction, x0_hat, use_reentrant=False)
        else:
            emb_pred = embed_prediction(x0_hat)
        emb_gt = self.batch_gt_embedding(models, batch)  # the training image's, cached per item
        txt = torch.stack([self.target_embedding(models, x) for x in targets]).to(models.device)
        return L.enhanced_loss(emb_pred, emb_gt, txt)

    # -- checkpoints and artifact -----------------------------------------------------------------
    def trainable_state(self, models: Models) -> dict[str, torch.Tensor]:
        return {k: v for k, v in models.unet.state_dict().items() if _is_attn2(k)}

    def load_trainable_state(self, models: Models, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = models.unet.load_state_dict(state, strict=False)
        bad = [k for k in missing if _is_attn2(k)] + list(unexpected)
        if bad:
            raise SpfbenchError(f"{self.name} checkpoint does not match the response path's attn2 weights: {bad[:5]}")

    def save_artifact(self, models: Models, folder: Path) -> None:
        """Only what stage 2 trains: the response path's attn2 weights (``ATTN2_FILE``, fp32 safetensors), plus
        the stage-1 artifact they sit on (the config's ``stage1_artifact``, in method.json). Stage 1 changed
        every weight and keeps them in its own artifact; copying them here would double the UNet on disk
        (3.4 GB fp32 at SD1.5 size against 0.1 GB of attn2)."""
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.trainable_state(models).items()}
        save_file(state, str(Path(folder) / ATTN2_FILE), metadata={"stage1_artifact": str(self.config.stage1_artifact)})

    @classmethod
    def apply_artifact(cls, pipe, folder: Path, config: TrainConfig) -> None:
        from .naive import Naive

        folder = Path(folder)
        if (folder / "unet").is_dir():  # an artifact written before stage 2 saved only attn2: the whole UNet
            Naive.apply_artifact(pipe, folder, config)
            return
        given = getattr(config, "stage1_artifact", None)
        if given is not None:  # None: stage 2 ran on the base model itself, which the pipeline already holds
            stage1 = Path(given)
            if not (stage1 / "unet").is_dir():
                raise SpfbenchError(f"SPF artifact {folder} sits on its stage-1 artifact {stage1}, which is not there (moved or"
                                    " deleted?); put it back, or refit SPF")
            Naive.apply_artifact(pipe, stage1, config)
        from safetensors.torch import load_file

        state = load_file(str(folder / ATTN2_FILE))
        missing, unexpected = pipe.unet.load_state_dict(state, strict=False)
        if unexpected or any(_is_attn2(k) for k in missing):
            raise SpfbenchError(f"SPF artifact {folder}: its attn2 weights do not fit the base model's UNet ({(unexpected or missing)[:3]})")


ATTN2_FILE = "response_attn2.safetensors"


def load_stage1(unet: torch.nn.Module, folder: str | Path) -> None:
    """Load a stage-1 (naive) artifact's UNet weights into ``unet`` in place (device and dtype kept)."""
    from diffusers import UNet2DConditionModel

    src = UNet2DConditionModel.from_pretrained(Path(folder) / "unet", local_files_only=True)
    missing, unexpected = unet.load_state_dict(src.state_dict(), strict=False)
    if missing or unexpected:
        raise SpfbenchError(f"stage1_artifact {folder}: its UNet does not match the base model ({(missing + unexpected)[:5]})")


# -- ablations (Table 1's gray rows) -----------------------------------------------------------------


@dataclass
class SpfNoTextConfig(SpfConfig):
    use_text: bool = False


@dataclass
class SpfNoFineConfig(SpfConfig):
    use_fine: bool = False


@dataclass
class SpfNoEnhConfig(SpfConfig):
    use_enhanced: bool = False


@dataclass
class SpfNoSfcmConfig(SpfConfig):
    use_sfcm: bool = False


class SpfNoText(Spf):
    name, description, Config = "spf-no-text", "SPF-Portrait without L_M-text (ablation)", SpfNoTextConfig


class SpfNoFine(Spf):
    name, description, Config = "spf-no-fine", "SPF-Portrait without L_M-fine (ablation)", SpfNoFineConfig


class SpfNoEnh(Spf):
    name, description, Config = "spf-no-enh", "SPF-Portrait without L_enhanced (ablation)", SpfNoEnhConfig


class SpfNoSfcm(Spf):
    name, description, Config = "spf-no-sfcm", "SPF-Portrait, alignment without the SFCM (ablation)", SpfNoSfcmConfig
