"""SPF's stage-2 diagnostics (trainers/spf_diagnostics.py) on hand-made tensors, and their wiring into the
stage-2 step (tiny preset)."""

import numpy as np
import pytest
import torch

from trainers import spf_diagnostics as D

pytestmark = pytest.mark.usefixtures("one_thread")


def test_relative_mse_against_numpy():
    g = torch.Generator().manual_seed(0)
    ref, res = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    a, b = ref.numpy().astype(np.float64), res.numpy().astype(np.float64)
    assert D.relative_mse(ref, res) == pytest.approx(((a - b) ** 2).mean() / (a**2).mean(), rel=1e-5)
    assert D.relative_mse(ref, ref.clone()) == 0.0
    assert D.relative_mse(ref, torch.zeros_like(ref)) == pytest.approx(1.0)
    assert D.layer_relative_mse([ref, ref], [ref, 2 * ref]) == pytest.approx([0.0, 1.0])
    with pytest.raises(ValueError, match="shapes differ"):
        D.relative_mse(ref, res[:1])


def test_map_summary_is_numpys_mean_and_quantiles():
    m = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    got = D.map_summary(m)
    x = m.numpy().ravel()
    assert got["mean"] == pytest.approx(x.mean(), rel=1e-6)
    for q in (10, 50, 90, 99):
        assert got[f"q{q}"] == pytest.approx(np.quantile(x, q / 100), rel=1e-5)


def _square_mask(b=2, size=16, lo=4, hi=10):
    mask = torch.zeros(b, size, size, dtype=torch.bool)
    mask[:, lo:hi, lo:hi] = True
    return mask


def test_localisation_of_perfect_inverted_and_blurred_maps():
    mask = _square_mask()
    perfect = mask.float() + 0.01 * torch.rand(mask.shape, generator=torch.Generator().manual_seed(2))
    assert D.localisation(perfect, mask) == {"auc": pytest.approx(1.0), "iou": pytest.approx(1.0), "n": 2}
    inverted = D.localisation(1 - perfect, mask)
    assert inverted["auc"] == pytest.approx(0.0) and inverted["iou"] == pytest.approx(0.0)
    # a map that covers the target and as much again around it: every target pixel above every far pixel
    wide = _square_mask(lo=2, hi=12).float() + mask.float()
    loc = D.localisation(wide, mask)
    assert loc["auc"] == pytest.approx(1.0) and loc["iou"] == pytest.approx(1.0)  # top-36 pixels are the target
    # a constant map: AUC 0.5 (every pair tied)
    assert D.localisation(torch.ones(2, 16, 16), mask)["auc"] == pytest.approx(0.5)


def test_localisation_resizes_masks_and_skips_samples_without_a_target():
    mask = _square_mask(b=2, size=64, lo=16, hi=40)  # image-resolution mask, 16 x 16 map
    mask[1] = False  # no target in sample 1
    small = torch.zeros(2, 16, 16)
    small[:, 4:10, 4:10] = 1.0  # the mask's area at 16 x 16
    loc = D.localisation(small, mask)
    assert loc["n"] == 1 and loc["auc"] == pytest.approx(1.0) and loc["iou"] == pytest.approx(1.0)
    assert D.localisation(small[1:], mask[1:])["n"] == 0
    with pytest.raises(ValueError, match="need maps"):
        D.localisation(small[0], mask)


def test_hidden_capture_is_what_to_q_projects():
    from diffusers.models.attention_processor import Attention

    from trainers.attention import AttentionStore, CaptureCrossAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    store = AttentionStore(query=True, hidden=True, probs=False, latent_size=(4, 4))
    attn.set_processor(CaptureCrossAttnProcessor(store, "down_blocks.0.attentions.0.transformer_blocks.0.attn2"))
    x, ctx = torch.randn(2, 16, 16), torch.randn(2, 5, 8)
    attn(x, encoder_hidden_states=ctx)
    rec = next(iter(store.records.values()))[-1]
    assert torch.equal(rec.hidden, x)
    q = attn.to_q(x).view(2, 16, 2, 8).transpose(1, 2)
    torch.testing.assert_close(rec.query, q)
    from trainers.spf_losses import split_heads

    torch.testing.assert_close(split_heads(attn.to_q(x), 2), q)  # the same layout as a captured Q


