import json

import numpy as np
import pytest
import torch

from spfbench.errors import SpfbenchError
from spfbench.models import CONFIG_DIR
from spfbench.generation import GenerationSettings, generate, initial_noise, latent_shape, make_scheduler

PROMPTS = [
    "A woman, playing a guitar, with a red background, in a white T-shirt",
    "A man, reading a book, in a park, in a blue shirt",
    "A girl, dancing, at the beach, in a yellow dress",
    "An old man, feeding pigeons, on a bridge, in a grey sweater",
]
SEEDS = [11, 22, 33, 44]


def test_initial_noise_is_a_function_of_the_seed_alone():
    shape = (4, 16, 16)
    noise, _ = initial_noise(1234, shape)
    # independent computation: the documented contract, written out
    g = torch.Generator("cpu")
    g.manual_seed(1234)
    assert torch.equal(noise, torch.randn(1, *shape, generator=g))
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert not torch.equal(noise, initial_noise(1235, shape)[0])


def test_pipeline_starts_from_each_items_own_noise(tiny_pipe, monkeypatch):
    seen = []
    original = type(tiny_pipe).prepare_latents

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append(out.clone())
        return out

    monkeypatch.setattr(type(tiny_pipe), "prepare_latents", spy)
    s = GenerationSettings(sampler="ddim", steps=2)
    generate(tiny_pipe, PROMPTS, SEEDS, s)
    generate(tiny_pipe, PROMPTS[2:3], SEEDS[2:3], s)
    shape = latent_shape(tiny_pipe, 64, 64)
    sigma = tiny_pipe.scheduler.init_noise_sigma
    for i, seed in enumerate(SEEDS):
        assert torch.equal(seen[0][i : i + 1], initial_noise(seed, shape)[0] * sigma)
    assert torch.equal(seen[1], seen[0][2:3])  # batch of 1 vs batch of 4: identical noise


@pytest.mark.parametrize("sampler", ["dpmpp-2m-karras", "euler-a"])
def test_same_seed_same_image_at_batch_sizes_1_and_4(tiny_pipe, sampler):
    s = GenerationSettings(sampler=sampler, steps=6)
    batched = generate(tiny_pipe, PROMPTS, SEEDS, s, output_type="np")
    single = np.concatenate([generate(tiny_pipe, [p], [z], s, output_type="np") for p, z in zip(PROMPTS, SEEDS)])
    # Same noise and same computation; only float summation order differs between batch shapes.
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5)
    # and the neighbours do not matter: item 0 next to other prompts and seeds
    shuffled = generate(tiny_pipe, [PROMPTS[3], PROMPTS[0]], [SEEDS[3], SEEDS[0]], s, output_type="np")
    np.testing.assert_allclose(shuffled[1], batched[0], rtol=0, atol=1e-5)
    # repeat: bit-identical
    np.testing.assert_array_equal(generate(tiny_pipe, PROMPTS, SEEDS, s, output_type="np"), batched)
    assert np.abs(batched[0] - batched[1]).max() > 1e-3  # different seeds/prompts give different images


def test_prompt_embeds_path_equals_prompt_path(tiny_pipe):
    # Methods that condition differently (Magnet, SPF) pass embeddings; same embeddings, same image.
    s = GenerationSettings(steps=3)
    embeds, negative = tiny_pipe.encode_prompt(PROMPTS[:2], tiny_pipe.device, 1, True)
    a = generate(tiny_pipe, PROMPTS[:2], SEEDS[:2], s, output_type="np")
    b = generate(tiny_pipe, None, SEEDS[:2], s, prompt_embeds=embeds, negative_prompt_embeds=negative, output_type="np")
    np.testing.assert_array_equal(a, b)


def test_pil_output_size_and_explicit_size(tiny_pipe):
    imgs = generate(tiny_pipe, PROMPTS[:1], SEEDS[:1], GenerationSettings(steps=2))
    assert imgs[0].size == (64, 64) and imgs[0].mode == "RGB"
    imgs = generate(tiny_pipe, PROMPTS[:1], SEEDS[:1], GenerationSettings(steps=2, height=48, width=80))
    assert imgs[0].size == (80, 48)


