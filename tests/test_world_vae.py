"""The VAE decoder fine-tune (spfbench/world/vae.py) on a micro world model: only the decoder moves,
resume equals one run, the card records the stage, bad input is refused before any work."""

from __future__ import annotations

import json

import pytest
import torch

from spfbench.errors import SpfbenchError
from spfbench.world import vae as V
from spfbench.world.components import CARD
from spfbench.world.pipeline import load_world_pipeline
from spfbench.world.recipe import train

from test_world_model import MICRO, QUIET

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("decoder")
    train(d / "model", d / "work", vae_n=16, vae_steps=2, vae_batch_size=8, unet_n=16, unet_steps=1, batch_size=8, eval_n=0,
          continuations=[], overrides=MICRO, **QUIET)
    return d / "model"


KW = dict(batch_size=8, n=16, lr=3e-3, warmup=1, eval_n=0, val_n=16, ckpt_every=1, log_every=1, **QUIET)


def _weights(folder):
    pipe = load_world_pipeline(folder)
    return {f"{k}.{n}": t for k, m in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder), ("vae", pipe.vae))
            for n, t in m.state_dict().items()}


def test_only_the_decoder_moves_and_its_loss_falls(tmp_path, micro_model):
    card = V.finetune_decoder(micro_model, tmp_path / "out", tmp_path / "work", steps=12, **KW)
    a, b = _weights(micro_model), _weights(tmp_path / "out")
    assert a.keys() == b.keys()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.startswith(("vae.decoder.", "vae.post_quant_conv.")) for k in moved)
    assert any(k.startswith("vae.decoder.") for k in moved)
    # the latent space is the same: the scaling factor and every encoder tensor
    assert load_world_pipeline(tmp_path / "out").vae.config.scaling_factor == load_world_pipeline(micro_model).vae.config.scaling_factor
    rows = [json.loads(ln) for ln in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert sum(r["l1"] for r in rows[-3:]) < sum(r["l1"] for r in rows[:3])
    stage = card["training"]["vae"]["decoder_finetunes"][-1]
    assert stage["steps"] == 12 and stage["validation_before"]["n"] == 16
    assert stage["validation_after"]["l1"] < stage["validation_before"]["l1"]
    assert set(stage["validation_after"]["targets_read"]) == {"a hat", "glasses", "sunglasses", "freckles", "pencil drawing style"}
    assert json.loads((tmp_path / "out" / CARD).read_text())["training"]["vae"]["decoder_finetunes"] == [stage]
    assert not (tmp_path / "work" / "checkpoint.pt").exists()


def test_killed_and_rerun_equals_one_run(tmp_path, micro_model):
    V.finetune_decoder(micro_model, tmp_path / "full", tmp_path / "w1", steps=4, **KW)
    assert V.finetune_decoder(micro_model, tmp_path / "part", tmp_path / "w2", steps=4, stop_at=2, **KW) is None
    assert not (tmp_path / "part").exists()
    with pytest.raises(SpfbenchError, match="checkpoint of another training"):  # other arguments refused, checkpoint kept
        V.finetune_decoder(micro_model, tmp_path / "part", tmp_path / "w2", steps=5, **KW)
    V.finetune_decoder(micro_model, tmp_path / "part", tmp_path / "w2", steps=4, **KW)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_refused_before_any_work(tmp_path, micro_model, cli):
    with pytest.raises(SpfbenchError, match="no world model folder"):
        V.finetune_decoder(tmp_path, tmp_path / "x", tmp_path / "w", steps=2, **KW)
    with pytest.raises(SpfbenchError, match="the folder being fine-tuned"):
        V.finetune_decoder(micro_model, micro_model, tmp_path / "w", steps=2, **KW)
    with pytest.raises(SpfbenchError, match="must be positive"):
        V.finetune_decoder(micro_model, tmp_path / "x", tmp_path / "w", steps=0, **KW)
    assert not (tmp_path / "w").exists() and not (tmp_path / "x").exists()
    code, _, err = cli("world", "finetune-decoder", "--model", tmp_path, "--out", tmp_path / "x", "--work", tmp_path / "w", "--steps", "1")
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: no world model folder"), err
    code, _, err = cli("world", "finetune-decoder", "--model", micro_model, "--out", tmp_path / "x", "--work", tmp_path / "w", "--steps", "1",
                       "--detail-weight", "-1")
    assert code == 2 and err.splitlines() == ["error: --detail-weight must be a finite number >= 0, got -1"], err
    assert not (tmp_path / "w").exists() and not (tmp_path / "x").exists()


def test_evaluate_card_rewrites_the_folders_evaluation_with_the_shipped_reader(tmp_path, micro_model, cli):
    import shutil

    from spfbench.world.reader import load_reader

    shutil.copytree(micro_model, tmp_path / "m")
    card = json.loads((tmp_path / "m" / CARD).read_text())
    code, out, err = cli("world", "evaluate-model", "--model", tmp_path / "m", "--n", "2", "--threads", "1", "--card")
    assert code == 0, err
    assert json.loads(out)["n"] == 2
    after = json.loads((tmp_path / "m" / CARD).read_text())
    assert after["evaluation"]["n"] == 2 and after["evaluation"]["reader_sha256"] == load_reader().card["weights_sha256"]
    assert {k: v for k, v in after.items() if k != "evaluation"} == {k: v for k, v in card.items() if k != "evaluation"}
    code, _, err = cli("world", "evaluate-model", "--model", tmp_path, "--n", "2", "--card")
    assert code == 2 and len(err.splitlines()) == 1 and "no world model card" in err, err
    code, _, err = cli("world", "evaluate-model", "--model", tmp_path / "m", "--checkpoint", tmp_path / "c.pt", "--card")
    assert code == 2 and len(err.splitlines()) == 1 and "a --checkpoint has none" in err, err
    assert json.loads((tmp_path / "m" / CARD).read_text()) == after  # the refused commands wrote nothing
