"""Bad input over every command (issue 22): one ``error:`` line, exit 2, no traceback, nothing written;
and a failed attempt leaves nothing that refuses the corrected command."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import FAST

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny complete test set, toy training data, customized images (the originals, renamed), bad files."""
    from spfbench.testset import TestsetBuilder
    from spfbench.toydata import make_toy_data

    root = tmp_path_factory.mktemp("bad-input")
    from spfbench.generation import GenerationSettings

    TestsetBuilder(root / "ts", preset="tiny", n=2, settings=GenerationSettings(steps=2)).run(progress=False)
    make_toy_data(root / "data", 8)
    (root / "images").mkdir()
    for p in (root / "ts" / "originals").glob("*.png"):
        shutil.copy(p, root / "images" / p.name)
    (root / "a_file").write_text("not a folder\n")
    (root / "empty").mkdir()
    (root / "dir.jsonl").mkdir()
    bad = root / "ts-bad"
    shutil.copytree(root / "ts", bad)
    text = (bad / "testset.json").read_text()
    (bad / "testset.json").write_text(text[: len(text) // 2])
    (root / "typo.json").write_text(json.dumps({"all": {"max_train_stepz": 2}}))
    (root / "ok.json").write_text(json.dumps({"all": {"max_train_steps": 2, "train_batch_size": 2}}))
    return root


def _cases():
    no_cuda = not torch.cuda.is_available()
    run = ["run", "--testset", "{r}/ts", "--data", "{r}/data", "--method", "naive", "--config", "{r}/ok.json"]
    score = ["score", "--testset", "{r}/ts", "--images", "{r}/images", "--preset", "tiny"]
    train = ["train", "--method", "naive", "--preset", "tiny", "--data", "{r}/data", "--max-steps", "2"]
    cases = [
        # (id, arguments, message fragment, paths that must not exist afterwards)
        ("score-out-file", score + ["--out", "{r}/a_file"], "is a file; give a folder", []),
        ("run-out-file", run + ["--out", "{r}/a_file"], "is a file; give a folder", []),
        ("train-out-file", train + ["--out", "{r}/a_file"], "is a file; give a folder", []),
        ("world-data-out-file", ["world", "data", "--n", "2", "--out", "{r}/a_file"], "is a file; give a folder", []),
        ("out-under-a-file", score + ["--out", "{r}/a_file/x"], "a_file is a file, not a folder", []),
        ("captions-out-dir", ["world", "captions", "--n", "2", "--out", "{r}/dir.jsonl"], "is a folder; give a file name", []),
        ("captions-under-file", ["world", "captions", "--n", "2", "--out", "{r}/a_file/c.jsonl"], "is a file, not a folder", []),
        ("score-corrupt-testset", ["score", "--testset", "{r}/ts-bad", "--images", "{r}/images", "--preset", "tiny", "--out", "{r}/o1"],
         "is not valid JSON", ["o1"]),
        ("run-corrupt-testset", ["run", "--testset", "{r}/ts-bad", "--data", "{r}/data", "--method", "naive", "--out", "{r}/o2"],
         "is not valid JSON", ["o2"]),
        ("run-unknown-metric", run + ["--metric", "fid@foo", "--out", "{r}/o3"], "unknown metric fid@foo", ["o3"]),
        ("run-typo-config", run[:-2] + ["--config", "{r}/typo.json", "--out", "{r}/o4"], "unknown option(s) max_train_stepz", ["o4"]),
        ("run-cuda-index", run + ["--device", "cuda:1", "--out", "{r}/o5"], "takes cpu or cuda", ["o5"]),
        ("train-cuda-index", train + ["--device", "cuda:1", "--out", "{r}/o6"], "takes cpu or cuda", ["o6"]),
        ("score-empty-images", ["score", "--testset", "{r}/ts", "--images", "{r}/empty", "--preset", "tiny", "--out", "{r}/o7"],
         "no image in", ["o7"]),
        ("testset-long-captions-option", ["build-testset", "--preset", "tiny", "--n", "2", "--long-captions", "cut", "--out", "{r}/o8"],
         "--long-captions must be one of refuse, truncate", ["o8"]),
        ("train-missing-weights", ["train", "--method", "naive", "--preset", "realistic-vision-v4", "--data", "{r}/data", "--max-steps", "2",
                                   "--out", "{r}/o10"], "missing weights", ["o10"]),
        ("testset-bad-device", ["build-testset", "--preset", "tiny", "--n", "2", "--device", "gpu", "--out", "{r}/o9"],
         "bad --device 'gpu'", ["o9"]),
    ]
    if no_cuda:
        cases += [
            ("score-cuda", score + ["--device", "cuda", "--out", "{r}/c1"], "no CUDA device is available", ["c1"]),
            ("run-cuda", run + ["--device", "cuda", "--out", "{r}/c2"], "no CUDA device is available", ["c2"]),
            ("train-cuda", train + ["--device", "cuda", "--out", "{r}/c3"], "no CUDA device is available", ["c3"]),
        ]
    return cases


@pytest.mark.parametrize("args, fragment, absent", [c[1:] for c in _cases()], ids=[c[0] for c in _cases()])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, cli, args, fragment, absent):
    before = (world / "a_file").read_text()
    code, out, err = cli(*(a.format(r=world) for a in args))
    assert code == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and fragment in lines[-1], err
    assert "Traceback" not in err + out
    for name in absent:
        assert not (world / name).exists(), name
    assert (world / "a_file").read_text() == before and not any((world / "empty").iterdir())


def test_debug_shows_the_traceback_instead(world, cli, monkeypatch):
    monkeypatch.setenv("SPFBENCH_DEBUG", "0")  # restored (unset) after the test: --debug sets it for the process
    from spfbench.errors import SpfbenchError

    with pytest.raises(SpfbenchError, match="is a file"):
        cli("--debug", "train", "--method", "naive", "--preset", "tiny", "--data", world / "data", "--out", world / "a_file")


def test_an_unforeseen_os_error_is_one_line_naming_the_file():
    from spfbench.cli import one_line

    e = PermissionError(13, "Permission denied", "/x/y.png")
    assert one_line(e) == "Permission denied: /x/y.png (rerun with --debug for the traceback)"
    assert "a -> b" in one_line(OSError(18, "Invalid cross-device link", "a", None, "b"))


def test_a_failed_build_leaves_nothing_and_the_corrected_command_runs(tmp_path, cli):
    # regression: without weights build-testset wrote testset.json first, and the suggested fix was refused
    code, _, err = cli("build-testset", "--preset", "realistic-vision-v4", "--n", "2", "--out", tmp_path / "ts")
    assert code == 2 and "missing weights" in err
    assert not (tmp_path / "ts").exists()
    code, out, err = cli("build-testset", "--preset", "tiny", "--n", "2", *FAST, "--out", tmp_path / "ts")
    assert code == 0, err
    # a folder a killed attempt left before its model loaded (testset.json, no model, no image) is replaced too
    (tmp_path / "ts2").mkdir()
    shutil.copy(tmp_path / "ts" / "testset.json", tmp_path / "ts2" / "testset.json")
    meta = json.loads((tmp_path / "ts2" / "testset.json").read_text())
    meta.update(model=None, status="incomplete")
    meta["spec"]["preset"] = "sd15"
    (tmp_path / "ts2" / "testset.json").write_text(json.dumps(meta))
    code, _, err = cli("build-testset", "--preset", "tiny", "--n", "2", *FAST, "--out", tmp_path / "ts2")
    assert code == 0, err
    # ... but one that holds originals is a test set: another spec is refused
    code, _, err = cli("build-testset", "--preset", "tiny", "--n", "3", *FAST, "--out", tmp_path / "ts2")
    assert code == 2 and "holds a different test set" in err


def test_a_wrong_images_folder_does_not_block_the_right_one(world, tmp_path, cli):
    code, _, err = cli("score", "--testset", world / "ts", "--images", world / "empty", "--preset", "tiny", "--out", tmp_path / "s")
    assert code == 2 and "no image in" in err and not (tmp_path / "s").exists()
    # a scoring folder whose attempt scored nothing (its score.json names other images) takes the corrected one
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "score.json").write_text(json.dumps({"spec": {"images": "elsewhere"}, "status": "running"}))
    code, out, err = cli("score", "--testset", world / "ts", "--images", world / "images", "--preset", "tiny",
                         "--metric", "lpips@alex-v0.1", "--no-progress", "--out", tmp_path / "s")
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "score.json").read_text())["spec"]["images"] == str((world / "images").resolve())
    # one that scored something is refused, as before
    code, _, err = cli("score", "--testset", world / "ts", "--images", world / "ts" / "originals", "--preset", "tiny",
                       "--metric", "lpips@alex-v0.1", "--no-progress", "--out", tmp_path / "s")
    assert code == 2 and "holds a scoring with a different images" in err


