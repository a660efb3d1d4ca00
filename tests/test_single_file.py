"""Single-file SD1.x checkpoints: ``load_pipeline(preset, model="x.safetensors")`` (models._single_file_pipeline).

A real SD1.5 single file is 2-4 GB, so the test makes its own: the SD1.5 configs with every width cut
down (same block types, same layers per block, so the same LDM block numbering: ``input_blocks.1..11``,
``output_blocks.0..11``, ``middle_block.0..2``), random weights, written in the original LDM/CompVis key
format (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``) by a
diffusers -> LDM mapping written here, independently of diffusers' own LDM -> diffusers converter.
``spfbench.models.CONFIG_DIR`` points at the shrunken configs, so spfbench converts the file exactly as
it converts a real checkpoint with its embedded ``sd15`` configs.
"""

import json
import re
import shutil
import socket

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spfbench import models
from spfbench.errors import SpfbenchError
from spfbench.generation import GenerationSettings, generate
from spfbench.models import load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models, shared cores

# The SD1.5 architecture, narrowed: widths and the text encoder shrink, the block structure stays.
SHRINK = {
    "unet": {"block_out_channels": [32, 32, 64, 64], "cross_attention_dim": 32, "sample_size": 8},
    "vae": {"block_out_channels": [32, 32, 64, 64], "sample_size": 64},
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 32,
    },
}
PROMPTS = ["A woman, playing a guitar, with a red background, in a white T-shirt"]
SEEDS = [5]
FAST = GenerationSettings(steps=3)


# --------------------------------------------------------------------------- diffusers -> LDM keys

