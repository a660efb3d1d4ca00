"""Seg-Cons (preservation, higher is better): segmentation consistency of original and customized image.

SPF-Portrait publishes no formula for Seg-Cons, so spfbench fixes one (docs/metrics.md):

1. **Masks.** segment-anything 1.0's ``SamAutomaticMaskGenerator`` on each image, with the library's
   default parameters (:data:`GENERATOR_PARAMS`: a 32 x 32 point grid, ``pred_iou_thresh=0.88``,
   ``stability_score_thresh=0.95``, ``stability_score_offset=1.0``, ``box_nms_thresh=0.7``, no crops,
   ``min_mask_region_area=0``) and SAM ViT-H (``sam_vit_h_4b8939.pth``), in float32. Input: the PIL
   image as RGB uint8 at its stored resolution; SAM resizes the longest side to 1024 and pads. Masks are
   boolean at the image's resolution; masks with zero area are dropped.
2. **Value.** ``Seg-Cons = 100 * max_M sum_{(i,j) in M} IoU_ij * (|A_i| + |B_j|) / (sum_i |A_i| + sum_j |B_j|)``
   with ``A_1..A_m`` the original's masks, ``B_1..B_n`` the customized image's,
   ``IoU_ij = |A_i & B_j| / |A_i | B_j|``, and ``M`` ranging over one-to-one matchings of ``min(m, n)`` pairs
   (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment(maximize=True)`` on the matrix
   ``IoU_ij (|A_i| + |B_j|)``): the IoU of each matched pair weighted by the pair's total area, every
   unmatched mask counted as IoU 0 with its own area. Range 0-100; 100 when both images give the same
   masks; symmetric in the two images. One image with masks and the other without gives 0. Mean over triples.

Failures (value ``None`` with a reason, never dropped): original and customized of different sizes
(never resized), and no mask in either image ("no masks in either image").

Speed: the image encoder (ViT-H at 1024 x 1024) dominates. A batch's originals (the cacheable
:meth:`SegCons.original_features`: their masks, bit-packed), then its customized images, go through the
encoder in chunks of :attr:`SegCons.encoder_batch`, exactly as
``SamPredictor.set_image`` prepares one image (``ResizeLongestSide`` + ``Sam.preprocess``); then each
image's mask generation runs the stock generator on its precomputed embedding (a ``SamPredictor``
whose ``set_image`` takes the embedding instead of recomputing it). The prompts of one image run
through the decoder in batches of ``points_per_batch``.

Tiny preset (tests): a small random SAM built from segment-anything's own modules (64 px input, 8 px
patches) and generator thresholds switched off (random weights predict no mask that passes SAM's
quality filters): :data:`TINY_GENERATOR_PARAMS`.

Preset ``full-random`` (throughput at real size): ``sam_model_registry[kind](checkpoint=None)`` (ViT-H:
641 M parameters, 1024 px encoder) with segment-anything's own initialisation under a fixed seed, and the
real :data:`GENERATOR_PARAMS` (32 x 32 points through the decoder per image). Random weights pass
SAM's quality filters rarely, so the per-mask work after filtering (RLE encoding, NMS, matching) is
smaller than on real portraits.
"""

from __future__ import annotations

from functools import partial
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from ..errors import MissingWeightsError, SpfbenchError
from .base import Backbones, Batch, PairwiseMetric, seeded

# kind -> (checkpoint file, URL, approximate size); the files are plain state dicts of tensors.
SAM_WEIGHTS = {
    "vit_h": ("sam_vit_h_4b8939.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth", "2.56 GB"),
    "vit_b": ("sam_vit_b_01ec64.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth", "375 MB"),
}
# Sam's two non-persistent buffers (not in the checkpoints): the values ``build_sam`` passes.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

