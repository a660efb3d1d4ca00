"""The world's commands (spfbench/world/cli.py): a typer app of its own, attached as ``spfbench world``; every
command's help; its options reach the function they run with the same defaults; bad input is one
``error:`` line, exit 2, and writes nothing."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import snapshot
from spfbench.world.cli import app

COMMANDS = {  # command -> options its help must list
    "data": ["--out", "--split", "--n", "--seed", "--size"],
    "captions": ["--out", "--n", "--seed"],
    "attributes": ["RUN"],
    "train-model": ["--out", "--work", "--vae-n", "--vae-steps", "--vae-batch-size", "--unet-n", "--unet-steps", "--batch-size", "--lr",
                    "--seed", "--threads", "--eval-n", "--device", "--unet-more"],
    "continue-model": ["--model", "--out", "--work", "--steps", "--lr", "--batch-size", "--unet-n", "--seed", "--threads", "--noise-offset",
                       "--detail-weight", "--objective", "--eval-n", "--device", "--text-encoder"],
    "finetune-decoder": ["--model", "--out", "--work", "--steps", "--lr", "--batch-size", "--n", "--detail-weight", "--seed", "--threads",
                         "--eval-n", "--reader"],
    "evaluate-model": ["--model", "--n", "--seed", "--threads", "--json", "--checkpoint", "--vae", "--card"],
    "train-reader": ["--out", "--n-train", "--n-val", "--epochs", "--seed", "--threads", "--vae", "--vae-share", "--widths", "--hidden"],
    "train-clip": ["--out", "--n-images", "--steps", "--batch-size", "--lr", "--aux-weight", "--seed", "--threads", "--n-eval", "--cache",
                   "--init", "--freeze-text"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    for option in COMMANDS[command]:
        assert option in result.output, (command, option)


def test_the_suite_lists_the_world_commands(cli):
    code, out, err = cli("world", "--help")
    assert code == 0, err
    assert all(c in out for c in COMMANDS)


def _spy(monkeypatch, module, name):
    seen = {}

    def record(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)

    monkeypatch.setattr(module, name, record)
    return seen


def test_train_model_parses_its_stages_and_records_its_command(monkeypatch, cli, tmp_path):
    from spfbench.world import recipe

    seen = _spy(monkeypatch, recipe, "train")
    code, _, err = cli("world", "train-model", "--out", tmp_path / "o", "--work", tmp_path / "w", "--unet-steps", "5",
                       "--unet-more", "6000:3e-4", "--unet-more", "2000:1e-4:offset=0.1:vzero:detail=10")
    assert code == 0, err
    args = seen["args"]
    assert args[:7] == (tmp_path / "o", tmp_path / "w", 10000, 2500, 16, 30000, 5) and args[7:11] == (64, 5e-4, 0, 2)
    assert args[12] == [{"steps": 6000, "lr": 3e-4}, {"steps": 2000, "lr": 1e-4, "noise_offset": 0.1, "vzero": True, "detail_weight": 10.0}]
    assert seen["kwargs"]["command"] == (f"spfbench world train-model --out {tmp_path / 'o'} --work {tmp_path / 'w'} --unet-steps 5"
                                         " --unet-more 6000:3e-4 --unet-more 2000:1e-4:offset=0.1:vzero:detail=10")
    code, _, err = cli("world", "train-model", "--out", tmp_path / "o", "--work", tmp_path / "w")
    assert code == 0 and seen["args"][12] == recipe.CONTINUATIONS  # the shipped model's stages by default


def test_reader_and_clip_commands_pass_the_functions_defaults(monkeypatch, cli, tmp_path):
    import inspect

    from spfbench.world import clip_training, reader

    defaults = {k: p.default for k, p in inspect.signature(reader.train_reader).parameters.items()}
    seen = _spy(monkeypatch, reader, "train_reader")
    code, _, err = cli("world", "train-reader", "--out", tmp_path / "r.safetensors")
    assert code == 0, err
    assert seen["args"] == (tmp_path / "r.safetensors", defaults["n_train"], defaults["n_val"], defaults["epochs"], defaults["seed"])
    assert seen["kwargs"] == {"threads": defaults["threads"], "vae": None, "vae_share": defaults["vae_share"], "widths": defaults["widths"],
                              "hidden": defaults["hidden"]}
    defaults = {k: p.default for k, p in inspect.signature(clip_training.train_world_clip).parameters.items()}
    seen = _spy(monkeypatch, clip_training, "train_world_clip")
    code, _, err = cli("world", "train-clip", "--out", tmp_path / "c.safetensors", "--freeze-text", "--init", tmp_path / "i.safetensors")
    assert code == 0, err
    assert seen["args"] == (tmp_path / "c.safetensors", *(defaults[k] for k in ("n_images", "steps", "batch_size", "seed")))
    assert seen["kwargs"] == {"lr": defaults["lr"], "aux_weight": defaults["aux_weight"], "threads": defaults["threads"],
                              "n_eval": defaults["n_eval"], "cache": None, "init": tmp_path / "i.safetensors", "freeze_text": True}


BAD = [
    # (id, arguments, the one error line's fragment)
    ("stage-not-steps-lr", ["train-model", "--unet-more", "6000"], "--unet-more '6000': give STEPS:LR, then optionally :offset=X, :vzero"),
    ("stage-twice-vzero", ["train-model", "--unet-more", "1:2:vzero:vzero"], "--unet-more '1:2:vzero:vzero': give STEPS:LR"),
    ("stage-zero-steps", ["train-model", "--unet-more", "0:1e-4"], "--unet-more '0:1e-4': steps and LR must be positive"),
    ("stage-negative-offset", ["train-model", "--unet-more", "10:1e-4:offset=-1"], "the noise offset and detail weight >= 0"),
    ("train-model-device", ["train-model", "--device", "gpu"], "--device 'gpu' is not a device torch knows"),
    ("continue-objective", ["continue-model", "--steps", "1", "--objective", "x0"], "--objective must be one of model, epsilon, vzero, got 'x0'"),
    ("continue-no-model", ["continue-model", "--model", "{r}/nothing", "--steps", "1"], "no world model folder at"),
    ("continue-offset", ["continue-model", "--steps", "1", "--noise-offset", "inf"], "--noise-offset must be a finite number >= 0, got inf"),
    ("decoder-no-model", ["finetune-decoder", "--model", "{r}/nothing", "--steps", "1"], "no world model folder at"),
    ("evaluate-card", ["evaluate-model", "--model", "{r}/nothing", "--card"], "no world model card at"),
    ("reader-widths", ["train-reader", "--widths", "8,a"], "--widths takes comma-separated integers, got '8,a'"),
    ("reader-share", ["train-reader", "--vae-share", "1.5"], "vae_share must be between 0 and 1, got 1.5"),
    ("clip-freeze", ["train-clip", "--freeze-text"], "freeze_text keeps a trained text tower: give init"),
]
OUT = {  # each command's outputs, inside the test's folder (never the shipped weights)
    "train-model": ["--out", "{r}/out", "--work", "{r}/work"], "continue-model": ["--out", "{r}/out", "--work", "{r}/work"],
    "finetune-decoder": ["--out", "{r}/out", "--work", "{r}/work"], "evaluate-model": ["--json", "{r}/out.json"],
    "train-reader": ["--out", "{r}/out.safetensors"], "train-clip": ["--out", "{r}/out.safetensors"],
}


@pytest.mark.parametrize("args, fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, cli, args, fragment):
    (tmp_path / "kept.txt").write_text("here before\n")
    before = snapshot(tmp_path)
    args = [a.format(r=tmp_path) for a in args + OUT[args[0]]]
    code, out, err = cli("world", *args)
    assert code == 2, (out, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert snapshot(tmp_path) == before
