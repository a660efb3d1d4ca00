import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, snapshot
from spfbench.captions import categories, derive_seed, join_caption
from spfbench.testset import TestsetBuilder, load_testset

ROW_KEYS = ["id", "index", "base_caption", "target_text", "target_caption", "category", "seed", "original"]


def build(cli, out, *extra, n=6):
    code, stdout, stderr = cli("build-testset", "--preset", "tiny", "--n", n, "--out", out, *FAST, *extra)
    assert code == 0, stderr
    return stdout


def test_two_runs_give_identical_folders_and_rerun_is_a_no_op(cli, tmp_path):
    build(cli, tmp_path / "a")
    build(cli, tmp_path / "b")
    a = snapshot(tmp_path / "a")
    assert a == snapshot(tmp_path / "b")
    assert len([k for k in a if k.startswith("originals/")]) == 6
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a" / "originals").iterdir()}
    out = build(cli, tmp_path / "a")
    assert "(0 generated now)" in out
    assert snapshot(tmp_path / "a") == a
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a" / "originals").iterdir()} == mtimes


def test_manifest_schema(cli, tmp_path):
    n = 2 * len(categories()) + 1
    build(cli, tmp_path / "t", "--seed", "9", n=n)
    meta, triples = load_testset(tmp_path / "t")
    rows = [json.loads(line) for line in (tmp_path / "t" / "testset.jsonl").read_text().splitlines()]
    assert len(rows) == n and all(list(r) == ROW_KEYS for r in rows)
    assert len({r["id"] for r in rows}) == n
    for i, r in enumerate(rows):
        assert r["index"] == i and r["seed"] == derive_seed(9, i)
        assert r["target_caption"] == join_caption(r["base_caption"], r["target_text"])
        assert r["original"] == f"originals/{r['id']}.png" and (tmp_path / "t" / r["original"]).is_file()
        assert r["base_caption"] not in r["original"]
    assert meta["status"] == "complete" and meta["format_version"] == 1 and meta["n"] == n
    assert meta["generation"] == {"sampler": "dpmpp-2m-karras", "steps": 4, "guidance_scale": 7.0, "height": 64, "width": 64, "negative_prompt": ""}
    assert meta["model"]["preset"] == "tiny" and meta["spec"]["seed"] == 9
    assert sum(meta["categories"].values()) == n and set(meta["categories"]) == set(categories())
    manifest = (tmp_path / "t" / "testset.jsonl").read_bytes()
    checks = (tmp_path / "t" / "originals.sha256").read_text()
    for line in checks.splitlines():  # sha256sum -c format
        digest, rel = line.split("  ")
        assert hashlib.sha256((tmp_path / "t" / rel).read_bytes()).hexdigest() == digest
    assert meta["triples_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert meta["content_sha256"] == hashlib.sha256(manifest + checks.encode()).hexdigest()


def test_resume_after_interruption_equals_uninterrupted(cli, tmp_path, monkeypatch):
    import spfbench.testset as ts

    build(cli, tmp_path / "clean", "--batch-size", "2", n=7)
    real, calls = ts.generate, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while computing the third batch
        return real(*args, **kwargs)

    monkeypatch.setattr(ts, "generate", dying)
    code, _, err = cli("build-testset", "--preset", "tiny", "--n", 7, "--out", tmp_path / "cut", "--batch-size", 2, *FAST)
    assert code == 130 and "rerun the same command to resume" in err
    assert len(list((tmp_path / "cut" / "originals").glob("*.png"))) == 4
    assert json.loads((tmp_path / "cut" / "testset.json").read_text())["status"] == "incomplete"
    # a half-written file left by a process that died (pid that cannot be alive)
    from spfbench import io

    stale = tmp_path / "cut" / "originals" / f".00004-x.png.{io._HOST}.999999999.tmp"
    stale.write_bytes(b"half")
    monkeypatch.setattr(ts, "generate", real)
    build(cli, tmp_path / "cut", "--batch-size", "2", n=7)
    assert snapshot(tmp_path / "cut") == snapshot(tmp_path / "clean")


def test_resume_after_sigkill(tmp_path):
    # A real crash: the process is killed with SIGKILL while it writes images.
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "spfbench", "build-testset", "--preset", "tiny", "--n", "24", "--batch-size", "1", "--out", str(out), *FAST]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("originals/*.png"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list((out / "originals").glob("*.png")))
    assert 3 <= partial < 24
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clean = tmp_path / "clean"
    subprocess.run(args[:-len(FAST) - 2] + ["--out", str(clean), *FAST], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert snapshot(out) == snapshot(clean)
    assert not [p for p in out.rglob(".*") if p.is_file()]


def test_two_shards_equal_one_run(cli, tmp_path):
    build(cli, tmp_path / "one", "--batch-size", "2", n=7)
    first = build(cli, tmp_path / "two", "--batch-size", "2", "--shard", "2/2", n=7)
    assert "shard 2/2 done" in first and "3/7 originals present" in first
    second = build(cli, tmp_path / "two", "--batch-size", "2", "--shard", "1/2", n=7)
    assert "test set complete" in second
    assert snapshot(tmp_path / "two") == snapshot(tmp_path / "one")


def test_accelerate_launch_shares_the_work(tmp_path):
    out = tmp_path / "acc"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # two CPU processes: accelerate's --cpu launches a single process; --multi_gpu starts torchrun's workers
    # (on a machine without CUDA spfbench makes them one MULTI_CPU group)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "spfbench", "build-testset", "--preset", "tiny",
           "--n", "5", "--batch-size", "2", "--out", str(out), *FAST]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # two processes really ran (a single one would print one line): each reports its shard ("shard I/2 done") or,
    # when it found the set finished, "test set complete"
    lines = r.stdout.splitlines()
    assert sum(x.startswith("shard ") and "/2 done" in x or x.startswith("test set complete") for x in lines) == 2
    ref = tmp_path / "ref"
    # accelerate runs each CPU process with one thread; CPU float results depend on the thread count
    subprocess.run([sys.executable, "-m", "spfbench", "build-testset", "--preset", "tiny", "--n", "5", "--batch-size", "2",
                    "--out", str(ref), *FAST], env=env, check=True, capture_output=True)
    assert snapshot(out) == snapshot(ref)