# SamAutomaticMaskGenerator's own defaults, written out so a library change cannot move them silently.
# ``points_per_batch`` only sets how many prompts go through the decoder at once (speed, not values).
GENERATOR_PARAMS = {
    "points_per_side": 32,
    "points_per_batch": 64,
    "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95,
    "stability_score_offset": 1.0,
    "box_nms_thresh": 0.7,
    "crop_n_layers": 0,
    "min_mask_region_area": 0,
}
# Tiny random SAM: quality filters off (0 disables them) and NMS off (box IoU never exceeds 1), so the
# 4 x 4 grid yields up to 48 masks per image and matching runs on real mask sets.
TINY_GENERATOR_PARAMS = {**GENERATOR_PARAMS, "points_per_side": 4, "pred_iou_thresh": 0.0,
                         "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}


def weight_name(kind: str) -> str:
    """The weight-file name used by ``spfbench weights`` and ``--weights NAME=PATH``: ``sam-vit-h``."""
    return "sam-" + kind.replace("_", "-")


def sam_checkpoint_path(kind: str, bb: Backbones | None = None) -> Path:
    """``--weights sam-vit-h=PATH`` if given, else ``torch.hub.get_dir()/checkpoints/<file>``."""
    given = bb.weight_path(weight_name(kind)) if bb else None
    return Path(given) if given else Path(torch.hub.get_dir()) / "checkpoints" / SAM_WEIGHTS[kind][0]


def load_sam(kind: str, path: Path | str, device: str | torch.device = "cpu"):
    """SAM of ``kind`` from a local checkpoint: checked for presence, read without unpickling code, strict.

    The model is built by ``sam_model_registry[kind](checkpoint=None)`` on the meta device (no 2.5 GB
    random init), the checkpoint's tensors are assigned strictly (every key, no extra key, same shapes),
    and the two non-persistent pixel-normalisation buffers are set to ``build_sam``'s values.
    """
    import segment_anything

    file, url, size = SAM_WEIGHTS[kind]
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(
            f"missing weights: SAM {kind} checkpoint {path} ({file}, {size}); download {url} into {path.parent}"
            f" (or set TORCH_HOME, or pass --weights {weight_name(kind)}=/path/to/{file})"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file, or a pickle holding code
        raise SpfbenchError(f"cannot read SAM checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if not isinstance(state, dict):
        raise SpfbenchError(f"SAM checkpoint {path} holds a {type(state).__name__}, not a state dict")
    with torch.device("meta"):
        sam = segment_anything.sam_model_registry[kind](checkpoint=None)
    try:
        result = sam.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise SpfbenchError(f"SAM checkpoint {path} does not fit {kind}: {' '.join(str(e).split())[:300]}") from e
    if result.missing_keys or result.unexpected_keys:
        raise SpfbenchError(
            f"SAM checkpoint {path} does not match {kind}: {len(result.missing_keys)} missing keys"
            f" (e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )
    sam.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1), persistent=False)
    sam.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1), persistent=False)
    left = [n for n, t in chain(sam.named_parameters(), sam.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"SAM {kind}: tensors not loaded from {path}: {left[:5]}")
    return sam.to(device).eval()


def tiny_sam(seed: int = 0, img_size: int = 64, patch_size: int = 8, dim: int = 32, depth: int = 2,
             global_attn_indexes: tuple[int, ...] = (1,)):
    """A small random SAM of segment-anything's own modules, wired as ``build_sam`` wires the real ones.

    With ``depth=32, global_attn_indexes=(7, 15, 23, 31)`` its parameter names equal ViT-H's (only the
    widths differ), which the checkpoint-loading test uses.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = img_size // patch_size
    with seeded(seed):
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=img_size, patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=2, mlp_ratio=2,
                out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                window_size=4, global_attn_indexes=global_attn_indexes,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size), mask_in_chans=4
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2 * dim, num_heads=2),
                transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim,
            ),
        )  # pixel mean/std: Sam's defaults, the values build_sam passes
    return sam.eval()


FULL_RANDOM_SEED = 0


def full_random_sam(kind: str, seed: int = FULL_RANDOM_SEED, device: str | torch.device = "cpu"):
    """SAM ``kind`` as ``sam_model_registry[kind](checkpoint=None)`` builds it (published architecture,
    ``build_sam``'s pixel mean/std), segment-anything's random initialisation under ``seed``.
    ``device="meta"``: shapes only."""
    import segment_anything

    with seeded(seed), torch.device(device):
        sam = segment_anything.sam_model_registry[kind](checkpoint=None)
    return sam.eval()


def _load(bb: Backbones, kind: str):
    if not bb.full_size:
        return tiny_sam(seed=0).to(bb.device)
    if bb.random_weights:
        return full_random_sam(kind, device=bb.init_device).to(bb.device)
    return load_sam(kind, sam_checkpoint_path(kind, bb), bb.device)


for _kind in SAM_WEIGHTS:
    Backbones.register(weight_name(_kind))(lambda bb, k=_kind: _load(bb, k))


# ---------------------------------------------------------------------------------------------------
# Matching (pure, on boolean masks)


def _stack(masks) -> np.ndarray:
    """A list of (H, W) masks or an (N, H, W) array -> (N, H*W) bool, zero-area masks dropped."""
    arr = np.asarray(masks, dtype=bool)
    if arr.size == 0 and arr.ndim < 3:
        return np.zeros((0, 0), dtype=bool)
    if arr.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {arr.shape}")
    flat = arr.reshape(arr.shape[0], arr.shape[1] * arr.shape[2])
    return flat[flat.any(axis=1)]


def iou_matrix(masks_a, masks_b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(IoU (m, n), areas of A (m,), areas of B (n,)) for nonzero masks, in float64; zero-area masks dropped."""
    a, b = _stack(masks_a), _stack(masks_b)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b))), a.sum(1, dtype=np.float64), b.sum(1, dtype=np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"mask sets differ in size: {np.shape(masks_a)[1:]} vs {np.shape(masks_b)[1:]}")
    # Pixel counts as a matrix product; float32 sums of 0/1 are exact below 2**24 pixels.
    ftype = np.float32 if max(a.shape[1], b.shape[1]) < 2**24 else np.float64
    fa, fb = a.astype(ftype), b.astype(ftype)
    inter = (fa @ fb.T).astype(np.float64)
    area_a, area_b = fa.sum(1, dtype=np.float64), fb.sum(1, dtype=np.float64)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, 1.0), area_a, area_b


