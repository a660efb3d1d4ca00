"""Portrait World's ground-truth metrics, read by the world's attribute reader (docs/world.md).

In Portrait World every attribute of an image is known or can be read back exactly by the shipped
attribute reader (``spfbench/world/weights/reader.safetensors``, accuracy on its card). Two metrics
beside Table 1's eight, both per triple, both on a 0-1 scale (mean = a rate):

* ``gt-target@world-reader`` (responsiveness, higher is better): 1 when the reader finds the triple's
  target attribute with the target's value in the customized image ("a hat" -> headwear = hat), else 0.
* ``gt-preserve@world-reader`` (preservation, higher is better): the share of the *other* attributes
  (every schema attribute except the target's own) that the reader reads the same on the original and
  on the customized image. Both images are read, not compared with the caption: the original model's
  own choices (hair colour, pose, ... that no caption names) are what must be kept. ``compute()`` also
  gives the rate per attribute (``per_attribute``): which attributes moved.

A target text that is not a world target (``TARGET_TEXTS``) makes the triple a recorded failure.
"""

from __future__ import annotations

import torch

from ..metrics.base import Backbones, Batch, PairwiseMetric, PerSampleMetric

READER = "world-reader"


@Backbones.register(READER)
def _load_reader(bb: Backbones):
    from .reader import load_reader

    return load_reader(bb.weight_path(READER)).to(bb.device)


def _target(text: str):
    from .attributes import TARGET_TEXTS

    return TARGET_TEXTS.get(text.strip().lower())


class GtTarget(PerSampleMetric):
    id, column, higher_is_better = "gt-target@world-reader", "GT-Target", True
    tradeoff_axis = "response"

    def score(self, batch: Batch) -> list[float | None]:
        read = self.backbones.get(READER).read(batch.customized)
        out: list[float | None] = []
        for tid, text, attrs in zip(batch.ids, batch.target_texts, read):
            target = _target(text)
            if target is None:
                self.reasons[tid] = f"target text {text!r} is not a Portrait World target"
                out.append(None)
            else:
                out.append(float(attrs[target[0]] == target[1]))
        return out


class GtPreserve(PairwiseMetric):
    """The original's side: the reader's read of it, one int64 value index per attribute (schema order)."""

    id, column, higher_is_better = "gt-preserve@world-reader", "GT-Preserve", True
    tradeoff_axis = "preservation"

    def reset(self) -> None:
        super().reset()
        self.agree: dict[str, dict[str, bool]] = {}  # triple id -> attribute -> same on both images

    def feature_backbones(self) -> tuple[str, ...]:
        return (READER,)

    def original_features(self, ids: list[str], images: list) -> dict[str, dict[str, torch.Tensor]]:
        schema = self.backbones.get(READER).schema
        reads = self.backbones.get(READER).read(images)
        return {tid: {k: torch.tensor(schema[k].index(v), dtype=torch.int64) for k, v in r.items()} for tid, r in zip(ids, reads)}

    def score_pairs(self, batch: Batch, features: list[dict[str, torch.Tensor]]) -> list[float | None]:
        reader = self.backbones.get(READER)
        before = [{k: reader.schema[k][int(f[k])] for k in reader.schema} for f in features]
        after = reader.read(batch.customized)
        out: list[float | None] = []
        for tid, text, a, b in zip(batch.ids, batch.target_texts, before, after):
            target = _target(text)
            if target is None:
                self.reasons[tid] = f"target text {text!r} is not a Portrait World target"
                out.append(None)
                continue
            same = {k: a[k] == b[k] for k in a if k != target[0]}
            self.agree[tid] = same
            out.append(sum(same.values()) / len(same))
        return out

    def state(self) -> dict:
        return {**super().state(), "agree": {t: dict(v) for t, v in self.agree.items()}}

    def merge(self, state: dict) -> None:
        super().merge(state)
        self.agree.update(state.get("agree", {}))

    def compute(self) -> dict:
        result = super().compute()
        counts: dict[str, list[int]] = {}
        for same in self.agree.values():
            for k, v in same.items():
                c = counts.setdefault(k, [0, 0])
                c[0] += int(v)
                c[1] += 1
        result["per_attribute"] = {k: c[0] / c[1] for k, c in counts.items()}
        return result
