"""The full-random metric preset: every Table 1 backbone at its published architecture, seeded random weights.

The large transformers (CLIP ViT-L/14, HPS ViT-H-14, MPS, SAM ViT-H) are checked on the meta device through
the preset's own loaders (``Backbones(..., device="meta")``: shapes only, no memory, seconds); the small
ones (FID Inception, LPIPS AlexNet, the IResNet-50 ONNX recognizer) are built for real and run. Their
real-size throughput is measured by ``benchmarks/bench_metrics.py --preset full-random``.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from spfbench.errors import SpfbenchError
from spfbench.metrics import Backbones, Batch, create
from spfbench.metrics.base import module_sha256

KEYS_JSON = __import__("pathlib").Path(__file__).parent / "data" / "mps_checkpoint_keys.json"


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def meta():
    import spfbench.metrics.clip, spfbench.metrics.hpsv2, spfbench.metrics.mps, spfbench.metrics.segcons  # noqa: E401, F401 (register the loaders)

    return Backbones("full-random", device="meta")


@pytest.fixture(scope="module")
def cpu(one_thread):
    import spfbench.metrics.fid, spfbench.metrics.id, spfbench.metrics.lpips  # noqa: E401, F401 (register the loaders)

    return Backbones("full-random", device="cpu")


def _images(n, seed, size=64):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# ------------------------------------------------------------------------------------------ the preset


def test_presets_say_what_size_and_what_weights():
    from spfbench.environments import names

    got = {p: (Backbones(p, "cpu").full_size, Backbones(p, "cpu").random_weights) for p in names()}
    assert got == {"real": (True, False), "tiny": (False, True), "world": (False, True), "full-random": (True, True)}
    assert Backbones("full-random", "meta").init_device.type == "meta"
    assert Backbones("full-random", "cpu").init_device.type == "cpu"


@pytest.mark.parametrize("name", ["full_random", "fullrandom", "Full-Random", ""])
def test_a_bad_preset_name_is_one_clear_line(name):
    with pytest.raises(SpfbenchError) as e:
        Backbones(name, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and repr(name) in msg and "'full-random'" in msg and "'real'" in msg


def test_weight_files_do_not_apply_to_full_random():
    with pytest.raises(SpfbenchError, match="does not apply") as e:
        Backbones("full-random", "cpu", weights={"sam-vit-h": "/x/sam.pth"})
    assert "\n" not in str(e.value) and "sam-vit-h" in str(e.value)
    Backbones("tiny", "cpu", weights={"clip-vit-l-14": "/x/c.safetensors"})  # tiny still takes its CLIP file


@pytest.fixture(scope="module")
def testset(tmp_path_factory):
    from spfbench.generation import GenerationSettings
    from spfbench.models import load_pipeline
    from spfbench.testset import TestsetBuilder

    out = tmp_path_factory.mktemp("fullsize") / "testset"
    TestsetBuilder(out, preset="tiny", n=3, settings=GenerationSettings(steps=2), device="cpu").run(
        progress=False, pipeline=load_pipeline("tiny", device="cpu"))
    return out


def test_score_cli_takes_full_random_and_refuses_a_bad_preset_in_one_line(testset, tmp_path, cli, one_thread):
    from spfbench.scoring import read_image
    from spfbench.testset import load_testset

    _, triples = load_testset(testset)
    (tmp_path / "img").mkdir()
    for t in triples:  # customized = the original, rolled
        Image.fromarray(np.roll(np.asarray(read_image(testset / t.original)), 5, axis=1)).save(tmp_path / "img" / f"{t.id}.png")
    metrics = ["--metric", "fid@inception-2048", "--metric", "lpips@alex-v0.1", "--metric", "id@arcface-buffalo-l"]
    code, out, err = cli("score", "--testset", testset, "--images", tmp_path / "img", "--out", tmp_path / "s",
                         "--preset", "full-random", "--no-progress", *metrics)
    assert code == 0, err
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["preset"] == "full-random"
    m = summary["metrics"]
    assert m["fid@inception-2048"]["n"] == m["fid@inception-2048"]["n_real"] == 3 and m["fid@inception-2048"]["value"] is not None
    assert m["lpips@alex-v0.1"]["n"] == 3 and m["id@arcface-buffalo-l"]["n"] == 3  # the stand-in detector finds faces
    code, out, err = cli("score", "--testset", testset, "--images", tmp_path / "img", "--out", tmp_path / "s2",
                         "--preset", "full-size", "--no-progress", *metrics)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown environment 'full-size'" in lines[0] and "full-random" in lines[0], err
    assert not (tmp_path / "s2" / "summary.json").exists()


# ------------------------------------------------------------------------- big backbones: shapes (meta)


def test_clip_is_vit_l14_quickgelu_with_the_openai_preprocessing(meta):
    import open_clip
    from open_clip.transform import image_transform

    clip = meta.get("clip-vit-l-14")
    model = clip.model
    v, t = model.visual, model.transformer
    assert next(model.parameters()).is_meta
    assert (v.transformer.width, v.transformer.layers, v.patch_size, v.image_size) == (1024, 24, (14, 14), (224, 224))
    assert (t.width, t.layers, model.text_projection.shape) == (768, 12, (768, 768))
    assert abs(n_params(v) - 303_966_208) < 1e-4 * 303_966_208  # ViT-L/14 vision tower: 304 M
    assert n_params(model) == 427_616_513  # CLIP ViT-L/14 (OpenAI): 428 M
    acts = {type(b.mlp.gelu).__name__ for b in [*v.transformer.resblocks, *t.resblocks]}
    assert acts == {"QuickGELU"}  # OpenAI's weights need it; GELU would make the real features wrong
    cfg = open_clip.get_pretrained_cfg("ViT-L-14", "openai")
    want = image_transform(224, is_train=False, mean=cfg["mean"], std=cfg["std"], interpolation=cfg["interpolation"],
                           resize_mode=cfg["resize_mode"])
    assert repr(clip.preprocess) == repr(want)  # the real loader's preprocessing for OpenAI's weights


def test_hps_is_stock_vit_h14_with_gelu_and_the_hps_preprocessing(meta):
    from spfbench.metrics.hpsv2 import hps_preprocess

    hps = meta.get("hpsv2")
    model = hps.model
    v = model.visual
    assert next(model.parameters()).is_meta
    assert (v.transformer.width, v.transformer.layers, v.patch_size, v.image_size) == (1280, 32, (14, 14), (224, 224))
    assert (model.transformer.width, model.transformer.layers) == (1024, 24)
    assert n_params(model) == 986_109_441  # open_clip ViT-H-14: 986 M
    assert {type(b.mlp.gelu).__name__ for b in v.transformer.resblocks} == {"GELU"}
    assert repr(hps.preprocess) == repr(hps_preprocess(model)) and "CenterCrop(" not in repr(hps.preprocess)  # pad, no crop


def test_hps_keys_are_those_the_real_checkpoint_loads_into(meta):
    """The published HPS file's keys equal stock ViT-H-14's one to one: the random model must have them all."""
    import open_clip

    with torch.device("meta"):
        stock = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
    ours = {k: tuple(v.shape) for k, v in meta.get("hpsv2").model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in stock.state_dict().items()} and len(ours) >= 686


def test_mps_is_the_published_layout(meta):
    published = json.loads(KEYS_JSON.read_text())
    model = meta.get("mps-overall").model
    assert next(model.parameters()).is_meta
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == published["keys"]
    assert abs(n_params(model) - 1.1046e9) < 1e-3 * 1.1046e9


def test_sam_is_vit_h_and_seg_cons_uses_the_real_generator_parameters(meta):
    from spfbench.metrics.segcons import GENERATOR_PARAMS, TINY_GENERATOR_PARAMS

    sam = meta.get("sam-vit-h")
    enc = sam.image_encoder
    assert next(sam.parameters()).is_meta
    assert (enc.img_size, enc.patch_embed.proj.out_channels, len(enc.blocks)) == (1024, 1280, 32)
    assert [i for i, b in enumerate(enc.blocks) if b.window_size == 0] == [7, 15, 23, 31]
    assert abs(n_params(enc) - 637.0e6) < 1e-3 * 637.0e6  # ViT-H image encoder (SAM paper: 632 M without the neck)
    assert n_params(sam) == 641_090_608  # sam_vit_h_4b8939.pth: 641 M
    assert create("seg-cons@sam-vit-h", Backbones("full-random", "meta")).generator_params == GENERATOR_PARAMS
    assert create("seg-cons@sam-vit-h", Backbones("tiny", "meta")).generator_params == TINY_GENERATOR_PARAMS


# -------------------------------------------------------------------- seeded: same preset, same weights


def test_full_random_sam_is_seeded(one_thread):
    """Two builds give the same tensors (the fingerprint a cache key holds); another seed gives others."""
    from spfbench.metrics.segcons import full_random_sam

    first = module_sha256(full_random_sam("vit_b"))  # ViT-B: the same builder, 94 M parameters (fast)
    assert module_sha256(full_random_sam("vit_b")) == first
    assert module_sha256(full_random_sam("vit_b", seed=1)) != first
    a, b = (Backbones("full-random", "cpu").fingerprint("sam-vit-b") for _ in range(2))
    assert a == b == first


# -------------------------------------------------------------- small backbones: built and run on CPU


def test_fid_inception_is_torch_fidelitys_architecture_from_a_random_file(cpu):
    from torchmetrics.image.fid import NoTrainInceptionV3

    from spfbench.metrics.fid import inception_template, random_inception_path

    net = cpu.get("inception-fid")
    assert type(net) is NoTrainInceptionV3 and not net.use_antialias
    template = inception_template()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {k: tuple(v.shape) for k, v in template.items()}
    assert n_params(net) == 23_850_960 and net.fc.weight.shape == (1008, 2048)
    path = random_inception_path()
    assert random_inception_path() == path and path.parent.name == "spfbench-full-random"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())  # loaded from that file
    assert Backbones("full-random", "cpu").fingerprint("inception-fid") == cpu.fingerprint("inception-fid")
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in _images(3, 0, size=96)])
    with torch.inference_mode():
        f = net(x)
    assert f.shape == (3, 2048) and torch.isfinite(f).all() and f.std() > 1e-3  # activations neither vanish nor blow up


def test_fid_on_full_random_equals_torchmetrics_fid_with_the_same_file(cpu):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from spfbench.metrics.fid import random_inception_path, to_uint8

    a, b = _images(4, 1, size=80), _images(4, 2, size=80)
    ours = create("fid@inception-2048", cpu)
    ours.update(Batch([f"t{i}" for i in range(4)], a, b, ["x"] * 4))
    ref = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(random_inception_path()), antialias=False)
    ref.update(torch.stack([to_uint8(im) for im in a]), real=True)
    ref.update(torch.stack([to_uint8(im) for im in b]), real=False)
    want = float(ref.compute())
    assert ours.compute()["value"] == pytest.approx(want, rel=1e-3, abs=1e-6)


def test_lpips_is_the_full_alexnet_random_with_the_wheels_heads(cpu):
    from spfbench.metrics.lpips import heads_file

    net = cpu.get("lpips-alex")
    assert net.pnet_rand
    convs = [m for m in net.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(64, 3, 11, 11), (192, 64, 5, 5), (384, 192, 3, 3), (256, 384, 3, 3), (256, 256, 3, 3)]
    heads = torch.load(heads_file(), map_location="cpu", weights_only=True)
    have = net.state_dict()
    assert all(torch.equal(have[k], v) for k, v in heads.items())
    assert Backbones("full-random", "cpu").fingerprint("lpips-alex") == cpu.fingerprint("lpips-alex")


def test_id_recognizer_is_an_iresnet50_onnx_insightface_loads(cpu):
    import onnx

    from spfbench.metrics.id import StandInDetector, iresnet_recognizer_model, iresnet_recognizer_path

    models = cpu.get("arcface-buffalo-l")
    rec = models.recognizer
    assert isinstance(models.detector, StandInDetector)
    assert type(rec).__name__ == "ArcFaceONNX" and rec.taskname == "recognition"
    assert rec.input_size == (112, 112) and rec.input_mean == rec.input_std == 127.5  # w600k_r50's normalisation
    path = iresnet_recognizer_path()
    assert rec.model_file == str(path) and path.parent.name == "spfbench-full-random"
    graph = onnx.load(str(path)).graph
    params = sum(int(np.prod(t.dims)) for t in graph.initializer if not t.name.endswith(("running_mean", "running_var")))
    assert abs(params - 43.6e6) < 0.005 * 43.6e6  # IResNet-50: 43.6 M
    ops = [n.op_type for n in graph.node]
    assert (ops.count("Conv"), ops.count("PRelu"), ops.count("Add")) == (53, 25, 24)  # 1 + 2 x 24 blocks + 4 shortcuts
    assert path.read_bytes() == iresnet_recognizer_model().SerializeToString()  # seeded: rebuilt, the same bytes
    crops = [np.asarray(im)[:, :, ::-1].copy() for im in _images(3, 3, size=112)]
    emb = models.embed(crops)
    assert emb.shape == (3, 512) and np.isfinite(emb).all()
    assert len({tuple(np.round(e, 4)) for e in emb}) == 3  # different faces, different embeddings
    # the metric runs on it: pairs of non-uniform images get a value, a uniform original fails as no face
    a, b = _images(2, 4, size=128), _images(2, 5, size=128)
    a[1] = Image.new("RGB", (128, 128), (90, 90, 90))
    m = create("id@arcface-buffalo-l", cpu)
    m.update(Batch(["t0", "t1"], a, b, ["x", "y"]))
    res = m.compute()
    assert (res["n"], res["failures"]) == (1, 1) and -1 <= res["value"] <= 1
