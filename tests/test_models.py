import shutil

import numpy as np
import pytest
import torch

from spfbench.errors import MissingWeightsError, SpfbenchError
from spfbench.generation import GenerationSettings, generate
from spfbench.models import CONFIG_DIR, get_preset, load_pipeline, weight_rows

FAST = GenerationSettings(steps=3)
PROMPTS = ["A woman, playing a guitar, with a red background, in a white T-shirt", "A man, dancing, in a park"]
SEEDS = [5, 6]


def _images(pipe):
    return generate(pipe, PROMPTS, SEEDS, FAST, output_type="np")


def test_tiny_weights_are_seeded_and_leave_global_rng_alone(tiny_pipe):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again, info = load_pipeline("tiny")
    assert torch.equal(torch.rand(3), expected_next)  # loading did not consume the global RNG
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny_pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other, _ = load_pipeline("tiny", seed=1)
    assert not torch.equal(other.unet.conv_in.weight, tiny_pipe.unet.conv_in.weight)
    assert info.source == "random-init" and info.native_size == 64
    assert len(tiny_pipe.tokenizer) == tiny_pipe.text_encoder.config.vocab_size == 49408


def test_sd15_random_has_the_sd15_architecture():
    # Published parameter counts of SD1.5's UNet, VAE and CLIP ViT-L/14 text encoder.
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = CONFIG_DIR / get_preset("sd15-random").config
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(te)) == (859_520_964, 83_653_863, 123_060_480)


def test_unknown_preset_and_bad_combinations():
    with pytest.raises(SpfbenchError, match="unknown preset 'nope'"):
        load_pipeline("nope")
    with pytest.raises(SpfbenchError, match="random weights"):
        load_pipeline("tiny", model="some/repo")
    with pytest.raises(SpfbenchError, match="no such file or folder"):
        load_pipeline("sd15", model="./does-not-exist")


def test_missing_hub_weights_name_component_repo_and_remedy():
    with pytest.raises(MissingWeightsError) as e:
        load_pipeline("realistic-vision-v4")
    msg = str(e.value)
    assert "\n" not in msg
    assert "UNet of realistic-vision-v4" in msg
    assert "SG161222/Realistic_Vision_V4.0_noVAE" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "--model" in msg


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tiny_pipe):
    folder = tmp_path_factory.mktemp("tiny-diffusers")
    tiny_pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def test_local_diffusers_folder_round_trip(saved_tiny, tiny_pipe):
    pipe, info = load_pipeline("sd15", model=str(saved_tiny))
    assert info.source == str(saved_tiny.resolve())
    np.testing.assert_array_equal(_images(pipe), _images(tiny_pipe))


def test_folder_without_tokenizer_files_is_refused(saved_tiny, tmp_path):
    # transformers 5 would silently build a 2-token tokenizer from an empty folder.
    broken = tmp_path / "broken"
    shutil.copytree(saved_tiny, broken)
    for f in ("vocab.json", "merges.txt", "tokenizer.json"):
        (broken / "tokenizer" / f).unlink(missing_ok=True)
    assert {p.name for p in (broken / "tokenizer").iterdir()} == {"tokenizer_config.json"}
    with pytest.raises(MissingWeightsError, match="tokenizer .* 2 tokens but the text encoder expects 49408"):
        load_pipeline("sd15", model=str(broken))


def test_folder_without_unet_weights_names_the_unet(saved_tiny, tmp_path):
    broken = tmp_path / "nounet"
    shutil.copytree(saved_tiny, broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(MissingWeightsError, match=r"missing weights: UNet of sd15 \(.*nounet/unet\)"):
        load_pipeline("sd15", model=str(broken))


def _plant_in_hub_cache(cache, repo_id, files: dict, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay files out the way huggingface_hub caches a download (refs/main -> snapshots/<commit>/...)."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for rel, src in files.items():
        dst = root / "snapshots" / commit / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    return commit


def test_realistic_vision_preset_loads_offline_from_the_hub_cache(saved_tiny, tiny_pipe, hf_cache):
    rv = {str(p.relative_to(saved_tiny)): p for p in saved_tiny.rglob("*") if p.is_file() and not p.parts[-2] == "vae"}
    vae = {p.name: p for p in (saved_tiny / "vae").iterdir()}
    try:
        commit = _plant_in_hub_cache(hf_cache, "SG161222/Realistic_Vision_V4.0_noVAE", rv)
        _plant_in_hub_cache(hf_cache, "stabilityai/sd-vae-ft-mse", vae)
        rows = {r["name"]: r for r in weight_rows()}
        assert rows["realistic-vision-v4/unet"]["present"] and rows["realistic-vision-v4/vae"]["present"]
        assert not rows["sd15/unet"]["present"]
        pipe, info = load_pipeline("realistic-vision-v4")
        assert info.resolved_revision == commit and info.vae_source == "stabilityai/sd-vae-ft-mse"
        np.testing.assert_array_equal(_images(pipe), _images(tiny_pipe))
    finally:
        for repo in ("SG161222--Realistic_Vision_V4.0_noVAE", "stabilityai--sd-vae-ft-mse"):
            shutil.rmtree(hf_cache / f"models--{repo}", ignore_errors=True)


def test_pickled_single_file_is_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really")
    with pytest.raises(SpfbenchError, match="only .safetensors single-file"):
        load_pipeline("sd15", model=str(ckpt))
