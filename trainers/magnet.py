"""magnet: Magnet (NeurIPS 2024, I2-Multimedia-Lab/Magnet) on top of a UNet, applied at generation time.

Magnet is training-free: it edits only the object-noun token embeddings of the prompt. For each
(object, attribute) pair of the caption, with ``concept = "attribute object"``:

* ``omega = cos(E(concept)[EOT], E(concept)[-1])`` (EOT and last padding position of the concept encoded
  alone), ``alpha = exp(lam - omega)``, ``beta = 1 - omega**2``;
* neighbours: the ``top_k`` objects of a candidate bank closest (cosine) to the object's embedding
  (``emb(w)``: the embedding of the last word before EOT of ``w`` encoded alone);
* ``v+ = mean_k[emb("attribute o_k") - emb(o_k)]``; for every *other* pair j with an attribute,
  ``v-_j = mean_k[emb("attribute_j o_k") - emb(o_k)]`` (the same neighbours o_k of this object);
* the object's (last) token embedding in the prompt: ``e += alpha v+ - beta sum_j v-_j``.

SOT, every other word, EOT, padding and the unconditional embedding are unchanged.

The trained part is naive fine-tuning (``base="naive"``, the default): ``spfbench train --method magnet``
trains the full UNet exactly as ``naive`` and the artifact is that UNet plus the Magnet config, unless
``naive_artifact`` names a finished naive artifact: then nothing trains and that UNet is used
(``spfbench run`` fills it with the run's own naive fit, so Table 1's Naive and Magnet rows share one
UNet and it is trained once). With ``base="original"`` nothing trains either (the base model's UNet).
Why and the deviations from the official code: docs/_fragments/magnet.md.

Per caption what happened is the generation note of its triple (``Artifact.generate`` returns them beside the
images; the runner writes them to ``notes/ID.json``): the pairs found with their token, omega, alpha, beta and neighbours, and
``fallback`` (a reason, or None) when the caption yielded no usable pair and plain embeddings were used.
"""

from __future__ import annotations

import math
import weakref
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from spfbench.errors import SpfbenchError

from .base import Models, TrainConfig, write_untrained_artifact
from .naive import Naive, NaiveConfig

# Portrait nouns Magnet's default bank lacks (REFERENCE.md section 4), then everyday objects in the spirit of
# the official candidate list; the vocabulary's garments and "background" are added by object_bank().
PORTRAIT_NOUNS = (
    "man", "woman", "girl", "boy", "person", "child", "lady", "gentleman", "face", "hair", "eyes", "eye",
    "beard", "mustache", "moustache", "goatee", "stubble", "sideburns", "lips", "lipstick", "nose", "mouth",
    "cheeks", "skin", "freckles", "wrinkles", "eyebrows", "eyeliner", "makeup", "blush", "ponytail", "bun",
    "hat", "cap", "beanie", "beret", "glasses", "sunglasses", "monocle", "earrings", "necklace", "choker",
    "bracelet", "ring", "scarf", "tie", "coat", "cardigan", "blazer", "jacket", "vest", "gloves",
)
GENERAL_NOUNS = (
    "car", "bus", "bicycle", "dog", "cat", "bird", "horse", "apple", "banana", "orange", "cup", "bottle",
    "chair", "table", "bench", "book", "phone", "clock", "vase", "flower", "tree", "house", "ball", "bag",
    "umbrella", "guitar", "violin", "camera", "lamp", "box", "wall", "window", "door", "sky", "bed", "sofa",
)
ARTICLES = {"a", "an", "the"}
LEADS = {"and", "with", "in", "wearing"}


@lru_cache(maxsize=None)
def object_bank(vocab: str = "v1") -> tuple[str, ...]:
    """The candidate objects (lower case, no duplicates): portrait nouns, everyday objects, the vocabulary's
    garments (last word) and "background"."""
    from spfbench.captions import load_vocab

    garments = [g.split()[-1].lower() for g in load_vocab(vocab)["clothing_garments"]]
    return tuple(dict.fromkeys([*PORTRAIT_NOUNS, *GENERAL_NOUNS, *garments, "background"]))


@lru_cache(maxsize=None)
def _actions(vocab: str = "v1") -> frozenset[str]:
    from spfbench.captions import load_vocab

    return frozenset(a.lower() for a in load_vocab(vocab)["actions"])


@dataclass(frozen=True)
class Pair:
    object: str  # the noun as written in the caption
    attribute: str  # "" when the object has none
    start: int  # character span of the noun in the caption
    end: int

    @property
    def concept(self) -> str:
        return f"{self.attribute} {self.object}".strip()