def seg_consistency(masks_a, masks_b) -> float | None:
    """Area-weighted IoU (0-100) of two mask sets matched one-to-one by the Hungarian algorithm.

    ``100 * sum_{(i,j) in M} IoU_ij (|A_i| + |B_j|) / (sum_i |A_i| + sum_j |B_j|)``, ``M`` the one-to-one
    assignment maximising that same weighted sum (scipy ``linear_sum_assignment`` on the matrix
    ``IoU_ij (|A_i| + |B_j|)``), so the value is the best matching's. Unmatched masks count with IoU 0.
    ``None`` when neither set has a mask of nonzero area; 0.0 when only one set has masks.
    """
    from scipy.optimize import linear_sum_assignment

    iou, area_a, area_b = iou_matrix(masks_a, masks_b)
    total = area_a.sum() + area_b.sum()
    if total == 0:
        return None
    if iou.size == 0:
        return 0.0
    weighted = iou * (area_a[:, None] + area_b[None, :])
    rows, cols = linear_sum_assignment(weighted, maximize=True)
    return float(100.0 * weighted[rows, cols].sum() / total)


# ---------------------------------------------------------------------------------------------------
# Mask generation with a batched image encoder


def _embedding_predictor(model):
    """A ``SamPredictor`` whose next ``set_image`` uses an embedding computed beforehand (see :class:`SamMasks`)."""
    from segment_anything import SamPredictor

    class EmbeddingPredictor(SamPredictor):
        pending: tuple | None = None

        def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
            if self.pending is None:
                raise RuntimeError("no precomputed SAM embedding for this image")
            features, input_size, original_size = self.pending
            self.pending = None
            if tuple(image.shape[:2]) != original_size or image_format != self.model.image_format:
                raise RuntimeError(f"precomputed SAM embedding is for a {original_size} image, got {image.shape[:2]}")
            self.reset_image()
            self.original_size, self.input_size = original_size, input_size
            self.features, self.is_image_set = features, True

    return EmbeddingPredictor(model)