def test_captions_file(cli, tmp_path):
    f = tmp_path / "caps.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        {"base_caption": "A woman, playing a guitar, with a red background, in a white T-shirt.", "target_text": "a hat", "category": "headwear", "seed": 42},
        {"base_caption": "A man, dancing", "target_text": "freckles"},
        {"base_caption": "A girl, reading", "target_text": "pencil drawing style"},
    ]))
    build(cli, tmp_path / "t", "--captions", f, n=2)
    _, triples = load_testset(tmp_path / "t")
    assert [t.target_caption for t in triples] == [
        "A woman, playing a guitar, with a red background, in a white T-shirt, a hat",
        "A man, dancing, freckles",
    ]
    assert triples[0].seed == 42 and triples[1].seed == derive_seed(0, 1)
    assert [t.category for t in triples] == ["headwear", "custom"]
    code, _, _ = cli("build-testset", "--preset", "tiny", "--out", tmp_path / "all", "--captions", f, *FAST)
    assert code == 0 and len(load_testset(tmp_path / "all")[1]) == 3


# ---------------------------------------------------------------- bad input


def _bad(cli, *args):
    code, out, err = cli("build-testset", *FAST, *args)
    assert code == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_inputs_fail_cleanly_and_lose_nothing(cli, tmp_path):
    existing = tmp_path / "existing"
    build(cli, existing, n=4)
    before = snapshot(existing)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    nocols = tmp_path / "nocols.csv"
    nocols.write_text("caption\nA woman\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["--preset", "nope", "--n", "4", "--out", tmp_path / "x1"], "unknown preset 'nope'"),
        (["--preset", "tiny", "--n", "0", "--out", tmp_path / "x2"], "--n must be positive"),
        (["--preset", "tiny", "--n", "-3", "--out", tmp_path / "x2"], "--n must be positive"),
        (["--preset", "tiny", "--captions", tmp_path / "missing.csv", "--out", tmp_path / "x3"], "does not exist"),
        (["--preset", "tiny", "--captions", empty, "--out", tmp_path / "x4"], "holds no rows"),
        (["--preset", "tiny", "--captions", nocols, "--out", tmp_path / "x5"], "lacks column(s) base_caption, target_text"),
        (["--preset", "tiny", "--n", "5", "--out", existing], "holds a different test set (n: 4 there, 5 now)"),
        (["--preset", "tiny", "--n", "4", "--seed", "1", "--out", existing], "holds a different test set (seed: 0 there, 1 now)"),
        (["--preset", "tiny", "--n", "4", "--out", a_file / "sub"], "cannot write to --out"),
        (["--preset", "tiny", "--n", "4", "--out", a_file], "exists and is not a folder"),
        (["--preset", "tiny", "--n", "4", "--shard", "3/2", "--out", tmp_path / "x6"], "need 1 <= I <= K"),
        (["--preset", "tiny", "--n", "4", "--shard", "a/b", "--out", tmp_path / "x6"], "expected I/K"),
        (["--preset", "tiny", "--n", "4", "--sampler", "magic", "--out", tmp_path / "x7"], "unknown sampler"),
        (["--preset", "tiny", "--n", "4", "--device", "cuda:0", "--out", tmp_path / "x8"], "no CUDA device"),
    ]
    for args, message in cases:
        line = _bad(cli, *args)
        assert message in line, (args, line)
    assert snapshot(existing) == before
    for i in range(1, 9):
        assert not (tmp_path / f"x{i}").exists()
    # a folder with something else in it
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "is not empty and holds no testset.json" in _bad(cli, "--preset", "tiny", "--n", "4", "--out", other)
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1