def test_a_method_that_failed_before_training_takes_the_corrected_config(world, tmp_path, cli):
    from spfbench.run import Runner

    # an earlier version saved the typo'd config and then failed at fit: the folder holds only that
    folder = tmp_path / "r" / "methods" / "naive"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"max_train_stepz": 2}))
    (folder / "status.json").write_text(json.dumps({"method": "naive", "status": "failed", "stage": "fit"}))
    runner = Runner(world / "ts", world / "data", tmp_path / "r", ["naive"], config={"all": {"max_train_steps": 2, "train_batch_size": 2}},
                    metric_ids=["lpips@alex-v0.1"], progress=False)
    assert runner.run()["naive"].status == "complete"
    assert json.loads((folder / "config.json").read_text())["max_train_steps"] == 2


@pytest.mark.parametrize("name, body, fragment", [
    ("bom.csv", "\ufeffbase_caption,target_text\nA man,a hat\n", None),
    ("open-quote.csv", 'base_caption,target_text\n"A man, smiling,a hat\nA woman,glasses\n', "row at line 2: unexpected end of data; is a quote left open?"),
    ("open-quote-target.csv", 'base_caption,target_text\nA man,"a hat\nA woman,glasses\n', "is a quote left open?"),
    ("extra-field.csv", "base_caption,target_text\nA man, smiling,a hat\n", "more fields than the header"),
])
def test_caption_files_with_a_bom_or_an_open_quote(tmp_path, name, body, fragment):
    from spfbench.captions import read_caption_file
    from spfbench.errors import SpfbenchError

    (tmp_path / name).write_text(body, encoding="utf-8")
    if fragment is None:
        assert [(r.base_caption, r.target_text) for r in read_caption_file(tmp_path / name)] == [("A man", "a hat")]
    else:
        with pytest.raises(SpfbenchError, match=fragment.replace("?", r"\?").replace("(", r"\(")):
            read_caption_file(tmp_path / name)


