"""`spfbench viz`: attention-over-timesteps grids and SFCM grids (tiny preset, CPU)."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from spfbench import viz
from spfbench.generation import GenerationSettings, generate
from trainers.attention import AttentionStore, capture_cross_attention

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models, shared cores

CAPTION = "a woman, smiling, wearing red glasses"
TARGET = "wearing red glasses"


@pytest.fixture(scope="module")
def pipe():
    from spfbench.models import load_pipeline

    p, _ = load_pipeline("tiny", device="cpu", dtype=torch.float32)
    return p


def _artifact(folder, unet, method, scale=0.0):
    u = copy.deepcopy(unet)
    if scale:
        with torch.no_grad():
            for n, p in u.named_parameters():
                if ".attn2.to_k." in n:
                    p.mul_(scale)
    u.save_pretrained(folder / "unet", safe_serialization=True)
    (folder / "method.json").write_text(json.dumps({"method": method, "config": {}, "steps": 0}))
    return folder


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, pipe):
    root = tmp_path_factory.mktemp("artifacts")
    return {
        "naive": _artifact(root / "naive", pipe.unet, "naive", 3.0),
        "spf": _artifact(root / "spf", pipe.unet, "spf", 0.3),
    }


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from spfbench.toydata import make_toy_data

    out = tmp_path_factory.mktemp("toy") / "data"
    make_toy_data(out, 2, seed=0, size=64)
    return out


def _png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(path)
    img.load()
    return img


def _crop(img, box):
    return np.asarray(img.convert("RGB").crop(box))


def _expected_tile(values, cell):
    v = np.asarray(values, dtype=np.float64)
    rep = cell // v.shape[0]
    return np.repeat(np.repeat(viz.colormap(v), rep, 0), rep, 1)


# ------------------------------------------------------------------------------------------ rendering


def test_colormap_is_monotone_ramp_and_clips():
    c = viz.colormap(np.array([-1.0, 0.0, 0.5, 1.0, 2.0, np.nan]))
    assert c.dtype == np.uint8 and c.shape == (6, 3)
    assert (c[0] == c[1]).all() and (c[3] == c[4]).all() and (c[5] == c[1]).all()
    lum = viz.colormap(np.linspace(0, 1, 50)).astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(lum) > 0)


def test_attention_grid_renders_the_known_maps(tmp_path):
    """Rows = models, columns = chosen steps; each panel's pixels are the colormap of the map's values."""
    g = torch.Generator().manual_seed(0)
    traces = {
        name: viz.AttentionTrace(torch.rand(6, 8, 8, generator=g) * k, list(range(999, 0, -166)))
        for name, k in (("original", 0.5), ("naive", 0.1), ("spf", 0.02))
    }
    grid = viz.attention_grid(traces, CAPTION, TARGET, at=[0, 2, -1], normalize="none", cell=32)
    assert set(grid.boxes) == {(r, c) for r in range(3) for c in range(3)}
    assert grid.size[0] == viz.LABEL_W + 3 * (32 + viz.PAD) + viz.PAD
    for r, name in enumerate(traces):
        for c, step in enumerate([0, 2, 5]):
            want = _expected_tile(traces[name].maps[step].clamp(0, 1).numpy(), 32)
            assert np.array_equal(_crop(grid.image, grid.boxes[(r, c)]), want)
    # display normalisations
    panel = viz.attention_grid(traces, CAPTION, TARGET, columns=2, normalize="panel", cell=32)
    assert set(panel.boxes) == {(r, c) for r in range(3) for c in range(2)}
    m = traces["spf"].maps[5]
    assert np.array_equal(_crop(panel.image, panel.boxes[(2, 1)]), _expected_tile((m / m.max()).numpy(), 32))
    glob = viz.attention_grid(traces, CAPTION, TARGET, columns=1, normalize="global", cell=32)
    peak = max(t.maps[5].max() for t in traces.values())
    assert np.array_equal(_crop(glob.image, glob.boxes[(0, 0)]), _expected_tile((traces["original"].maps[5] / peak).numpy(), 32))
    out = viz.save_png(grid.image, tmp_path / "g.png")
    assert _png(out).size == grid.size


def test_target_token_positions(pipe):
    pos = viz.target_token_positions(pipe.tokenizer, CAPTION, TARGET)
    ids = pipe.tokenizer(CAPTION).input_ids
    assert [ids[p] for p in pos] == pipe.tokenizer(TARGET, add_special_tokens=False).input_ids
    assert viz.target_token_positions(pipe.tokenizer, CAPTION, "Wearing RED glasses") == pos
    with pytest.raises(viz.SpfbenchError, match="does not occur"):
        viz.target_token_positions(pipe.tokenizer, CAPTION, "a hat")


def test_trace_maps_come_from_the_capture_store(pipe):
    """The traced map of each step = the store's layer-mean map of the conditional half, averaged over the
    target tokens, computed independently from an accumulating store (auto_reset=False, call i)."""
    settings = GenerationSettings(sampler="ddim", steps=3, guidance_scale=7.0)
    trace = viz.target_attention_trace(pipe, CAPTION, TARGET, 3, settings, size=16)
    assert trace.maps.shape == (3, 16, 16) and len(trace.timesteps) == 3
    assert trace.timesteps == sorted(trace.timesteps, reverse=True)

    pos = viz.target_token_positions(pipe.tokenizer, CAPTION, TARGET)
    store = AttentionStore(probs=True, keep_grad=False, auto_reset=False)
    with capture_cross_attention(pipe.unet, store):
        generate(pipe, [CAPTION], [3], settings)
    for i in range(3):
        per_layer = []
        for name in store.names():
            p = store.get(name, call=i).probs  # (2, heads, N, T): [uncond, cond]
            assert p.shape[0] == 2
            a = p[1].mean(0)[:, pos].mean(-1)  # heads, then target tokens
            h, w = store.get(name, call=i).hw
            a = torch.nn.functional.interpolate(a.reshape(1, 1, h, w), size=(16, 16), mode="bilinear", align_corners=False)
            per_layer.append(a[0, 0])
        torch.testing.assert_close(trace.maps[i], torch.stack(per_layer).mean(0), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- SFCM


def test_sfcm_grid_panels_and_gamma_one_gives_m(tmp_path, toy, artifacts):
    from trainers.spf_losses import split_base_phrases
    from spfbench.data import PortraitDataset

    item = PortraitDataset(toy, resolution=64)[0]
    phrases = split_base_phrases(item["base_caption"])
    grid, view = viz.run_sfcm(toy, 0, tmp_path / "s1.png", artifact=artifacts["spf"], preset="tiny", timestep=400,
                              gamma=1.0, cell=32, device="cpu")
    p = len(phrases)
    assert view.phrases == phrases and view.phrase_maps.shape == (p, 64, 64)
    # image, M, P weighted phrase maps, their sum, M-hat
    assert set(grid.boxes) == {(0, c) for c in range(p + 4)}
    assert _png(tmp_path / "s1.png").size == grid.size
    assert torch.all(view.gamma == 1) and torch.all(view.exclusion == 0)
    torch.testing.assert_close(view.m_hat, view.m)
    assert view.normalize == "none" and 0 <= view.m.min() < view.m.max()  # raw |eps difference| (the default)
    m_panel = _crop(grid.image, grid.boxes[(0, 1)])
    assert len(np.unique(m_panel.reshape(-1, 3), axis=0)) > 1  # a real map, not a flat panel
    assert np.array_equal(_crop(grid.image, grid.boxes[(0, p + 3)]), m_panel)  # M-hat panel == M panel
    for c in range(2, p + 3):  # weighted maps and their sum: all zero
        assert np.array_equal(_crop(grid.image, grid.boxes[(0, c)]), np.broadcast_to(viz.colormap(0.0), (32, 32, 3)))

    # default gamma (tiny CLIP): M-hat = clamp(M - sum_i A_i (1 - gamma_i)), panels drawn on [0, 1]
    grid2, v2 = viz.run_sfcm(toy, 0, tmp_path / "s2.png", artifact=artifacts["spf"], preset="tiny", timestep=400,
                             cell=64, device="cpu")
    torch.testing.assert_close(v2.m, view.m)
    assert not torch.all(v2.gamma == 1)
    torch.testing.assert_close(v2.exclusion, v2.weighted.sum(0))
    torch.testing.assert_close(v2.m_hat, (v2.m - v2.weighted.sum(0)).clamp(0, 1))
    assert np.array_equal(_crop(grid2.image, grid2.boxes[(0, 1)]), _expected_tile(v2.m.numpy(), 64))
    for i in range(p):
        assert np.array_equal(_crop(grid2.image, grid2.boxes[(0, 2 + i)]), _expected_tile(v2.weighted[i].numpy(), 64))
    assert np.array_equal(_crop(grid2.image, grid2.boxes[(0, p + 3)]), _expected_tile(v2.m_hat.numpy(), 64))


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_attention_success(cli, tmp_path, artifacts):
    out = tmp_path / "att.png"
    code, stdout, err = cli("viz", "attention", "--caption", CAPTION, "--target", TARGET, "--model", "original",
                            "--model", f"naive={artifacts['naive']}", "--model", f"spf={artifacts['spf']}",
                            "--preset", "tiny", "--seed", "1", "--steps", "3", "--columns", "3", "--cell", "32",
                            "--device", "cpu", "--out", out)
    assert code == 0, err
    img = _png(out)
    assert img.size[0] == viz.LABEL_W + 3 * (32 + viz.PAD) + viz.PAD
    assert img.size[1] >= 3 * (32 + viz.PAD)
    assert "rows: original, naive, spf" in stdout


def test_cli_sfcm_success(cli, tmp_path, toy, artifacts):
    out = tmp_path / "s.png"
    code, stdout, err = cli("viz", "sfcm", "--data", toy, "--index", "1", "--artifact", artifacts["spf"], "--preset", "tiny",
                            "--timestep", "300", "--gamma", "1", "--cell", "32", "--device", "cpu", "--out", out)
    assert code == 0, err
    _png(out)
    assert "M-hat mean" in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["attention", "--caption", CAPTION, "--target", TARGET, "--model", "naive=/no/such/run/artifact"], "does not exist"),
        (["attention", "--caption", CAPTION, "--target", TARGET, "--model", "naive"], "NAME=ARTIFACT"),
        (["attention", "--caption", CAPTION, "--target", "a purple hat"], "does not occur in the caption"),
        (["attention", "--caption", CAPTION, "--target", TARGET, "--at", "0,9", "--steps", "2"], "--at 9"),
        (["sfcm", "--data", "TOY", "--index", "7"], "out of range"),
        (["sfcm", "--data", "TOY", "--artifact", "/no/such/artifact"], "does not exist"),
    ],
)
def test_cli_bad_input_is_a_clear_error(cli, tmp_path, toy, args, message):
    args = [str(toy) if a == "TOY" else a for a in args]
    out = tmp_path / "x.png"
    code, _, err = cli("viz", *args, "--preset", "tiny", "--device", "cpu", "--out", out)
    assert code == 2
    assert message in err
    assert not out.exists()
