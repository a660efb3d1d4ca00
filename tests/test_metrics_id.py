import warnings

import numpy as np
import onnxruntime
import pytest
from insightface.utils.face_align import arcface_dst, norm_crop
from PIL import Image

from spfbench.errors import MissingWeightsError
from spfbench.metrics import Backbones, Batch, create
from spfbench.metrics import id as idm

MID = "id@arcface-buffalo-l"


@pytest.fixture(autouse=True)
def _quiet():  # insightface's norm_crop uses an API scikit-image 0.26 deprecates
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`estimate` is deprecated", category=FutureWarning)
        yield


@pytest.fixture(scope="module")
def tiny():
    return Backbones("tiny", "cpu")


def _images(n, seed, size=(96, 80)):
    """Random colour images whose channels have different statistics (so an R/B swap changes them)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.integers(0, 256, (*size, 3)).astype(np.float64)
        x[..., 0] *= 0.3  # weak red, strong blue
        out.append(Image.fromarray(x.astype(np.uint8)))
    return out


def _blank(size=(64, 72)):
    return Image.new("RGB", size, (120, 90, 60))


def _main_landmarks(image):
    """The stand-in detector's documented main face: centred square of side 0.8 min(H, W), template inside."""
    w, h = image.size
    side = 0.8 * min(w, h)
    return arcface_dst / 112.0 * side + np.array([(w - side) / 2, (h - side) / 2])


def _reference_embeddings(images, swap_to_rgb=True):
    """Independent of ArcFaceONNX.get_feat: norm_crop on the BGR array, then the ONNX model run directly."""
    bgr = [np.ascontiguousarray(np.asarray(im)[:, :, ::-1]) for im in images]
    crops = np.stack([norm_crop(b, _main_landmarks(im), image_size=112) for b, im in zip(bgr, images)])
    x = crops[..., ::-1] if swap_to_rgb else crops  # the network takes RGB
    x = ((x.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
    sess = onnxruntime.InferenceSession(str(idm.tiny_recognizer_path()), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x)})[0].astype(np.float64)


def _cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_id_equals_an_independent_cosine_of_the_aligned_main_faces(tiny):
    o, c = _images(5, 0), _images(5, 1)
    m = create(MID, tiny)
    m.update(Batch([f"t{i}" for i in range(5)], o, c, ["a hat"] * 5))
    ref = _cos(_reference_embeddings(o), _reference_embeddings(c))
    np.testing.assert_allclose([m.values[f"t{i}"] for i in range(5)], ref, rtol=0, atol=1e-5)
    r = m.compute()
    assert (r["column"], r["higher_is_better"], r["n"], r["failures"]) == ("ID", True, 5, 0)
    assert r["value"] == pytest.approx(ref.mean(), abs=1e-5) and r["detection_rate"] == 1.0
    assert r["several_faces_original"] == 5  # the stand-in also reports a small corner face: not the one used


def test_channels_are_swapped_to_bgr_for_insightface(tiny):
    o, c = _images(4, 2), _images(4, 3)
    m = create(MID, tiny)
    m.update(Batch(list("abcd"), o, c, ["x"] * 4))
    got = np.array([m.values[k] for k in "abcd"])
    right = _cos(_reference_embeddings(o), _reference_embeddings(c))
    wrong = _cos(_reference_embeddings(o, swap_to_rgb=False), _reference_embeddings(c, swap_to_rgb=False))
    np.testing.assert_allclose(got, right, atol=1e-5)
    assert np.abs(got - wrong).min() > 5e-3  # a metric fed RGB as BGR would land here


def test_identical_images_give_one(tiny):
    ims = _images(3, 4)
    m = create(MID, tiny)
    m.update(Batch(["a", "b", "c"], ims, [im.copy() for im in ims], ["x"] * 3))
    assert all(m.values[k] == pytest.approx(1.0, abs=1e-5) for k in "abc")


