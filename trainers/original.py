"""original: the base model itself, given the complete caption (no customization; a reference row).

Nothing is trained: the artifact is only ``method.json`` and generation is the base pipeline with the
complete caption (base text + target text) and the triple's seed. Its Table 1 row shows what the
un-customized model does with the target text: the responsiveness floor, and how far an added, unknown
phrase alone moves the image from the original (the preservation a method has to beat). It is not
ranked (``spfbench.table1.is_ablation``): it is a reference, not a competitor.
"""

from __future__ import annotations

from pathlib import Path

from .base import Method, TrainConfig, write_untrained_artifact


class Original(Method):
    name = "original"
    description = "the base model with the complete caption, untrained (reference row, not ranked)"
    Config = TrainConfig

    @classmethod
    def fit(cls, config: dict, data, out: Path, *, progress: bool = True, source: str = "config", **trainer_kwargs) -> Path:
        return write_untrained_artifact(cls.name, cls.Config.from_dict(dict(config), source=source), Path(out) / "artifact")

    @classmethod
    def apply_artifact(cls, pipe, folder: Path, config: TrainConfig) -> None:
        pass  # the base pipeline as loaded
