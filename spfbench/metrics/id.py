"""ID (identity preservation, higher is better): ArcFace cosine of the main faces, insightface ``buffalo_l``.

Per triple, on the original and on the customized image separately:

1. PIL RGB -> uint8 **BGR** array (insightface's convention: its models swap to RGB inside).
2. Face detection: SCRFD ``det_10g.onnx`` through insightface's own ``SCRFD`` class, ``det_size=(640, 640)``
   (the image is letterboxed into 640x640; insightface 2.1 would otherwise default to two sizes,
   128 and 640), score threshold 0.5, NMS 0.4 (the library defaults).
3. Main face: the detected box with the largest area ``(x2 - x1) * (y2 - y1)`` in image pixels; ties go to
   the higher detector score (boxes come sorted by score).
4. Alignment: ``insightface.utils.face_align.norm_crop`` with the face's 5 landmarks to 112x112 (a
   similarity transform onto the ArcFace template), exactly what ``ArcFaceONNX.get`` does.
5. Embedding: ArcFace ``w600k_r50.onnx`` (512-d) through ``ArcFaceONNX.get_feat``, which swaps BGR -> RGB
   and maps pixels to ``(x - 127.5) / 127.5``; the aligned crops of a batch's originals go in one call,
   those of its customized images in another (the originals' side, face count and main-face embedding,
   is a cacheable :meth:`IdSimilarity.original_features`).

Value: ``cos(e_original, e_customized) = <e_o, e_c> / (|e_o| |e_c|)`` (float64), in [-1, 1]; the
set value is the mean over triples where both images have a face. A triple without a face in the
original or in the customized image gets ``None`` with the reason ("no face in original", "no face in
customized", or both) and counts in ``failures``; ``compute()`` also reports the detection rate (share
of triples with a face in both images) and how many originals / customized images had a face.

Real weights: ``<root>/models/buffalo_l/{det_10g,w600k_r50}.onnx`` with ``root`` =
``$SPFBENCH_INSIGHTFACE_ROOT`` or insightface's default ``~/.insightface``; both files are checked before
insightface is called (it would try to download the pack). Source: the ``buffalo_l.zip`` of insightface's
v0.7 release (:data:`BUFFALO_L_URL`).

Tiny preset (tests, CPU): the recognizer is a small random-weight ONNX conv net (input 1x3x112x112 with a
dynamic batch, 64-d output) written with ``onnx.helper`` from a seed, so insightface's model router loads
it as its real ``ArcFaceONNX`` (same preprocessing, alignment and ``get_feat``). The detector is a
stand-in, :class:`StandInDetector`: an image whose pixels all have one colour has no face; any other
image has two "faces", a small one in the top-left corner (reported first, with the higher score) and
the main one, a centred square, each with the ArcFace template landmarks scaled into its box.

Full-random preset (throughput at real size): the recognizer is an IResNet-50 at ``w600k_r50``'s shape
(insightface's ``iresnet50``: layers 3-4-14-3, PReLU, 112x112 input, 512-d output, 43.6 M parameters)
with seeded random weights, written with ``onnx.helper`` (:func:`iresnet_recognizer_model`, cached under
the temp dir) and loaded by insightface's model router as its ``ArcFaceONNX``. The detector stays the
:class:`StandInDetector`: SCRFD ``det_10g``'s cost (a 640x640 forward per image and its decoding) is
**not** measured at real size under this preset.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import MissingWeightsError, SpfbenchError
from .base import Backbones, Batch, PairwiseMetric

PACK = "buffalo_l"
DET_FILE = "det_10g.onnx"
REC_FILE = "w600k_r50.onnx"
BUFFALO_L_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"
ROOT_ENV = "SPFBENCH_INSIGHTFACE_ROOT"
DET_SIZE = (640, 640)
DET_THRESH = 0.5
SIZES = {DET_FILE: "17 MB", REC_FILE: "174 MB"}


def insightface_root() -> Path:
    """insightface's model root: ``$SPFBENCH_INSIGHTFACE_ROOT``, else insightface's default ``~/.insightface``."""
    return Path(os.environ.get(ROOT_ENV) or "~/.insightface").expanduser()


def pack_dir() -> Path:
    """The buffalo_l folder, laid out as insightface's ``FaceAnalysis(root=...)`` expects it."""
    return insightface_root() / "models" / PACK


