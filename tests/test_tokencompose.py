"""TokenCompose: grounding losses, phrase -> token mapping, training through the loop and the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spfbench.errors import SpfbenchError

pytestmark = pytest.mark.usefixtures("one_thread")


# -- losses vs an independent computation -----------------------------------------------------------------


def _ref_token(layer_maps, masks, idx):
    """Literal loops, as the official get_grounding_loss_by_layer."""
    total = 0.0
    for a in layer_maps:  # (heads, N, T)
        lp = 0.0
        for p, toks in enumerate(idx):
            obj = 0.0
            for k in toks:
                vals = []
                for h in range(a.shape[0]):
                    num = sum(float(a[h, u, k]) * float(masks[p, u]) for u in range(a.shape[1]))
                    den = sum(float(a[h, u, k]) for u in range(a.shape[1]))
                    vals.append(num / den)
                obj += (1 - np.mean(vals)) ** 2
            lp += obj / len(toks)
        total += lp / len(idx)
    return total


def _ref_pixel(layer_maps, masks, idx):
    avg = np.mean([a.numpy().mean(0) for a in layer_maps], axis=0)  # (N, T)
    out = []
    for p, toks in enumerate(idx):
        x = np.clip(avg[:, toks].sum(-1), 0, 1)
        y = masks[p].numpy()
        out.append(np.mean(-(y * np.log(np.maximum(x, np.exp(-100))) + (1 - y) * np.log(np.maximum(1 - x, np.exp(-100))))))
    return float(np.mean(out))


def _maps(seed, layers=2, heads=3, n=16, t=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(heads, n, t, generator=g, dtype=torch.float64).softmax(-1) for _ in range(layers)]


def test_token_and_pixel_loss_match_reference():
    from trainers.tokencompose import pixel_loss, token_loss

    maps = _maps(0)
    masks = torch.zeros(2, 16, dtype=torch.float64)
    masks[0, :5] = 1
    masks[1, 8:14] = 1
    idx = [[1], [2, 3]]
    assert token_loss(maps, masks, idx).item() == pytest.approx(_ref_token(maps, masks, idx), rel=1e-6)
    assert pixel_loss(maps, masks, idx).item() == pytest.approx(_ref_pixel(maps, masks, idx), rel=1e-5)


def test_map_inside_mask_gives_zero_token_loss():
    from trainers.tokencompose import token_loss

    a = torch.zeros(4, 16, 3)
    a[:, :, 0] = 1.0  # other tokens take the rest
    a[:, 2:6, 1] = torch.rand(4, 4) + 0.1  # token 1 only inside the mask
    mask = torch.zeros(1, 16)
    mask[0, 0:8] = 1
    assert token_loss([a, a], mask, [[1]]).item() == 0.0
    outside = torch.zeros(1, 16)
    outside[0, 8:] = 1
    assert token_loss([a], outside, [[1]]).item() == pytest.approx(1.0)


def test_mask_at_marks_touched_cells():
    from trainers.tokencompose import mask_at

    m = torch.zeros(8, 8)
    m[0, 0] = 1  # one pixel touches cell (0, 0) of the 4x4 grid
    out = mask_at(m, (4, 4))
    assert out.shape == (16,) and out[0] == 1 and out[1:].sum() == 0


# -- phrase -> tokens --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from spfbench.clip_tokenizer import clip_tokenizer

    return clip_tokenizer()


def test_phrase_tokens_first_occurrence_and_multitoken(tokenizer):
    from trainers.tokencompose import phrase_token_indices

    cap = "a man with a hat and a red hat"
    ids = tokenizer(cap).input_ids
    (i,) = phrase_token_indices(tokenizer, cap, "hat")
    assert tokenizer.decode([ids[i]]).strip() == "hat"
    assert i == 5 and tokenizer.decode(ids[1:i]).strip() == "a man with a"
    cap = "a woman wearing a blue T-shirt"
    idx = phrase_token_indices(tokenizer, cap, "T-shirt")
    assert len(idx) > 1 and idx == list(range(idx[0], idx[0] + len(idx)))
    assert tokenizer.decode([tokenizer(cap).input_ids[k] for k in idx]).replace(" ", "") == "t-shirt"
    assert phrase_token_indices(tokenizer, cap, "blue T-shirt")[1:] == idx


def test_missing_phrase_names_the_sample(tokenizer):
    from trainers.tokencompose import phrase_token_indices

    with pytest.raises(SpfbenchError, match=r"images/00003\.png.*'beard'"):
        phrase_token_indices(tokenizer, "a man with a hat", "beard", where="images/00003.png")
    with pytest.raises(SpfbenchError):  # "hat" is not the word "hats"
        phrase_token_indices(tokenizer, "a man with hats", "hat")


def test_config_defaults_and_validation():
    from trainers.tokencompose import TokenComposeConfig

    c = TokenComposeConfig()
    assert (c.learning_rate, c.token_loss_weight, c.pixel_loss_weight, c.train_batch_size, c.gradient_accumulation_steps,
            c.lr_scheduler, c.mixed_precision) == (5e-6, 1e-3, 5e-5, 1, 4, "constant", "no")
    with pytest.raises(SpfbenchError, match="groups"):
        TokenComposeConfig.from_dict({"groups": "mid,sideways"})


# -- data with masks ---------------------------------------------------------------------------------------


def _toy_with_masks(root: Path, n=4, null_extra=True):
    from PIL import Image

    from spfbench.toydata import make_toy_data

    make_toy_data(root, n, seed=0, size=64, targets=["a hat"])
    (root / "masks").mkdir()
    rows = [json.loads(l) for l in (root / "metadata.jsonl").read_text().splitlines() if l.strip()]
    for i, r in enumerate(rows):
        hat = np.zeros((64, 64), np.uint8)
        hat[2:20, 14:50] = 255  # the toy hat sits on top of the head
        face = np.zeros((64, 64), np.uint8)
        face[20:48, 18:46] = 255
        Image.fromarray(hat).save(root / "masks" / f"{i}_hat.png")
        Image.fromarray(face).save(root / "masks" / f"{i}_face.png")
        caption = f"{r['base_caption']}, {r['target_text']}"
        assert " hat" in caption, caption
        attn = [["hat", f"masks/{i}_hat.png"]]
        if null_extra:
            first = r["base_caption"].split()[1]  # a word of the caption, no mask: no grounding loss
            attn.append([first, None])
        r["attn_list"] = attn
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_train_with_masks_batch2_and_artifact(tmp_path):
    import trainers
    from spfbench.data import PortraitDataset
    from spfbench.models import load_pipeline
    from trainers.loop import Trainer
    from trainers.tokencompose import TokenCompose, TokenComposeConfig

    data = _toy_with_masks(tmp_path / "d")
    assert "hat" in PortraitDataset(data, resolution=64)[0]["caption"]
    m = TokenCompose(TokenComposeConfig(max_train_steps=2, train_batch_size=2, gradient_accumulation_steps=1, checkpointing_steps=100))
    r = Trainer(m, data, tmp_path / "o", preset="tiny", device="cpu").run(progress=False)
    assert m.handle is not None and m.store is not None
    pipe = load_pipeline("tiny", device="cpu")[0]
    assert trainers.load_artifact(r.artifact, pipe).method is TokenCompose


def test_missing_phrase_in_data_is_error(tmp_path):
    from trainers.loop import Trainer
    from trainers.tokencompose import TokenCompose, TokenComposeConfig

    data = _toy_with_masks(tmp_path / "d", n=2)
    rows = [json.loads(l) for l in (data / "metadata.jsonl").read_text().splitlines() if l.strip()]
    for r in rows:
        r["attn_list"].append(["zebra", None])
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = TokenCompose(TokenComposeConfig(max_train_steps=1, gradient_accumulation_steps=1))
    with pytest.raises(SpfbenchError, match=r"metadata\.jsonl.*'zebra'"):
        Trainer(m, data, tmp_path / "o", preset="tiny", device="cpu").run(progress=False)


def test_grounding_losses_fall_in_overfit(tmp_path):
    from spfbench.data import PortraitDataset, collate
    from spfbench.models import load_pipeline
    from trainers.base import Models
    from trainers.loop import training_scheduler
    from trainers.tokencompose import TokenCompose, TokenComposeConfig

    data = _toy_with_masks(tmp_path / "d", n=2)
    pipe = load_pipeline("tiny", device="cpu")[0]
    models = Models(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, training_scheduler(pipe))
    models.vae.requires_grad_(False)
    models.text_encoder.requires_grad_(False)
    ds = PortraitDataset(data, resolution=64)
    m = TokenCompose(TokenComposeConfig(token_loss_weight=1.0, pixel_loss_weight=1.0))
    m.bind_dataset(ds)
    params = m.setup(models)
    opt = torch.optim.Adam(params, lr=1e-3)
    batch = collate([ds[0], ds[1]])
    hist = []
    for _ in range(15):
        g = torch.Generator().manual_seed(0)  # same noise and timestep each step: one fixed batch
        loss, nums = m.loss(models, batch, g)
        assert nums["grounded_phrases"] == 2
        hist.append((nums["loss_token"], nums["loss_pixel"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert hist[-1][0] < 0.7 * hist[0][0], hist
    assert hist[-1][1] < hist[0][1], hist


def test_data_without_masks_trains_as_naive(tmp_path, caplog):
    from spfbench.toydata import make_toy_data
    from trainers.loop import Trainer
    from trainers.tokencompose import TokenCompose, TokenComposeConfig

    make_toy_data(tmp_path / "d", 2, seed=0, size=64)
    m = TokenCompose(TokenComposeConfig(max_train_steps=1, gradient_accumulation_steps=1))
    with caplog.at_level("WARNING"):
        Trainer(m, tmp_path / "d", tmp_path / "o", preset="tiny", device="cpu").run(progress=False)
    assert m.handle is None
    assert "no grounding loss" in caplog.text


def test_cli_train_tokencompose(tmp_path, cli):
    data = _toy_with_masks(tmp_path / "d", n=2)
    code, out, err = cli("train", "--method", "tokencompose", "--data", data, "--out", tmp_path / "o", "--preset", "tiny",
                         "--max-steps", "2", "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "o" / "artifact" / "method.json").is_file()