def test_no_sampler_is_the_models_default_and_a_resume_never_switches_sampler(cli, tmp_path):
    named, default = tmp_path / "named", tmp_path / "default"
    build(cli, named, "--sampler", "dpmpp-2m-karras", n=2)
    build(cli, default, n=2)
    meta, _ = load_testset(default)
    assert meta["spec"]["generation"]["sampler"] is None and meta["generation"]["sampler"] == "dpmpp-2m-karras"
    pngs = lambda d: {k: v for k, v in snapshot(d).items() if k.startswith("originals/")}  # noqa: E731
    assert pngs(named) == pngs(default)  # the tiny model's default is the protocol's sampler
    # a folder built with a named sampler: resuming without it says which one to pass
    before = snapshot(named)
    line = _bad(cli, "--preset", "tiny", "--n", "2", "--out", named)
    assert "holds a different test set" in line and "pass --sampler dpmpp-2m-karras to resume it" in line
    # originals made with one sampler are never continued with another (the model's config changed)
    meta_path = default / "testset.json"
    m = json.loads(meta_path.read_text())
    m["generation"]["sampler"], m["status"] = "ddim", "incomplete"
    meta_path.write_text(json.dumps(m))
    _, triples = load_testset(default)
    (default / triples[0].original).unlink()
    line = _bad(cli, "--preset", "tiny", "--n", "2", "--out", default)
    assert "originals so far were made with" in line and "'sampler': 'ddim'" in line
    assert (default / triples[1].original).is_file() and snapshot(named) == before


def test_missing_weights_is_a_clean_cli_error(cli, tmp_path):
    line = _bad(cli, "--n", "2", "--out", tmp_path / "rv")
    assert "missing weights: UNet of realistic-vision-v4" in line and "SG161222/Realistic_Vision_V4.0_noVAE" in line


def test_weights_command(cli):
    code, out, _ = cli("weights")
    assert code == 0
    assert "hf://SG161222/Realistic_Vision_V4.0_noVAE/unet/diffusion_pytorch_model.safetensors" in out
    from spfbench.weights import all_weight_rows

    rows = all_weight_rows()
    assert "3.44 GB" in out and f"1 of {len(rows)} files present locally" in out  # only the LPIPS heads (in the wheel)
    for expected in ("weights-inception-2015-12-05-6726825d.pth", "hf://timm/vit_large_patch14_clip_224.openai",
                     "buffalo_l.zip", "sam_vit_h_4b8939.pth", "hf://xswu/HPSv2/HPS_v2.1_compressed.pt"):
        assert expected in out
    assert {"fid-inception", "sam-vit-h", "hpsv2", "mps"} <= {r["name"] for r in rows}


def test_builder_validates_before_touching_anything(tmp_path):
    with pytest.raises(Exception):
        TestsetBuilder(tmp_path / "never", preset="tiny", n=0)
    assert not (tmp_path / "never").exists()


def test_real_preset_from_a_local_folder_matches_and_resumes_by_any_path_spelling(cli, tmp_path, monkeypatch, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "model", safe_serialization=True)
    monkeypatch.chdir(tmp_path)
    build(cli, tmp_path / "real", "--preset", "sd15", "--model", "model", "--device", "cpu", n=3)
    meta, _ = load_testset(tmp_path / "real")
    assert meta["spec"]["model"] == str((tmp_path / "model").resolve())
    assert meta["model"]["source"] == str((tmp_path / "model").resolve())
    out = build(cli, tmp_path / "real", "--preset", "sd15", "--model", str(tmp_path / "model"), "--device", "cpu", n=3)
    assert "(0 generated now)" in out
    build(cli, tmp_path / "random", n=3)
    real, rand = snapshot(tmp_path / "real"), snapshot(tmp_path / "random")
    assert {k: v for k, v in real.items() if k.startswith("originals")} == {k: v for k, v in rand.items() if k.startswith("originals")}