class SamMasks:
    """``SamAutomaticMaskGenerator`` masks for many images, the image encoder run on batches of them.

    Equal to ``SamAutomaticMaskGenerator(model, **params).generate(image)`` per image (a test checks it):
    images are prepared as ``SamPredictor.set_image`` does (``ResizeLongestSide`` to the encoder size,
    ``Sam.preprocess``: normalise, pad to a square), encoded ``encoder_batch`` at a time, and each
    embedding is handed to the stock generator. Needs ``crop_n_layers=0`` (one crop: the whole image).
    """

    def __init__(self, model, params: dict, encoder_batch: int = 8):
        from segment_anything import SamAutomaticMaskGenerator
        from segment_anything.utils.transforms import ResizeLongestSide

        if params.get("crop_n_layers", 0) != 0:
            raise ValueError("precomputed embeddings cover the whole image only: crop_n_layers must be 0")
        self.model, self.encoder_batch = model, max(1, int(encoder_batch))
        self.generator = SamAutomaticMaskGenerator(model, **params)
        self.generator.predictor = _embedding_predictor(model)
        self.transform = ResizeLongestSide(model.image_encoder.img_size)

    @torch.no_grad()
    def embed(self, images: list[np.ndarray]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """(embedding (1, C, h, w), resized input size) per HWC uint8 RGB image."""
        device = self.model.device
        inputs, sizes = [], []
        for image in images:
            x = torch.as_tensor(self.transform.apply_image(image), device=device).permute(2, 0, 1).contiguous()[None]
            sizes.append(tuple(x.shape[-2:]))
            inputs.append(self.model.preprocess(x))  # padded to img_size x img_size: any sizes stack
        feats = []
        for start in range(0, len(inputs), self.encoder_batch):
            feats.extend(self.model.image_encoder(torch.cat(inputs[start:start + self.encoder_batch])).split(1))
        return list(zip(feats, sizes))

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Boolean masks (N_k, H_k, W_k) per image, in the generator's output order."""
        out = []
        for image, (features, input_size) in zip(images, self.embed(images)):
            self.generator.predictor.pending = (features, input_size, tuple(image.shape[:2]))
            records = self.generator.generate(image)
            h, w = image.shape[:2]
            out.append(np.stack([r["segmentation"] for r in records]) if records else np.zeros((0, h, w), dtype=bool))
        return out


def to_rgb_array(image) -> np.ndarray:
    """PIL -> HWC uint8 RGB (SAM's expected input)."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


class SegCons(PairwiseMetric):
    id, column, higher_is_better = "seg-cons@sam-vit-h", "Seg-Cons", True
    kind = "vit_h"
    encoder_batch = 8  # images per image-encoder call (ViT-H at 1024^2: about 1 GB of attention per image)

    def __init__(self, backbones: Backbones, generator_params: dict | None = None):
        preset_params = GENERATOR_PARAMS if backbones.full_size else TINY_GENERATOR_PARAMS
        self.generator_params = {**preset_params, **(generator_params or {})}
        self._masks: SamMasks | None = None
        super().__init__(backbones)

    def masks(self, images) -> list[np.ndarray]:
        """SAM automatic masks, boolean (N, H, W), for each PIL image."""
        if self._masks is None:
            model = self.backbones.get(weight_name(self.kind))
            self._masks = SamMasks(model, self.generator_params, self.encoder_batch)
        return self._masks([to_rgb_array(im) for im in images])

    def feature_backbones(self) -> tuple[str, ...]:
        return (weight_name(self.kind),)

    def feature_spec(self) -> dict:
        return {"generator_params": dict(sorted(self.generator_params.items()))}

    def original_features(self, ids: list[str], images: list) -> dict[str, dict[str, torch.Tensor]]:
        """``masks``: the original's masks bit-packed row-wise (uint8 (N, ceil(H*W/8)), ``np.packbits``)
        and ``shape`` (int64 [N, H, W])."""
        out = {}
        for tid, m in zip(ids, self.masks(images)):
            flat = np.packbits(m.reshape(m.shape[0], m.shape[1] * m.shape[2]), axis=1)
            out[tid] = {"masks": torch.from_numpy(np.ascontiguousarray(flat)), "shape": torch.tensor(m.shape, dtype=torch.int64)}
        return out

    def score_pairs(self, batch: Batch, features: list[dict[str, torch.Tensor]]) -> list[float | None]:
        out: list[float | None] = [None] * len(batch)
        ok = []
        for i, (a, b) in enumerate(zip(batch.originals, batch.customized)):
            if a.size != b.size:
                self.reasons[batch.ids[i]] = f"sizes differ: original {a.size}, customized {b.size}"
            else:
                ok.append(i)
        if not ok:
            return out
        for i, mb in zip(ok, self.masks([batch.customized[i] for i in ok])):
            n, h, w = features[i]["shape"].tolist()
            ma = np.unpackbits(features[i]["masks"].numpy(), axis=1, count=h * w).astype(bool).reshape(n, h, w)
            out[i] = seg_consistency(ma, mb)
            if out[i] is None:
                self.reasons[batch.ids[i]] = "no masks in either image"
            else:
                self.reasons.pop(batch.ids[i], None)  # scored now: an earlier failure no longer applies
        return out


class SegConsVitB(SegCons):
    """The same definition with SAM ViT-B (``sam_vit_b_01ec64.pth``): cheaper, values not comparable to ViT-H's."""

    id, kind = "seg-cons@sam-vit-b", "vit_b"


def weight_rows() -> list[dict]:
    rows = []
    for kind in ("vit_h", "vit_b"):
        file, url, size = SAM_WEIGHTS[kind]
        path = sam_checkpoint_path(kind)
        rows.append({"group": "metric", "name": weight_name(kind), "what": f"SAM {kind.replace('_', '-').upper()} (segment-anything) for Seg-Cons",
                     "source": url, "size": size, "present": path.is_file(), "path": str(path)})
    return rows