def execution_providers(bb: Backbones) -> tuple[list, int]:
    """ONNX Runtime providers and insightface ``ctx_id`` for the backbones' torch device."""
    import onnxruntime

    if bb.device.type == "cuda":
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            index = bb.device.index or 0
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], index
        warnings.warn("ID: device is cuda but this onnxruntime has no CUDAExecutionProvider (install "
                      "onnxruntime-gpu alone); running ArcFace/SCRFD on the CPU", stacklevel=2)
    return ["CPUExecutionProvider"], -1


@contextmanager
def _quiet_skimage():
    # insightface's estimate_norm calls SimilarityTransform.estimate, deprecated in scikit-image 0.26.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`estimate` is deprecated", category=FutureWarning)
        yield


class FaceModels:
    """A detector (``detect(bgr) -> (boxes (N, 5), landmarks (N, 5, 2))``) and insightface's ArcFaceONNX."""

    def __init__(self, detector, recognizer):
        self.detector, self.recognizer = detector, recognizer

    def fingerprint(self) -> str:
        """sha256 of both models: each ONNX file's bytes (a model without a file, the stand-in detector:
        its class name)."""
        h = hashlib.sha256()
        for model in (self.detector, self.recognizer):
            file = getattr(model, "model_file", None)
            h.update(Path(file).read_bytes() if file else type(model).__qualname__.encode())
            h.update(b"\n")
        return h.hexdigest()

    def main_face(self, bgr: np.ndarray) -> tuple[np.ndarray | None, int]:
        """Landmarks (5, 2) of the largest detected face (``None`` if there is none) and the face count."""
        boxes, kps = self.detector.detect(bgr)
        if boxes.shape[0] == 0:
            return None, 0
        if kps is None:
            raise RuntimeError("ID: the face detector gives no landmarks; alignment needs the 5 points")
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return kps[int(np.argmax(area))], int(boxes.shape[0])  # argmax: first of equals = higher score

    def crop(self, bgr: np.ndarray, kps: np.ndarray) -> np.ndarray:
        from insightface.utils import face_align

        return face_align.norm_crop(bgr, landmark=kps, image_size=self.recognizer.input_size[0])

    def embed(self, crops: list[np.ndarray], chunk: int = 128) -> np.ndarray:
        """Embeddings (N, D) of aligned BGR crops, ``chunk`` crops per ONNX Runtime call."""
        out = [self.recognizer.get_feat(crops[i : i + chunk]) for i in range(0, len(crops), chunk)]
        return np.concatenate(out).reshape(len(crops), -1) if out else np.zeros((0, 0), np.float32)


def check_onnxruntime() -> None:
    """One clear line when ONNX Runtime is missing (it is an extra: one of two builds), and a warning when
    both builds are installed (they share the ``onnxruntime`` module; the last one installed wins)."""
    import importlib.metadata as md
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        raise SpfbenchError("the ID metric needs ONNX Runtime: pip install 'spfbench[cpu]' (or 'spfbench[gpu]' on a"
                            " CUDA machine; `make ... GPU=1`)")
    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            md.version(dist)
            installed.append(dist)
        except md.PackageNotFoundError:
            pass
    if len(installed) == 2:
        warnings.warn("both onnxruntime and onnxruntime-gpu are installed and share one module; uninstall the one"
                      " you do not want (pip uninstall onnxruntime on a CUDA machine)", stacklevel=2)


@Backbones.register("arcface-buffalo-l")
def _load_face_models(bb: Backbones) -> FaceModels:
    check_onnxruntime()
    from insightface.model_zoo import model_zoo

    providers, ctx_id = execution_providers(bb)
    if bb.random_weights:  # tiny or full-size random recognizer; a stand-in detector either way
        path = iresnet_recognizer_path() if bb.full_size else tiny_recognizer_path()
        rec = model_zoo.get_model(str(path), providers=providers)
        det = StandInDetector()
    else:
        folder = pack_dir()
        # `--weights arcface-det_10g=PATH` / `arcface-w600k_r50=PATH` override a file of the pack
        paths = {f: Path(bb.weight_path(weight_name(f)) or folder / f) for f in (DET_FILE, REC_FILE)}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise MissingWeightsError(
                f"missing weights: insightface {PACK} {' and '.join(missing)}; download {BUFFALO_L_URL} and unzip it"
                f" into {folder} (or set {ROOT_ENV} to the folder holding models/{PACK}, or pass --weights"
                f" {weight_name(DET_FILE)}=PATH --weights {weight_name(REC_FILE)}=PATH)"
            )
        det = model_zoo.get_model(str(paths[DET_FILE]), providers=providers)
        rec = model_zoo.get_model(str(paths[REC_FILE]), providers=providers)
        if getattr(det, "taskname", None) != "detection":
            raise RuntimeError(f"ID: {paths[DET_FILE]} is not an SCRFD face detector")
        det.prepare(ctx_id, input_size=DET_SIZE, det_thresh=DET_THRESH)
    if getattr(rec, "taskname", None) != "recognition":
        raise RuntimeError(f"ID: {rec!r} from the {PACK} recognizer file is not an ArcFace model")
    rec.prepare(ctx_id)
    return FaceModels(det, rec)