def parse_pairs(caption: str, nouns=None, vocab: str = "v1") -> list[Pair]:
    """Rule-based (object, attribute) pairs of a caption of our shape ("A young woman, playing a guitar, with
    a red background, in a white T-shirt, blonde hair"). Segments are split at commas and " and "; a
    segment's leading "with"/"in"/"wearing" and article are dropped; a segment that is ``[modifiers] noun``
    with the noun in the bank gives the pair (noun, modifiers). Segments that are a vocabulary action, hold
    an article inside (verb phrases: "reading a book") or do not end with a bank noun give nothing."""
    nouns = set(object_bank(vocab) if nouns is None else (n.lower() for n in nouns))
    pairs = []
    for seg in re.finditer(r"[^,.;]+", caption):
        for chunk in re.finditer(r"(?:(?! and ).)+", seg.group()):
            text = chunk.group().strip().lower()
            if not text or text in _actions(vocab):
                continue
            base = seg.start() + chunk.start()
            words = [(m.group(), base + m.start(), base + m.end()) for m in re.finditer(r"[A-Za-z0-9][\w'-]*", chunk.group())]
            while words and words[0][0].lower() in LEADS:
                words = words[1:]
            if words and words[0][0].lower() in ARTICLES:
                words = words[1:]
            if not words or any(w.lower() in ARTICLES for w, _, _ in words):
                continue
            noun, s, e = words[-1]
            if noun.lower() not in nouns:
                continue
            pairs.append(Pair(noun, " ".join(w for w, _, _ in words[:-1]), s, e))
    return pairs


@dataclass
class MagnetConfig(NaiveConfig):
    base: str = "naive"  # naive: Magnet on the naive fine-tuned UNet (trained here); original: the base model's UNet
    naive_artifact: str | None = None  # base="naive": a finished naive artifact to use instead of training one
    top_k: int = 5  # official K
    lam: float = 0.6  # official lambda

    def validate(self) -> None:
        super().validate()
        if self.base not in ("naive", "original"):
            raise SpfbenchError(f"base must be naive or original, got {self.base!r}")
        if self.top_k < 1:
            raise SpfbenchError(f"top_k must be at least 1, got {self.top_k}")
        if self.naive_artifact is not None:
            if self.base != "naive":
                raise SpfbenchError("naive_artifact applies to base='naive' only")
            if not (Path(self.naive_artifact) / "unet").is_dir():
                raise SpfbenchError(f"naive_artifact {self.naive_artifact}: no unet/ folder (give a naive artifact, OUT/artifact)")


# -- embeddings -------------------------------------------------------------------------------------


def _encode(pipe, texts: list[str]) -> torch.Tensor:
    """Prompt embeddings exactly as the pipeline computes them (no classifier-free guidance)."""
    with torch.no_grad():
        return pipe.encode_prompt(texts, pipe.device, 1, False)[0].float()


def _eot_index(tokenizer, text: str) -> int:
    ids = tokenizer(text, max_length=tokenizer.model_max_length, truncation=True).input_ids
    return len(ids) - 1


def word_embeddings(pipe, texts: list[str]) -> torch.Tensor:
    """emb(text): the embedding of the last word before EOT of each text encoded alone, (N, D) float32."""
    if not texts:
        return torch.zeros(0, 0)
    enc = _encode(pipe, texts)
    idx = torch.tensor([_eot_index(pipe.tokenizer, t) - 1 for t in texts], device=enc.device)
    return enc[torch.arange(len(texts), device=enc.device), idx]


_BANKS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()  # text encoder -> bank -> embeddings


def bank_embeddings(pipe, bank: tuple[str, ...]) -> torch.Tensor:
    """The bank's embeddings, encoded once per text encoder (a memo keyed weakly by the encoder: nothing is
    stored on the model, and the memo goes with it)."""
    cache = _BANKS.setdefault(pipe.text_encoder, {})
    if bank not in cache:
        cache[bank] = word_embeddings(pipe, list(bank))
    return cache[bank]


def omega(pipe, concept: str) -> float:
    e = _encode(pipe, [concept])[0]
    return F.cosine_similarity(e[_eot_index(pipe.tokenizer, concept)], e[-1], dim=0).item()