def test_stage2_step_logs_the_diagnostics_on_its_cadence(tmp_path):
    import trainers
    from spfbench.data import PortraitDataset, collate
    from spfbench.models import load_pipeline
    from spfbench.toydata import make_toy_data
    from trainers.base import Models
    from trainers.loop import training_scheduler

    make_toy_data(tmp_path / "d", 2, seed=0, size=64)
    ds = PortraitDataset(tmp_path / "d", resolution=64)
    batch = collate([ds[0], ds[1]])
    pipe, _ = load_pipeline("tiny", device="cpu", dtype=torch.float32)
    models = Models(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, training_scheduler(pipe))
    method = trainers.create("spf", {"diagnostics_every": 2})
    method.bind_dataset(ds)
    method.setup(models)
    _, first = method.loss(models, batch, torch.Generator().manual_seed(0))
    assert not any(k.startswith("diag_") for k in first)  # step 1 is not logged as a diagnostic step
    method.after_step(models, 0)
    # the response path drifts from the reference (a stand-in for stage 1's weights)
    with torch.no_grad():
        for n, p in models.unet.named_parameters():
            if ".attn2." in n:
                p.add_(0.05 * torch.randn_like(p))
    _, second = method.loss(models, batch, torch.Generator().manual_seed(0))
    n_layers = len(method._handles[0].layers)
    assert len(second["diag_hidden_rel_layers"]) == n_layers > 0
    # the first cross-attention's input comes before any changed weight: identical in both paths
    assert second["diag_hidden_rel_layers"][0] == 0.0 and max(second["diag_hidden_rel_layers"]) > 0
    assert second["diag_hidden_rel"] == pytest.approx(sum(second["diag_hidden_rel_layers"]) / n_layers, rel=1e-5)
    assert second["diag_eps_base_rel"] > 0  # the drifted response differs from the reference on E_base
    assert 0 <= second["m_mean"] <= 1 and second["m_hat_mean"] <= second["m_mean"] + 1e-6  # M-hat <= M
    assert "diag_m_auc" not in second  # toy data has no target masks


def test_viz_training_plots_a_log_and_refuses_a_folder_without_one(tmp_path, cli):
    import json

    from PIL import Image

    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-5, "loss_diffusion": 1.0 / s, "loss_fine": 0.1 / s, "m_hat_mean": 0.03}
            for s in range(1, 6)]
    rows[1].update({"diag_hidden_rel": 0.1, "diag_eps_base_rel": 0.01, "diag_hidden_rel_layers": [0.0, 0.1, 0.2],
                    "diag_m_auc": 0.7, "diag_m_hat_iou": 0.2})
    rows[3].update({"diag_hidden_rel": 0.05, "diag_eps_base_rel": 0.02, "diag_hidden_rel_layers": [0.0, 0.05, 0.1]})
    train = tmp_path / "spf" / "train"
    train.mkdir(parents=True)
    (train / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # torn last line
    from spfbench.trainlog import PANELS, read_log, series

    assert len(read_log(tmp_path / "spf")) == 5
    assert series(read_log(train), "diag_hidden_rel") == ([2, 4], [0.1, 0.05])
    code, out, err = cli("viz", "training", str(tmp_path / "spf"), "--out", str(tmp_path / "c.png"))
    assert code == 0, err
    w, h = Image.open(tmp_path / "c.png").size
    assert h > 2.6 * 100 * len(PANELS)  # the four panels and the per-layer one
    code, out, err = cli("viz", "training", str(tmp_path), "--out", str(tmp_path / "d.png"))
    assert code == 2 and "no training log" in err and not (tmp_path / "d.png").exists()