def to_bgr(image) -> np.ndarray:
    """PIL image -> contiguous uint8 (H, W, 3) BGR, insightface's input convention."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8)[:, :, ::-1])


class IdSimilarity(PairwiseMetric):
    id, column, higher_is_better = "id@arcface-buffalo-l", "ID", True
    recognition_chunk = 128  # aligned crops per recognizer call

    def reset(self) -> None:
        super().reset()
        self.faces: dict[str, list[int]] = {}  # triple id -> [faces in original, faces in customized]

    def state(self) -> dict:
        return {**super().state(), "faces": {k: list(v) for k, v in self.faces.items()}}

    def merge(self, state: dict) -> None:
        super().merge(state)
        self.faces.update({k: list(v) for k, v in state.get("faces", {}).items()})

    def feature_backbones(self) -> tuple[str, ...]:
        return ("arcface-buffalo-l",)

    def _main_faces(self, models: FaceModels, images: list) -> list[tuple[np.ndarray | None, int]]:
        """Per image: the aligned crop of its main face (``None`` without a face) and its face count."""
        out = []
        with _quiet_skimage():
            for im in images:
                bgr = to_bgr(im)
                kps, n = models.main_face(bgr)
                out.append((None if kps is None else models.crop(bgr, kps), n))
        return out

    def original_features(self, ids: list[str], images: list) -> dict[str, dict]:
        """``faces`` (int64 count) and, when there is a face, ``embedding`` (the main face's, float32)."""
        import torch

        models = self.backbones.get("arcface-buffalo-l")
        faces = self._main_faces(models, images)
        with_face = [i for i, (crop, _) in enumerate(faces) if crop is not None]
        emb = models.embed([faces[i][0] for i in with_face], self.recognition_chunk)
        out = {tid: {"faces": torch.tensor(n, dtype=torch.int64)} for tid, (_, n) in zip(ids, faces)}
        for j, i in enumerate(with_face):
            out[ids[i]]["embedding"] = torch.from_numpy(np.ascontiguousarray(emb[j], dtype=np.float32))
        return out

    def score_pairs(self, batch: Batch, features: list[dict]) -> list[float | None]:
        models = self.backbones.get("arcface-buffalo-l")
        out: list[float | None] = [None] * len(batch)
        customized = self._main_faces(models, batch.customized)
        pairs = []
        for i, (tid, f, (crop, nb)) in enumerate(zip(batch.ids, features, customized)):
            self.faces[tid] = [int(f["faces"]), nb]
            self.reasons.pop(tid, None)
            missing = [side for side, found in (("original", "embedding" in f), ("customized", crop is not None)) if not found]
            if missing:
                self.reasons[tid] = "no face in " + " and no face in ".join(missing)
            else:
                pairs.append(i)
        if pairs:
            eb = models.embed([customized[i][0] for i in pairs], self.recognition_chunk).astype(np.float64).reshape(len(pairs), -1)
            ea = np.stack([features[i]["embedding"].numpy() for i in pairs]).astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                ea = ea / np.linalg.norm(ea, axis=-1, keepdims=True)
                eb = eb / np.linalg.norm(eb, axis=-1, keepdims=True)
                cos = (ea * eb).sum(-1)
            for i, c in zip(pairs, cos.tolist()):
                if np.isfinite(c):
                    out[i] = c
                else:
                    self.reasons[batch.ids[i]] = "embedding not finite (zero or NaN)"
        return out

    def compute(self) -> dict:
        res = super().compute()
        seen = [self.faces[t] for t in self.values if t in self.faces]
        both = sum(1 for a, b in seen if a and b)
        res.update(
            triples=len(self.values),
            detection_rate=both / len(seen) if seen else None,
            detected_both=both,
            detected_original=sum(1 for a, _ in seen if a),
            detected_customized=sum(1 for _, b in seen if b),
            several_faces_original=sum(1 for a, _ in seen if a > 1),
            several_faces_customized=sum(1 for _, b in seen if b > 1),
        )
        return res


# ---------------------------------------------------------------------------------------------------
# Tiny preset: a random ArcFace-shaped ONNX recognizer and a stand-in detector.


class StandInDetector:
    """Tiny-preset face detector; same ``detect`` contract as insightface's SCRFD.

    * An image whose pixels all share one colour: no face.
    * Otherwise two faces, in this order (scores 0.9 then 0.8): a small square in the top-left corner,
      side ``0.25 * min(H, W)`` at offset ``0.05 * min(H, W)``; the main face, a centred square of side
      ``0.8 * min(H, W)``. Each has insightface's ArcFace template landmarks (``arcface_dst``, on a
      112x112 square) scaled into its box.
    """

    def detect(self, img: np.ndarray, input_size=None, max_num: int = 0, metric: str = "default"):
        from insightface.utils.face_align import arcface_dst

        if (img == img[:1, :1]).all():
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        h, w = img.shape[:2]
        s = min(h, w)
        squares = [(0.05 * s, 0.05 * s, 0.25 * s, 0.9), ((w - 0.8 * s) / 2, (h - 0.8 * s) / 2, 0.8 * s, 0.8)]
        boxes = np.array([[x, y, x + side, y + side, score] for x, y, side, score in squares], np.float32)
        kps = np.stack([arcface_dst / 112.0 * side + np.array([x, y]) for x, y, side, _ in squares])
        return boxes, kps.astype(np.float32)


def _tensor(name: str, array: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def tiny_recognizer_model(seed: int = 0, dim: int = 64):
    """A random ArcFace-shaped ONNX model: N x 3 x 112 x 112 -> N x dim (He-initialised convs + linear)."""
    from onnx import helper

    rng = np.random.default_rng(seed)

    def he(*shape):
        return rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))

    inits = [
        _tensor("c1.w", he(8, 3, 3, 3)), _tensor("c1.b", rng.standard_normal(8) * 0.1),
        _tensor("c2.w", he(16, 8, 3, 3)), _tensor("c2.b", rng.standard_normal(16) * 0.1),
        _tensor("fc.w", he(dim, 16 * 7 * 7)), _tensor("fc.b", np.zeros(dim)),
    ]
    conv = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    nodes = [  # node names deliberately not Sub*/Mul*: ArcFaceONNX then uses mean = std = 127.5, as for w600k_r50
        helper.make_node("Conv", ["input.1", "c1.w", "c1.b"], ["h1"], name="conv1", **conv),  # 56x56
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["h2"], name="conv2", **conv),  # 28x28
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("AveragePool", ["r2"], ["p"], name="pool", kernel_shape=[4, 4], strides=[4, 4]),  # 7x7
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["embedding"], name="fc", transB=1),
    ]
    return _recognizer_model(nodes, inits, "tiny_arcface", "embedding", dim, "spfbench-tiny")