def magnet_embeddings(pipe, captions: list[str], config: MagnetConfig | None = None, negative_prompt: str = "",
                      bank: tuple[str, ...] | None = None):
    """(conditional, unconditional, records): the Magnet-edited prompt embeddings of ``captions``, the plain
    embeddings of ``negative_prompt`` (unchanged), and one record per caption (see the module doc)."""
    config = config or MagnetConfig()
    bank = bank or object_bank()
    cond, uncond = pipe.encode_prompt(captions, pipe.device, 1, True, [negative_prompt] * len(captions))
    cond = cond.clone()
    bank_emb = bank_embeddings(pipe, bank)
    records = []
    for b, caption in enumerate(captions):
        rec = {"caption": caption, "pairs": [], "skipped": [], "fallback": None}
        records.append(rec)
        usable = []
        for p in parse_pairs(caption, bank):
            pos = len(pipe.tokenizer(caption[: p.end], add_special_tokens=False).input_ids)
            if pos >= pipe.tokenizer.model_max_length - 1:
                rec["skipped"].append({"object": p.object, "reason": "truncated by the 77-token limit"})
            else:
                usable.append((p, pos))
        if not usable:
            rec["fallback"] = "no (object, attribute) pair found: plain embeddings"
            continue
        deltas = []
        for i, (p, pos) in enumerate(usable):
            subj = word_embeddings(pipe, [p.object.lower()])[0]
            sims = F.cosine_similarity(bank_emb, subj[None], dim=-1)
            nb = sims.topk(min(config.top_k, len(bank))).indices.tolist()
            neighbours = [bank[k] for k in nb]
            w = omega(pipe, p.concept)
            alpha, beta = math.exp(config.lam - w), 1 - w**2

            def direction(attribute):
                return (word_embeddings(pipe, [f"{attribute} {o}" for o in neighbours]) - bank_emb[nb]).mean(0)

            delta = torch.zeros_like(subj)
            if p.attribute:
                delta = delta + alpha * direction(p.attribute)
            for j, (q, _) in enumerate(usable):
                if j != i and q.attribute:
                    delta = delta - beta * direction(q.attribute)
            deltas.append((pos, delta))
            rec["pairs"].append({"object": p.object, "attribute": p.attribute, "token": pos, "omega": w,
                                 "alpha": alpha, "beta": beta, "neighbours": neighbours})
        for pos, delta in deltas:  # applied after all are computed
            cond[b, pos] = (cond[b, pos].float() + delta).to(cond.dtype)
    return cond, uncond, records


class Magnet(Naive):
    name = "magnet"
    description = "Magnet (training-free object-embedding edit) at generation time on the naive fine-tuned UNet"
    Config = MagnetConfig
    requires = {"naive_artifact": "naive"}

    @classmethod
    def fit(cls, config: dict, data, out: Path, *, progress: bool = True, source: str = "config", **trainer_kwargs) -> Path:
        cfg = cls.Config.from_dict(dict(config), source=source)
        if cfg.base == "original" or cfg.naive_artifact is not None:  # nothing to train
            return write_untrained_artifact(cls.name, cfg, Path(out) / "artifact")
        return super().fit(config, data, out, progress=progress, source=source, **trainer_kwargs)

    def setup(self, models: Models) -> list[torch.nn.Parameter]:
        if self.config.base == "original":
            raise SpfbenchError("magnet with base='original' trains nothing: write its artifact with "
                                "trainers.magnet.Magnet.write_original_artifact(folder) instead of training")
        return super().setup(models)

    @classmethod
    def write_original_artifact(cls, folder, config: MagnetConfig | None = None) -> Path:
        """An artifact for Magnet on the original model's UNet (no weights, only ``method.json``)."""
        config = config or MagnetConfig(base="original")
        if config.base != "original":
            raise SpfbenchError("write_original_artifact needs base='original'")
        config.validate()
        return write_untrained_artifact(cls.name, config, folder)

    @classmethod
    def apply_artifact(cls, pipe, folder: Path, config: TrainConfig) -> None:
        if config.base == "naive":
            Naive.apply_artifact(pipe, Path(config.naive_artifact or folder), config)

    @classmethod
    def generate_images(cls, pipe, triples, settings, config: TrainConfig):
        """The edited embeddings of each triple's caption (``config``: top_k, lambda), then generation with them;
        the notes say per triple which object/attribute pairs were edited or why it fell back."""
        from spfbench.generation import generate

        cond, uncond, records = magnet_embeddings(pipe, [t.target_caption for t in triples], config, settings.negative_prompt)
        return generate(pipe, None, [t.seed for t in triples], settings, prompt_embeds=cond, negative_prompt_embeds=uncond), records