def test_missing_faces_are_recorded_with_reasons_and_counted(tiny):
    ims = _images(2, 5)
    m = create(MID, tiny)
    m.update(Batch(["ok", "no-orig", "no-cust", "none"], [ims[0], _blank(), ims[1], _blank()],
                   [ims[1], ims[0], _blank(), _blank((50, 50))], ["x"] * 4))
    assert m.values["ok"] is not None and "ok" not in m.reasons
    assert all(m.values[k] is None for k in ("no-orig", "no-cust", "none"))
    assert m.reasons["no-orig"] == "no face in original"
    assert m.reasons["no-cust"] == "no face in customized"
    assert m.reasons["none"] == "no face in original and no face in customized"
    r = m.compute()
    assert (r["n"], r["failures"], r["triples"]) == (1, 3, 4)
    assert r["detection_rate"] == pytest.approx(0.25)
    assert (r["detected_both"], r["detected_original"], r["detected_customized"]) == (1, 2, 2)
    assert r["value"] == pytest.approx(m.values["ok"])


def test_nothing_detected_gives_no_value(tiny):
    m = create(MID, tiny)
    m.update(Batch(["a"], [_blank()], [_blank()], ["x"]))
    r = m.compute()
    assert r["value"] is None and r["detection_rate"] == 0.0 and r["failures"] == 1


def test_recognition_is_one_batched_call_per_side(tiny, monkeypatch):
    rec = tiny.get("arcface-buffalo-l").recognizer
    calls = []
    real = rec.get_feat
    monkeypatch.setattr(rec, "get_feat", lambda crops: calls.append(len(crops)) or real(crops))
    o, c = _images(4, 6), _images(4, 7)
    m = create(MID, tiny)
    m.update(Batch(list("abcde"), [*o, _blank()], [*c, c[0]], ["x"] * 5))
    # the originals with a face in one call (their cacheable side), then the customized crops of the pairs
    # whose original has a face: the faceless original adds nothing
    assert calls == [4, 4]
    m.recognition_chunk = 3
    calls.clear()
    m.update(Batch(list("abcd"), o, c, ["x"] * 4))
    assert calls == [3, 1, 3, 1]


def test_shards_merge_to_one_pass(tiny):
    o, c = _images(6, 8), _images(6, 9)
    o[2], c[4] = _blank(), _blank()
    ids = [f"t{i}" for i in range(6)]
    whole, a, b = (create(MID, tiny) for _ in range(3))
    whole.update(Batch(ids, o, c, ["x"] * 6))
    a.update(Batch(ids[:4], o[:4], c[:4], ["x"] * 4))
    b.update(Batch(ids[4:], o[4:], c[4:], ["x"] * 2))
    a.merge(b.state())
    assert a.state() == whole.state()
    assert a.compute() == whole.compute()
    a.update(Batch(ids[:2], o[:2], c[:2], ["x"] * 2))  # re-scoring a triple does not count it twice
    assert a.compute() == whole.compute()


def test_real_weights_missing_is_a_one_line_error_before_insightface_runs(tmp_path, monkeypatch):
    import insightface.model_zoo.model_zoo as zoo

    monkeypatch.setenv(idm.ROOT_ENV, str(tmp_path))
    monkeypatch.setattr(zoo, "get_model", lambda *a, **k: pytest.fail("insightface was called"))
    with pytest.raises(MissingWeightsError) as e:
        Backbones("real", "cpu").get("arcface-buffalo-l")
    msg = str(e.value)
    folder = tmp_path / "models" / "buffalo_l"
    assert "\n" not in msg and f"{folder / 'det_10g.onnx'} and {folder / 'w600k_r50.onnx'}" in msg
    assert idm.BUFFALO_L_URL in msg and "--weights arcface-det_10g=PATH" in msg
    folder.mkdir(parents=True)
    (folder / "det_10g.onnx").write_bytes(b"")
    with pytest.raises(MissingWeightsError, match=r"buffalo_l \S*w600k_r50\.onnx; download"):
        Backbones("real", "cpu").get("arcface-buffalo-l")
    with pytest.raises(MissingWeightsError, match=r"elsewhere\.onnx; download"):
        Backbones("real", "cpu", weights={"arcface-w600k_r50": str(tmp_path / "elsewhere.onnx")}).get("arcface-buffalo-l")
    rows = {r["name"]: r for r in idm.weight_rows()}
    assert rows["arcface-det_10g"]["present"] and not rows["arcface-w600k_r50"]["present"]