def _recognizer_model(nodes, inits, name: str, output: str, dim: int, producer: str):
    """An ONNX recognizer graph as insightface expects one: input ``input.1`` N x 3 x 112 x 112, output N x ``dim``."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name=producer)
    model.ir_version = 8
    return model


def _write_once(model, folder: Path, stem: str) -> Path:
    """Serialise ``model`` into ``folder`` under a content-hashed name (atomic; reused when present)."""
    from ..io import write_once

    return write_once(model.SerializeToString(), folder, stem, ".onnx")


def tiny_recognizer_path(seed: int = 0) -> Path:
    """The tiny recognizer as a file (insightface loads models from files), under the temp dir."""
    return _write_once(tiny_recognizer_model(seed), Path(tempfile.gettempdir()) / "spfbench-tiny", f"arcface-seed{seed}")


# ---------------------------------------------------------------------------------------------------
# Full-random preset: w600k_r50's architecture (IResNet-50) with seeded random weights.

IRESNET50_LAYERS = (3, 4, 14, 3)  # insightface arcface_torch ``iresnet50``
FULL_RANDOM_SEED = 0


def iresnet_recognizer_model(seed: int = FULL_RANDOM_SEED, layers: tuple[int, ...] = IRESNET50_LAYERS, dim: int = 512):
    """A random-weight IResNet as an ONNX model: N x 3 x 112 x 112 -> N x ``dim`` (defaults: IResNet-50, the
    recognizer of ``w600k_r50.onnx``). Our own writing of the published architecture (insightface
    ``arcface_torch/backbones/iresnet.py``):

    * stem: conv 3x3 (3 -> 64, stride 1, no bias), BatchNorm, PReLU;
    * four stages of ``IBasicBlock`` (64, 128, 256, 512 channels; ``layers`` blocks each; the first block of
      each stage has stride 2 and a 1x1 conv + BatchNorm shortcut): BN, conv 3x3, BN, PReLU, conv 3x3
      (stride), BN, plus the shortcut (112 -> 56 -> 28 -> 14 -> 7);
    * head: BatchNorm, flatten (512 x 7 x 7), fully connected 25088 -> ``dim`` (with bias), BatchNorm1d.

    Weights from ``numpy.random.default_rng(seed)``: convolutions He-normal, the fully connected layer
    ``N(0, 1 / fan_in)``, PReLU slopes 0.25, BatchNorms at identity (scale 1, shift 0, mean 0, variance 1)
    except each block's last one (scale 0.2, so the residual stream grows slowly and stays finite).
    BatchNorms stay separate nodes (ONNX Runtime fuses those that follow a convolution, as in a real
    export). No node is named Sub*/Mul*, so ``ArcFaceONNX`` normalises with mean = std = 127.5, as for
    ``w600k_r50``.
    """
    from onnx import helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(x: str, cin: int, cout: int, k: int, stride: int, name: str) -> str:
        w = rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32(np.sqrt(2.0 / (cin * k * k)))
        inits.append(_tensor(f"{name}.weight", w))
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight"], [name], name=name, kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        return name

    def bn(x: str, c: int, name: str, scale: float = 1.0) -> str:
        parts = {"weight": np.full(c, scale), "bias": np.zeros(c), "running_mean": np.zeros(c), "running_var": np.ones(c)}
        inits.extend(_tensor(f"{name}.{k}", v) for k, v in parts.items())
        nodes.append(helper.make_node("BatchNormalization", [x] + [f"{name}.{k}" for k in parts], [name], name=name, epsilon=1e-5))
        return name

    def prelu(x: str, c: int, name: str) -> str:
        inits.append(_tensor(f"{name}.weight", np.full((c, 1, 1), 0.25)))
        nodes.append(helper.make_node("PRelu", [x, f"{name}.weight"], [name], name=name))
        return name

    x = prelu(bn(conv("input.1", 3, 64, 3, 1, "conv1"), 64, "bn1"), 64, "prelu")
    cin = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for b in range(blocks):
            p, stride = f"layer{stage}.{b}", (2 if b == 0 else 1)
            out = bn(x, cin, f"{p}.bn1")
            out = prelu(bn(conv(out, cin, planes, 3, 1, f"{p}.conv1"), planes, f"{p}.bn2"), planes, f"{p}.prelu")
            out = bn(conv(out, planes, planes, 3, stride, f"{p}.conv2"), planes, f"{p}.bn3", scale=0.2)
            short = bn(conv(x, cin, planes, 1, stride, f"{p}.downsample.0"), planes, f"{p}.downsample.1") if b == 0 else x
            nodes.append(helper.make_node("Add", [out, short], [f"{p}.out"], name=f"{p}.add"))
            x, cin = f"{p}.out", planes
    x = bn(x, 512, "bn2")
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten", axis=1))
    inits += [_tensor("fc.weight", rng.standard_normal((dim, 512 * 7 * 7), dtype=np.float32) * np.float32(np.sqrt(1.0 / (512 * 7 * 7)))),
              _tensor("fc.bias", np.zeros(dim))]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["fc"], name="fc", transB=1))
    bn("fc", dim, "features")
    return _recognizer_model(nodes, inits, "iresnet50_random", "features", dim, "spfbench-full-random")


def iresnet_recognizer_path(seed: int = FULL_RANDOM_SEED) -> Path:
    """The random IResNet-50 recognizer as a file (174 MB), written once under the temp dir (content-hashed name)."""
    return _write_once(iresnet_recognizer_model(seed), Path(tempfile.gettempdir()) / "spfbench-full-random",
                       f"arcface-iresnet50-seed{seed}")


def tiny_scrfd_model(seed: int = 0):
    """A random SCRFD-shaped ONNX detector (1x3x640x640; 9 outputs: strides 8/16/32 x score/box/landmarks,
    2 anchors per cell) whose outputs are dominated by constants: on any image it finds two faces of the
    stride-32 map, a big one (box 320 px, centre (256, 256), score ~0.9997) and a smaller one (box 96 px,
    centre (480, 96), score ~0.9999, so it comes first), each with the ArcFace template landmarks. For tests of the real
    loading path (:func:`write_tiny_pack`), never a metric result."""
    from insightface.utils.face_align import arcface_dst
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    inits, nodes, outs = [], [], {"score": [], "bbox": [], "kps": []}
    template = (arcface_dst - 56.0) / 112.0  # landmarks relative to the box centre, per unit of box side
    for s in (8, 16, 32):
        n = 640 // s
        const = np.zeros((n, n, 2, 15), np.float32)
        const[..., 0] = -8.0  # no face
        const[..., 1:5] = 0.5  # boxes of one stride around each cell centre
        if s == 32:  # (row, col, anchor): half side in strides, logit
            for (r, c, a), half, logit in (((8, 8, 0), 5.0, 8.0), ((3, 15, 0), 1.5, 9.0)):
                const[r, c, a, 0] = logit
                const[r, c, a, 1:5] = half
                const[r, c, a, 5:] = (template * 2 * half).reshape(-1)
        w = rng.standard_normal((30, 3, s, s)).astype(np.float32) * 1e-4
        inits += [
            _tensor(f"w{s}", w),
            _tensor(f"k{s}", const.transpose(2, 3, 0, 1).reshape(1, 30, n, n)),
            helper.make_tensor(f"grid{s}", TensorProto.INT64, [4], [2, 15, n, n]),
            helper.make_tensor(f"rows{s}", TensorProto.INT64, [2], [n * n * 2, 15]),
        ]
        conv = {"kernel_shape": [s, s], "strides": [s, s]}
        nodes += [
            helper.make_node("Conv", ["input.1", f"w{s}"], [f"conv{s}"], name=f"conv{s}", **conv),
            helper.make_node("Add", [f"conv{s}", f"k{s}"], [f"head{s}"], name=f"add{s}"),
            # (1, 2*15, n, n) -> (n, n, 2, 15) -> rows cell-major then anchor, the order of SCRFD's anchor centres
            helper.make_node("Reshape", [f"head{s}", f"grid{s}"], [f"g{s}"], name=f"reshape_grid{s}"),
            helper.make_node("Transpose", [f"g{s}"], [f"t{s}"], name=f"transpose{s}", perm=[2, 3, 0, 1]),
            helper.make_node("Reshape", [f"t{s}", f"rows{s}"], [f"r{s}"], name=f"reshape_rows{s}"),
            helper.make_node("Split", [f"r{s}", "splits"], [f"logit{s}", f"bbox{s}", f"kps{s}"], name=f"split{s}", axis=1),
            helper.make_node("Sigmoid", [f"logit{s}"], [f"score{s}"], name=f"sigmoid{s}"),
        ]
        for k, width in (("score", 1), ("bbox", 4), ("kps", 10)):
            outs[k].append(helper.make_tensor_value_info(f"{k}{s}", TensorProto.FLOAT, [n * n * 2, width]))
    inits.append(helper.make_tensor("splits", TensorProto.INT64, [3], [1, 4, 10]))
    graph = helper.make_graph(
        nodes, "tiny_scrfd", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 640, 640])],
        outs["score"] + outs["bbox"] + outs["kps"], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="spfbench-tiny")
    model.ir_version = 8
    return model


def write_tiny_pack(root: str | Path, seed: int = 0) -> Path:
    """A buffalo_l-shaped folder ``<root>/models/buffalo_l`` with random stand-ins of both files (tests and
    CPU benchmarks of the real loading path: insightface's SCRFD and ArcFaceONNX on files)."""
    import onnx

    folder = Path(root) / "models" / PACK
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_scrfd_model(seed), str(folder / DET_FILE))
    onnx.save(tiny_recognizer_model(seed), str(folder / REC_FILE))
    return folder


def weight_name(file: str) -> str:
    """The file's name in `spfbench weights` and `--weights NAME=PATH`: ``arcface-det_10g``, ``arcface-w600k_r50``."""
    return f"arcface-{file.split('.')[0]}"


def weight_rows() -> list[dict]:
    return [
        {"group": "metric", "name": weight_name(name), "what": what, "source": BUFFALO_L_URL,
         "size": SIZES[name], "present": (pack_dir() / name).is_file(), "path": str(pack_dir() / name)}
        for name, what in ((DET_FILE, "insightface buffalo_l SCRFD-10G face detector (ID)"),
                           (REC_FILE, "insightface buffalo_l ArcFace R50 WebFace600K recognizer (ID)"))
    ]