def test_a_target_past_77_tokens_is_refused_or_truncated_with_a_warning(tmp_path, cli):
    from spfbench.captions import join_caption
    from spfbench.testset import caption_tokens

    base = "A woman, " + ", ".join(["in a park with tall green trees"] * 9)
    rows = [{"base_caption": "A man, smiling", "target_text": "a hat"}, {"base_caption": base, "target_text": "freckles"}]
    b, t = caption_tokens([base, join_caption(base, "freckles")])
    assert b <= 77 < t  # the base fits, the target text falls past the encoder's window
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli("build-testset", "--preset", "tiny", "--captions", tmp_path / "c.jsonl", *FAST, "--out", tmp_path / "ts")
    assert code == 2 and f"target caption is {t} CLIP tokens, over the text encoder's 77" in err and "'freckles'" in err
    assert not (tmp_path / "ts").exists()
    code, out, err = cli("build-testset", "--preset", "tiny", "--captions", tmp_path / "c.jsonl", *FAST, "--long-captions", "truncate",
                         "--out", tmp_path / "ts")
    assert code == 0, err
    meta = json.loads((tmp_path / "ts" / "testset.json").read_text())
    (row,) = meta["caption_tokens"]["truncated"]
    assert row["target_tokens"] == t and row["id"] in err and "warning:" in err
    assert meta["caption_tokens"]["base_max"] == b and meta["spec"]["long_captions"] == "truncate"


def test_a_misnamed_image_is_named_in_the_summary(world, tmp_path, cli):
    imgs = tmp_path / "imgs"
    shutil.copytree(world / "images", imgs)
    first = sorted(imgs.glob("*.png"))[0]
    first.rename(imgs / "renamed.png")
    code, out, err = cli("score", "--testset", world / "ts", "--images", imgs, "--preset", "tiny", "--metric", "lpips@alex-v0.1",
                         "--no-progress", "--out", tmp_path / "s")
    assert code == 0, err
    assert "1 missing" in out and "1 image file(s) named by no triple id (renamed.png)" in out