def test_real_loading_path_matches_insightface_face_analysis(tmp_path, monkeypatch):
    """The real loader on a buffalo_l-shaped folder of random models equals insightface's own app."""
    from insightface.app import FaceAnalysis
    from insightface.model_zoo.scrfd import SCRFD

    folder = idm.write_tiny_pack(tmp_path)
    monkeypatch.setenv(idm.ROOT_ENV, str(tmp_path))
    prepared = []
    real_prepare = SCRFD.prepare
    monkeypatch.setattr(SCRFD, "prepare", lambda self, ctx, **kw: prepared.append(kw) or real_prepare(self, ctx, **kw))
    bb = Backbones("real", "cpu")
    models = bb.get("arcface-buffalo-l")
    # insightface 2.1 detects at 128 and 640 unless told: the metric fixes 640 (the tiny pack is static 640)
    assert prepared == [{"input_size": (640, 640), "det_thresh": 0.5}]
    # the same files given one by one with --weights load the same way
    moved = Backbones("real", "cpu", weights={"arcface-det_10g": str(folder / "det_10g.onnx"),
                                              "arcface-w600k_r50": str(folder / "w600k_r50.onnx")})
    monkeypatch.setenv(idm.ROOT_ENV, str(tmp_path / "nowhere"))
    assert type(moved.get("arcface-buffalo-l").recognizer).__name__ == "ArcFaceONNX"
    monkeypatch.setenv(idm.ROOT_ENV, str(tmp_path))
    assert type(models.detector).__name__ == "SCRFD" and type(models.recognizer).__name__ == "ArcFaceONNX"
    o, c = _images(3, 10, size=(320, 320)), _images(3, 11, size=(400, 300))
    m = create(MID, bb)
    m.update(Batch(list("abc"), o, c, ["x"] * 3))

    app = FaceAnalysis(name=str(folder), allowed_modules=["detection", "recognition"], providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))

    def main_embedding(im):
        faces = app.get(np.asarray(im)[:, :, ::-1].copy())
        assert len(faces) == 2  # the random pack finds a small face (higher score) and a big one
        return max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])).embedding

    ref = [float(_cos(main_embedding(x), main_embedding(y))) for x, y in zip(o, c)]
    np.testing.assert_allclose([m.values[k] for k in "abc"], ref, atol=1e-5)
    small_first = app.get(np.asarray(o[0])[:, :, ::-1].copy())[0]
    assert float(_cos(small_first.embedding, main_embedding(o[0]))) < 0.9999  # choosing it would show


def test_providers_follow_the_torch_device(monkeypatch):
    assert idm.execution_providers(Backbones("tiny", "cpu")) == (["CPUExecutionProvider"], -1)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        assert idm.execution_providers(Backbones("tiny", "cuda:1")) == (["CPUExecutionProvider"], -1)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert idm.execution_providers(Backbones("tiny", "cuda:1")) == (
        [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"], 1)


def test_tiny_recognizer_is_deterministic():
    assert idm.tiny_recognizer_path(0) == idm.tiny_recognizer_path(0) != idm.tiny_recognizer_path(1)
    assert idm.tiny_recognizer_model(0).SerializeToString() == idm.tiny_recognizer_model(0).SerializeToString()


def test_onnxruntime_is_an_extra_with_one_clear_line_when_missing_or_doubled(monkeypatch):
    import importlib.metadata as md
    import importlib.util

    from spfbench.errors import SpfbenchError
    from spfbench.metrics.id import check_onnxruntime

    real_find, real_version = importlib.util.find_spec, md.version
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real_find(name, *a))
    with pytest.raises(SpfbenchError, match=r"spfbench\[cpu\].*spfbench\[gpu\]"):
        check_onnxruntime()
    monkeypatch.setattr(importlib.util, "find_spec", real_find)
    monkeypatch.setattr(md, "version", lambda d: "1.0" if d in ("onnxruntime", "onnxruntime-gpu") else real_version(d))
    with pytest.warns(UserWarning, match="both onnxruntime and onnxruntime-gpu"):
        check_onnxruntime()
