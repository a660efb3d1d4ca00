"""Training the world's attribute reader (spfbench/world/reader.py), at micro sizes: the VAE option draws
reconstructions into training as asked and validates on them beside the bar; bad input refused first."""

from __future__ import annotations

import pytest
import torch

from spfbench.errors import SpfbenchError
from spfbench.world import reader as R
from spfbench.world import vae as V
from spfbench.world.renders import load_vae, vae_checksum
from spfbench.world.train_vae import train_vae

from test_world_model import MICRO, QUIET

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(n_train=96, n_val=8, epochs=1, batch_size=48, threads=1, log=lambda *a: None)


@pytest.fixture(scope="module")
def micro_vae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("reader-vae") / "vae"
    train_vae(d, n=16, steps=2, batch_size=8, overrides=MICRO, n_val=8, **QUIET)
    return d


def _spy(monkeypatch):
    seen = []
    real = R.augment

    def spy(x, g):
        seen.append(x.clone())
        return real(x, g)

    monkeypatch.setattr(R, "augment", spy)
    return seen


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_vae_share_decides_what_the_reader_trains_on(tmp_path, monkeypatch, micro_vae_dir, share):
    seen = _spy(monkeypatch)
    card = R.train_reader(tmp_path / "r.safetensors", vae=micro_vae_dir, vae_share=share, **SMALL)
    x, _ = R.render_set(R.training_mix, 96, 0)
    rec = V.reconstruct(load_vae(micro_vae_dir), x)
    assert not torch.equal(rec, x)  # a micro VAE reconstructs badly: the two are told apart below
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    want = (rec if share == 1.0 else x)[perm[:48]]
    assert torch.equal(seen[0], R.normalize(want))
    # the card: where the reconstructions came from, and accuracy on them per stream, beside the bar
    assert card["training"]["vae"]["share"] == share and card["training"]["vae"]["checksum"] == vae_checksum(load_vae(micro_vae_dir))
    assert {"heldout", "heldout-vae", "finetune", "finetune-vae", "uniform", "uniform-vae"} == set(card["validation"]["accuracy"])
    assert set(card["quality_bar"]["reconstructions_min_accuracy"]) == {"heldout", "finetune", "uniform"}
    assert "--vae" in card["training"]["command"]
    assert len(R.load_reader(tmp_path / "r.safetensors").read([R.render(R.sample("heldout", 0, 0), 64)])) == 1


def test_without_a_vae_the_reader_trains_on_renders_as_before(tmp_path, monkeypatch):
    seen = _spy(monkeypatch)
    card = R.train_reader(tmp_path / "r.safetensors", **SMALL)
    x, _ = R.render_set(R.training_mix, 96, 0)
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen[0], R.normalize(x[perm[:48]]))
    assert "vae" not in card["training"] and set(card["validation"]["accuracy"]) == {"heldout", "finetune", "uniform"}
    assert "reconstructions_min_accuracy" not in card["quality_bar"]


def test_bad_vae_options_are_refused_before_any_rendering(tmp_path, monkeypatch, cli):
    monkeypatch.setattr(R, "render_set", lambda *a: pytest.fail("rendered before checking its input"))
    with pytest.raises(SpfbenchError, match="vae_share must be between 0 and 1"):
        R.train_reader(tmp_path / "r.safetensors", vae=tmp_path, vae_share=1.5, **SMALL)
    with pytest.raises(SpfbenchError, match="no VAE at"):
        R.train_reader(tmp_path / "r.safetensors", vae=tmp_path, **SMALL)
    code, _, err = cli("world", "train-reader", "--out", tmp_path / "r.safetensors", "--vae", tmp_path)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: no VAE at"), err
    assert not (tmp_path / "r.safetensors").exists()


def test_a_wider_reader_is_saved_and_loaded_with_its_widths(tmp_path, cli):
    card = R.train_reader(tmp_path / "w.safetensors", widths=(8, 16, 24, 32), hidden=48, **SMALL)
    reader = R.load_reader(tmp_path / "w.safetensors")
    convs = [m for m in reader.model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 24, 32] and reader.model.heads["subject"].in_features == 48
    assert "--widths 8,16,24,32 --hidden 48" in card["training"]["command"] and "[16, 24, 32]" in card["architecture"]
    with pytest.raises(SpfbenchError, match="widths must be 4 positive channel counts"):
        R.train_reader(tmp_path / "x.safetensors", widths=(8, 16), **SMALL)
    code, _, err = cli("world", "train-reader", "--out", tmp_path / "x.safetensors", "--widths", "8,a")
    assert code == 2 and err.splitlines() == ["error: --widths takes comma-separated integers, got '8,a'"], err
    assert not (tmp_path / "x.safetensors").exists()


def test_the_same_call_trains_the_same_reader(tmp_path):
    cards = [R.train_reader(tmp_path / f"{k}.safetensors", **SMALL) for k in "ab"]
    a, b = (R.load_reader(tmp_path / f"{k}.safetensors").model.state_dict() for k in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cards[0]["validation"] == cards[1]["validation"] and cards[0]["parameters"] == cards[1]["parameters"]
    other = R.train_reader(tmp_path / "c.safetensors", **{**SMALL, "seed": 1})
    c = R.load_reader(tmp_path / "c.safetensors").model.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a) and other["training"]["seed"] == 1