RESNET = {  # diffusers ResnetBlock2D -> LDM ResBlock (UNet)
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_resnet(rest: str) -> str:
    layer, param = rest.rsplit(".", 1)
    return f"{RESNET[layer]}.{param}"


def ldm_unet_key(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """One diffusers UNet2DConditionModel key as the LDM ``openaimodel.UNetModel`` names it.

    LDM numbers the UNet flat: ``input_blocks.0`` is conv_in, then each level has ``layers_per_block``
    slots (``.0`` resnet, ``.1`` spatial transformer) followed by one downsampler slot (none after the
    last level). Output levels have ``layers_per_block + 1`` slots; the last slot of a level also holds
    the upsampler, after the transformer if there is one.
    """
    slots = layers_per_block + 1
    module, param = key.rsplit(".", 1)
    if module in UNET_TOP:
        return f"{UNET_TOP[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = 1 + b * slots + j
        return f"input_blocks.{slot}.0.{_unet_resnet(rest)}" if kind == "resnets" else f"input_blocks.{slot}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"input_blocks.{(int(m[1]) + 1) * slots}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_unet_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = b * slots + j
        return f"output_blocks.{slot}.0.{_unet_resnet(rest)}" if kind == "resnets" else f"output_blocks.{slot}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        b = int(m[1])
        return f"output_blocks.{b * slots + layers_per_block}.{2 if up_has_attention[b] else 1}.conv.{m[2]}"
    raise AssertionError(f"no LDM name for UNet key {key}")


def ldm_vae_key(key: str, n_levels: int) -> str:
    """One diffusers AutoencoderKL key as LDM's ``AutoencoderKL`` (encoder/decoder ``down``/``up``) names it."""
    key = key.replace(".conv_shortcut.", ".nin_shortcut.").replace("coder.conv_norm_out.", "coder.norm_out.")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # the decoder's levels run the other way in LDM: up.0 is the last (full-resolution) one
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n_levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}"
    if re.fullmatch(r"((en|de)coder\.(conv_in|conv_out|norm_out)|quant_conv|post_quant_conv)\.(weight|bias)", key):
        return key  # the same name in both
    raise AssertionError(f"no LDM name for VAE key {key}")


def to_ldm_state_dict(pipe, drop: str | None = None) -> dict:
    """The pipeline's UNet, VAE and text encoder as one original-format (LDM) SD1.x state dict."""
    unet_cfg = pipe.unet.config
    up_attn = ["CrossAttn" in t for t in unet_cfg.up_block_types]
    out = {}
    for key, t in pipe.unet.state_dict().items():
        out["model.diffusion_model." + ldm_unet_key(key, unet_cfg.layers_per_block, up_attn)] = t
    n_levels = len(pipe.vae.config.block_out_channels)
    for key, t in pipe.vae.state_dict().items():
        ldm = ldm_vae_key(key, n_levels)
        if ".mid.attn_1." in ldm and ldm.endswith("weight") and t.ndim == 2:
            t = t[:, :, None, None]  # LDM's VAE attention q/k/v/proj_out are 1x1 convolutions
        out["first_stage_model." + ldm] = t
    # LDM wraps a (pre-5.6-transformers) CLIPTextModel, whose keys carry "text_model.".
    for key, t in pipe.text_encoder.state_dict().items():
        out["cond_stage_model.transformer.text_model." + key] = t
    n = len(pipe.unet.state_dict()) + len(pipe.vae.state_dict()) + len(pipe.text_encoder.state_dict())
    assert len(out) == n, "two diffusers keys got the same LDM name"
    # What real SD1.x files carry besides the three models: the CLIP position ids and DDPM buffers.
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    out["betas"] = betas.float()
    out["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    if drop is not None:
        del out[drop]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small_sd15(tmp_path_factory):
    """spfbench.models.CONFIG_DIR replaced by a copy whose ``sd15`` configs are SHRINK-ed."""
    root = tmp_path_factory.mktemp("configs")
    shutil.copytree(models.CONFIG_DIR / "sd15", root / "sd15")
    for component, changes in SHRINK.items():
        f = root / "sd15" / component / "config.json"
        cfg = json.loads(f.read_text())
        assert set(changes) <= set(cfg) | {"sample_size"}
        f.write_text(json.dumps({**cfg, **changes}, indent=1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "CONFIG_DIR", root)
        yield root


@pytest.fixture(scope="module")
def original(small_sd15):
    """Random weights in the shrunken SD1.5 shape; every tensor made distinct, so a swap cannot pass."""
    pipe, _ = load_pipeline("sd15-random", seed=3, device="cpu")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name in ("unet", "vae", "text_encoder"):
            for p in getattr(pipe, name).parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return pipe


class NetworkUsed(AssertionError):
    pass


def _refuse_network(mp: pytest.MonkeyPatch) -> list:
    """Make every socket connection (a download, a hub metadata request) fail; returns the attempts."""
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise NetworkUsed(f"network connection attempted to {address}")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture
def no_network(monkeypatch):
    return _refuse_network(monkeypatch)


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def checkpoint(original, tmp_path_factory):
    path = tmp_path_factory.mktemp("single-file") / "small-sd15.safetensors"
    save_file(to_ldm_state_dict(original), str(path))
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint, hf_cache):
    """The checkpoint through spfbench, with every socket connection refused and the HF cache watched."""
    cache_before = _files(hf_cache)
    with pytest.MonkeyPatch.context() as mp:
        attempts = _refuse_network(mp)
        pipe, info = load_pipeline("sd15", model=str(checkpoint), device="cpu")
    return pipe, info, attempts, _files(hf_cache) != cache_before


# --------------------------------------------------------------------------- tests


def test_the_file_is_in_the_original_ldm_format(checkpoint):
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as f:
        keys = set(f.keys())
        attn_q = f.get_tensor("first_stage_model.decoder.mid.attn_1.q.weight")
    prefixes = {"model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."}
    assert all(k.startswith(tuple(prefixes)) for k in keys - {"betas", "alphas_cumprod"})
    assert all(any(k.startswith(p) for k in keys) for p in prefixes)
    # the key diffusers uses to recognise SD1.x, and the last slot of SD1.5's 12 output blocks
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in keys
    assert "model.diffusion_model.input_blocks.11.0.out_layers.3.weight" in keys
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys  # upsampler after a plain level
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in keys  # upsampler after a transformer
    assert attn_q.shape == (64, 64, 1, 1)


def test_loading_is_offline(loaded):
    _, _, attempts, cache_changed = loaded
    assert attempts == [] and not cache_changed  # nothing fetched, nothing written to the HF cache


def test_round_trip_gives_the_same_weights(original, checkpoint, loaded):
    pipe, info, _, _ = loaded
    assert info.source == str(checkpoint.resolve()) and info.preset == "sd15" and info.vae_source is None
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, name).state_dict(), getattr(pipe, name).state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            assert b[k].device.type == "cpu" and b[k].dtype == a[k].dtype, f"{name}.{k}"
            assert torch.equal(a[k], b[k]), f"{name}.{k} differs after the round trip"
    assert pipe.vae.config.scaling_factor == original.vae.config.scaling_factor == 0.18215
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.prediction_type == "epsilon"
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size == 49408
    assert pipe.safety_checker is None


def test_round_trip_gives_the_same_image(original, loaded):
    pipe = loaded[0]
    a = generate(original, PROMPTS, SEEDS, FAST, output_type="np")
    b = generate(pipe, PROMPTS, SEEDS, FAST, output_type="np")
    assert a.shape == (1, 64, 64, 3) and np.isfinite(a).all() and a.std() > 1e-3
    # The weights are bit-identical (test above), but the loaded ones are read in place from the mmapped
    # file, not 64-byte aligned, and CPU kernels may then sum in another order: ~1e-6 apart, not 0.
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_vae_override_replaces_the_files_vae(original, checkpoint, tmp_path):
    other_vae = tmp_path / "vae"
    vae = type(original.vae).from_config(original.vae.config)  # fresh random weights
    vae.save_pretrained(other_vae)
    pipe, info = load_pipeline("sd15", model=str(checkpoint), vae=str(other_vae), device="cpu")
    assert info.vae_source == str(other_vae)
    assert torch.equal(pipe.vae.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    assert not torch.equal(pipe.vae.decoder.conv_out.weight, original.vae.decoder.conv_out.weight)
    assert torch.equal(pipe.unet.conv_out.weight, original.unet.conv_out.weight)


def test_pickled_ckpt_is_refused_before_reading(checkpoint, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    shutil.copy(checkpoint, ckpt)  # a perfectly good checkpoint, but pickled files are never opened
    with pytest.raises(SpfbenchError, match=r"only \.safetensors single-file checkpoints .* arbitrary code"):
        load_pipeline("sd15", model=str(ckpt), device="cpu")


def test_safetensors_that_is_not_sd_is_refused(small_sd15, tmp_path, no_network):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.ones(()), "lora_unet_down.weight": torch.randn(4, 8)}, str(path))
    with pytest.raises(SpfbenchError, match=r"lora\.safetensors: not a loadable SD1\.x single-file checkpoint"):
        load_pipeline("sd15", model=str(path), device="cpu")
    assert no_network == []


# One weight of each model, left out of an otherwise good file.
DROPPED = {
    "unet": "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
    "vae": "first_stage_model.decoder.mid.attn_1.q.weight",
    "text_encoder": "cond_stage_model.transformer.text_model.final_layer_norm.weight",
}


@pytest.fixture(scope="module")
def incomplete(original, tmp_path_factory):
    folder = tmp_path_factory.mktemp("incomplete")
    for name, key in DROPPED.items():
        save_file(to_ldm_state_dict(original, drop=key), str(folder / f"no-{name}-weight.safetensors"))
    return folder


@pytest.mark.parametrize("component", DROPPED)
def test_a_missing_weight_is_named_in_one_clear_error(incomplete, component):
    # diffusers builds the models on the meta device (accelerate) and fills them from the file, so a weight
    # the file lacks stays without data: it must never load, and the error says weights are missing.
    with pytest.raises(SpfbenchError, match=r"not a loadable SD1\.x single-file checkpoint: .*missing") as e:
        load_pipeline("sd15", model=str(incomplete / f"no-{component}-weight.safetensors"), device="cpu")
    assert "\n" not in str(e.value)