def test_negative_prompt_changes_the_image(tiny_pipe):
    s = GenerationSettings(steps=3)
    a = generate(tiny_pipe, PROMPTS[:1], SEEDS[:1], s, output_type="np")
    b = generate(tiny_pipe, PROMPTS[:1], SEEDS[:1], GenerationSettings(steps=3, negative_prompt="blurry"), output_type="np")
    assert np.abs(a - b).max() > 1e-4


def test_sampler_keeps_the_models_noise_schedule():
    from diffusers import PNDMScheduler

    base = PNDMScheduler.from_pretrained(CONFIG_DIR / "tiny" / "scheduler").config
    for name in ("ddim", "euler", "dpmpp-2m-karras", "unipc"):
        sch = make_scheduler(base, name)
        assert sch.config.beta_start == 0.00085 and sch.config.beta_end == 0.012
        assert sch.config.beta_schedule == "scaled_linear" and sch.config.prediction_type == "epsilon"
    assert make_scheduler(base, "dpmpp-2m-karras").config.use_karras_sigmas is True


@pytest.mark.parametrize(
    "settings,message",
    [
        (GenerationSettings(sampler="magic"), "unknown sampler 'magic'"),
        (GenerationSettings(steps=0), "steps must be positive"),
        (GenerationSettings(height=50), "multiple of 8"),
        (GenerationSettings(guidance_scale=-1.0), "guidance must be a finite number >= 0"),
        (GenerationSettings(guidance_scale=float("nan")), "guidance must be a finite number >= 0"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(SpfbenchError, match=message):
        settings.validate()


def test_no_sampler_named_means_the_models_default_and_its_config_survives_a_swap():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    from spfbench.generation import PROTOCOL_SAMPLER, default_sampler, model_scheduler_config, use_sampler

    base = PNDMScheduler.from_pretrained(CONFIG_DIR / "tiny" / "scheduler").config
    zero = DDIMScheduler.from_config(base, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                     timestep_spacing="trailing").config
    assert default_sampler(base) == PROTOCOL_SAMPLER == "dpmpp-2m-karras" and default_sampler(zero) == "dpmpp-2m"
    assert GenerationSettings().resolved(64, base) == GenerationSettings(sampler="dpmpp-2m-karras", height=64, width=64)
    assert GenerationSettings(height=32).resolved(64, zero) == GenerationSettings(sampler="dpmpp-2m", height=32, width=64)
    assert GenerationSettings(sampler="ddim").resolved(64, zero).sampler == "ddim"  # a named sampler is kept
    class Pipe:  # a pipeline's scheduler slot (the memo keys pipelines weakly, as it does real ones)
        scheduler = DDIMScheduler.from_config(zero)

    pipe = Pipe()
    use_sampler(pipe, "dpmpp-2m")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and not pipe.scheduler.config.use_karras_sigmas
    use_sampler(pipe, "euler")  # built from the model's own config, not from the sampler set before
    assert model_scheduler_config(pipe)["_class_name"] == "DDIMScheduler" and model_scheduler_config(pipe).rescale_betas_zero_snr
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.timestep_spacing == "trailing"
    assert not [k for k in vars(pipe) if k != "scheduler"]  # nothing of the memo's on the pipeline


def test_build_testset_refuses_a_negative_guidance_before_writing(tmp_path):
    # regression (issue 22): --guidance -1 was accepted
    from typer.testing import CliRunner

    from spfbench.cli import app

    r = CliRunner().invoke(app, ["build-testset", "--preset", "tiny", "--n", "2", "--guidance", "-1", "--out", str(tmp_path / "ts")])
    assert isinstance(r.exception, SpfbenchError) and "guidance must be a finite number >= 0" in str(r.exception)  # main() prints it as one line
    assert not (tmp_path / "ts").exists()


@pytest.mark.parametrize("preset, args, want", [("tiny", [], 7.0), ("world", [], 3.0), ("world", ["--guidance", "5"], 5.0)])
def test_build_testset_takes_the_presets_guidance_unless_given(tmp_path, preset, args, want):
    # the world's protocol scale is 3 (docs/world.md, "Guidance and the bar"); every other preset keeps 7
    from typer.testing import CliRunner

    from spfbench.cli import app

    r = CliRunner().invoke(app, ["build-testset", "--preset", preset, "--n", "1", "--steps", "2", "--no-progress", *args,
                                 "--device", "cpu", "--out", str(tmp_path / "ts")])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "ts" / "testset.json").read_text())
    assert meta["generation"]["guidance_scale"] == want
