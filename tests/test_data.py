"""Training data: toy renderer, the three formats, validation errors, preprocessing, fingerprint, cache."""

import gzip
import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import snapshot
from spfbench.captions import join_caption, load_vocab
from spfbench.data import (
    CachedDataset,
    PortraitDataset,
    cache_encodings,
    collate,
    dataset_fingerprint,
    describe_dataset,
    detect_format,
    flip_decision,
    preprocess,
)
from spfbench.errors import SpfbenchError
from spfbench.toydata import TOY_TARGETS, make_toy_data, toy_attributes

N = 8
SIZE = 40
R = 32


# ---------------------------------------------------------------------------------------------- builders


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]


def write_rows(folder: Path, rows: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_hf(src: Path, out: Path, dict_split: str | None = None, image_feature=True) -> Path:
    import datasets

    rows = rows_of(src)
    cols = {
        "image": [str(src / r["file_name"]) for r in rows],
        "base_caption": [r["base_caption"] for r in rows],
        "target_text": [r["target_text"] for r in rows],
        "category": [r["category"] for r in rows],
        "attributes": [r["attributes"] for r in rows],
    }
    ds = datasets.Dataset.from_dict(cols)
    if image_feature:
        ds = ds.cast_column("image", datasets.Image())
    if dict_split:
        ds = datasets.DatasetDict({dict_split: ds})
    datasets.disable_progress_bars()
    ds.save_to_disk(str(out))
    return out


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_wds(src: Path, out: Path, per_shard: int = 3, mutate=None) -> Path:
    """Shards of (KEY.png, KEY.json); mutate(i, members) may edit a sample's member dict."""
    out.mkdir(parents=True, exist_ok=True)
    rows = rows_of(src)
    for s in range(0, len(rows), per_shard):
        with tarfile.open(out / f"shard-{s // per_shard:04d}.tar", "w") as tf:
            for i in range(s, min(len(rows), s + per_shard)):
                r = rows[i]
                meta = {k: v for k, v in r.items() if k != "file_name"}
                members = {f"{i:05d}.png": (src / r["file_name"]).read_bytes(), f"{i:05d}.json": json.dumps(meta).encode()}
                if mutate:
                    members = mutate(i, members)
                for name, data in members.items():
                    add(tf, name, data)
    return out


def item_equal(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        if isinstance(a[k], torch.Tensor):
            if not torch.equal(a[k], b[k]):
                return False
        elif a[k] != b[k]:
            return False
    return True


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "set"
    make_toy_data(out, N, seed=3, size=SIZE)
    return out


@pytest.fixture
def toy_copy(toy, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(toy, dst)
    return dst


# ---------------------------------------------------------------------------------------------- toy data


def test_toy_data_is_deterministic_prefix_stable_and_resumable(tmp_path, toy):
    r = make_toy_data(tmp_path / "a", N, seed=3, size=SIZE)
    assert (r.out, r.n, r.written) == (tmp_path / "a", N, N)
    assert sum(r.targets.values()) == N and set(r.targets) == {"a hat", "glasses", "freckles", "pencil drawing style"}
    assert snapshot(tmp_path / "a") == snapshot(toy)
    assert snapshot(tmp_path / "a") != snapshot(make_toy_data(tmp_path / "b", N, seed=4, size=SIZE).out)
    small = snapshot(make_toy_data(tmp_path / "c", 3, seed=3, size=SIZE).out)
    assert all(small[f"images/{i:05d}.png"] == snapshot(toy)[f"images/{i:05d}.png"] for i in range(3))
    # interrupted: an image and the metadata missing -> the rerun writes just those, byte-identical
    (tmp_path / "a" / "images" / "00002.png").unlink()
    (tmp_path / "a" / "metadata.jsonl").unlink()
    assert make_toy_data(tmp_path / "a", N, seed=3, size=SIZE).written == 1
    assert snapshot(tmp_path / "a") == snapshot(toy)
    before = snapshot(tmp_path / "a")
    with pytest.raises(SpfbenchError, match="different toy set"):
        make_toy_data(tmp_path / "a", N, seed=5, size=SIZE)
    assert snapshot(tmp_path / "a") == before
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("x")
    with pytest.raises(SpfbenchError, match="not empty"):
        make_toy_data(tmp_path / "d", 2)
    for bad, msg in [(dict(n=0), "--n"), (dict(n=2, size=8), "--size"), (dict(n=2, targets=["a cape"]), "unknown toy target")]:
        with pytest.raises(SpfbenchError, match=msg):
            make_toy_data(tmp_path / "e", **bad)
    assert not (tmp_path / "e").exists()


def test_toy_captions_follow_the_drawn_attributes(toy):
    from PIL import Image

    vocab = load_vocab()
    subjects = {s["text"] for s in vocab["subjects"]}
    for i, row in enumerate(rows_of(toy)):
        a = row["attributes"]
        assert a == toy_attributes(i, 3)
        assert row["target_text"] == a["target"] == ["a hat", "glasses", "freckles", "pencil drawing style"][i % 4]
        assert row["category"] == TOY_TARGETS[a["target"]]
        assert a["subject"] in subjects and a["clothing_color"] in vocab["clothing_colors"] and a["garment"] in vocab["clothing_garments"]
        article = "an" if a["clothing_color"][0] in "aeiou" else "a"
        assert row["base_caption"] == f"{a['subject']}, {a['expression']}, {a['background']}, in {article} {a['clothing_color']} {a['garment']}"
        assert a["hat"] is not None if a["target"] == "a hat" else a["hat"] is None
        assert a["glasses"] == (a["target"] == "glasses") and a["freckles"] == (a["target"] == "freckles")
        img = Image.open(toy / row["file_name"])
        assert img.size == (SIZE, SIZE) and img.mode == "RGB"
        px = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        grey = bool(torch.equal(px[0], px[1]) and torch.equal(px[1], px[2]))
        assert grey == (a["style"] == "pencil drawing style")


def test_toy_optional_targets_and_larger_size(tmp_path):
    r = make_toy_data(tmp_path / "t", 4, size=96, targets=["sunglasses", "a beard"])
    rows = rows_of(r.out)
    assert [x["target_text"] for x in rows] == ["sunglasses", "a beard"] * 2
    assert all(x["attributes"]["sex"] == "male" and x["attributes"]["age"] != "child" for x in rows[1::2])
    ds = PortraitDataset(r.out, 64)
    assert ds[0]["pixel_values"].shape == (3, 64, 64)


# ---------------------------------------------------------------------------------------------- items and formats


def test_imagefolder_items(toy):
    ds = PortraitDataset(toy, R)
    rows = rows_of(toy)
    assert len(ds) == N and ds.format == "imagefolder" and ds.resolution == R
    for i in (0, N - 1):
        it = ds[i]
        assert set(it) == {"pixel_values", "caption", "base_caption", "target_text", "index", "extras"}
        px = it["pixel_values"]
        assert px.dtype == torch.float32 and px.shape == (3, R, R)
        assert -1.0 <= px.min() and px.max() <= 1.0 and px.max() - px.min() > 0.5
        assert it["caption"] == join_caption(rows[i]["base_caption"], rows[i]["target_text"])
        assert (it["base_caption"], it["target_text"], it["index"]) == (rows[i]["base_caption"], rows[i]["target_text"], i)
        assert it["extras"] == {"category": rows[i]["category"], "attributes": rows[i]["attributes"]}
        json.dumps(it["extras"])
    it = ds[0]
    it["extras"]["category"] = "changed"
    assert ds[0]["extras"]["category"] != "changed"
    with pytest.raises(IndexError):
        ds[N]


def test_every_format_gives_the_same_items_and_fingerprint(toy, tmp_path):
    ref = PortraitDataset(toy, R)
    ref_items = [ref[i] for i in range(N)]
    hf = make_hf(toy, tmp_path / "hf")
    hf_dict = make_hf(toy, tmp_path / "hfdict", dict_split="train")
    wds = make_wds(toy, tmp_path / "wds")
    sources = {
        "hf": hf,
        "hfdict": hf_dict,
        "wds-folder": wds,
        "wds-glob": str(wds / "shard-*.tar"),
        "wds-brace": str(wds / "shard-{0000..0002}.tar"),
    }
    fp = dataset_fingerprint(toy)
    for name, path in sources.items():
        ds = PortraitDataset(path, R)
        assert ds.format == ("hf" if name.startswith("hf") else "webdataset"), name
        assert len(ds) == N, name
        for i in range(N):
            assert item_equal(ds[i], ref_items[i]), (name, i)
        assert dataset_fingerprint(path) == fp, name
        clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers
        assert item_equal(clone[N - 1], ref_items[N - 1]), name
    single = PortraitDataset(wds / "shard-0001.tar", R)
    assert len(single) == 3 and item_equal(single[0], {**ref_items[3], "index": 0})


def test_hub_names_load_through_load_dataset_like_the_folders(toy, tmp_path, monkeypatch):
    """hf:NAME[#SPLIT] goes through datasets.load_dataset: here a local folder of parquet files (offline, as a
    Hub repository's data files are laid out); a Hub id that is not cached fails in one line naming the cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    ds = datasets.load_from_disk(str(make_hf(toy, tmp_path / "disk")))
    repo = tmp_path / "repo"
    ds.to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    ds.select(range(2)).to_parquet(str(repo / "data" / "validation-00000-of-00001.parquet"))
    ref = PortraitDataset(toy, R)
    hub = PortraitDataset(f"hf:{repo}", R)
    assert hub.format == "hub" and len(hub) == N
    assert all(item_equal(hub[i], ref[i]) for i in range(N))
    assert dataset_fingerprint(f"hf:{repo}") == dataset_fingerprint(toy)
    assert len(PortraitDataset(f"hf:{repo}#validation", R)) == 2
    from spfbench.data import location

    assert location(f"hf:{repo}#validation") == f"hf:{repo}#validation" and location(toy) == str(toy.resolve())

    with pytest.raises(SpfbenchError, match=r"hf:nobody/no-such-portraits: datasets.load_dataset\('nobody/no-such-portraits'.*offline"):
        PortraitDataset("hf:nobody/no-such-portraits", R)
    with pytest.raises(SpfbenchError, match=r"split='test'"):
        PortraitDataset(f"hf:{repo}#test", R)
    with pytest.raises(SpfbenchError, match="give a dataset after hf:"):
        PortraitDataset("hf:", R)
    text = tmp_path / "text"
    datasets.Dataset.from_dict({"image": ["x.png"], "base_caption": ["A man"], "target_text": ["a hat"]}).to_parquet(
        str(text / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(SpfbenchError, match=r"HF dataset hf:.*text: column image is .*not an Image feature"):
        PortraitDataset(f"hf:{text}", R)


def test_preprocess_matches_torchvision_resize_and_centre_crop():
    from PIL import Image
    from torchvision import transforms

    rng = np.random.default_rng(0)
    for w, h in [(50, 37), (37, 50), (64, 64), (20, 31)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        tv = transforms.Compose([
            transforms.Resize(R, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(R),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ])
        ours = preprocess(img, R)
        assert ours.shape == (3, R, R)
        assert torch.allclose(ours, tv(img), atol=1e-6), (w, h)
        squash = preprocess(img, R, center_crop=False)
        assert torch.allclose(squash, transforms.ToTensor()(img.resize((R, R), Image.BICUBIC)) * 2 - 1, atol=1e-6)
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert torch.equal(preprocess(rgba, 8), torch.ones(3, 8, 8))  # transparent -> white


def test_random_flip_is_per_index_seed_and_epoch(toy):
    plain = PortraitDataset(toy, R)
    ds = PortraitDataset(toy, R, random_flip=True, seed=7)
    flips = [ds.flipped(i) for i in range(N)]
    assert any(flips) and not all(flips)
    for i in range(N):
        want = torch.flip(plain[i]["pixel_values"], dims=[-1]) if flips[i] else plain[i]["pixel_values"]
        assert torch.equal(ds[i]["pixel_values"], want)
    again = PortraitDataset(toy, R, random_flip=True, seed=7)  # a resumed run
    assert [again.flipped(i) for i in range(N)] == flips == [flip_decision(7, 0, i) for i in range(N)]
    ds.set_epoch(1)
    assert [ds.flipped(i) for i in range(64)] != [flip_decision(7, 0, i) for i in range(64)]
    assert not any(plain.flipped(i) for i in range(N))


def test_collate_and_dataloader(toy):
    ds = PortraitDataset(toy, R)
    batch = collate([ds[0], ds[3]])
    assert batch["pixel_values"].shape == (2, 3, R, R)
    assert batch["index"].tolist() == [0, 3] and batch["index"].dtype == torch.long
    assert batch["caption"] == [ds[0]["caption"], ds[3]["caption"]]
    assert batch["extras"][1] == ds[3]["extras"]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate)
    assert [b["index"].tolist() for b in loader] == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_describe(toy):
    d = describe_dataset(toy)
    assert d["format"] == "imagefolder" and d["n"] == N and d["images_decoded"]
    assert d["extra_columns"] == ["attributes", "category"] and sum(d["targets"].values()) == N
    assert d["fingerprint"] == dataset_fingerprint(toy)


# ---------------------------------------------------------------------------------------------- validation


def _corrupt(folder: Path, i: int = 2) -> Path:
    p = folder / f"images/{i:05d}.png"
    p.write_bytes(p.read_bytes()[:60])
    return p


IMAGEFOLDER_BREAKS = {
    "no metadata": (lambda d: (d / "metadata.jsonl").unlink(), r"holds no training data: expected metadata\.jsonl"),
    "bad json": (lambda d: (d / "metadata.jsonl").write_text('{"file_name": "images/00000.png",\n'), r"metadata\.jsonl line 1: not valid JSON"),
    "not an object": (lambda d: (d / "metadata.jsonl").write_text("[1, 2]\n"), r"line 1: expected a JSON object"),
    "missing column": (
        lambda d: write_rows(d, [r if i != 4 else {k: v for k, v in r.items() if k != "target_text"} for i, r in enumerate(rows_of(d))]),
        r"metadata\.jsonl line 5 \(images/00004\.png\): column target_text is missing",
    ),
    "empty column": (
        lambda d: write_rows(d, [r if i != 2 else {**r, "base_caption": "  "} for i, r in enumerate(rows_of(d))]),
        r"metadata\.jsonl line 3 \(images/00002\.png\): base_caption is empty",
    ),
    "missing file_name": (
        lambda d: write_rows(d, [r if i != 1 else {**r, "file_name": ""} for i, r in enumerate(rows_of(d))]),
        r"metadata\.jsonl line 2: file_name is missing or empty",
    ),
    "image missing": (lambda d: (d / "images/00006.png").unlink(), r"line 7: image file .*images/00006\.png does not exist"),
    "empty dataset": (lambda d: (d / "metadata.jsonl").write_text("\n"), r"metadata\.jsonl holds no rows"),
    "duplicate": (
        lambda d: write_rows(d, [r if i != 5 else {**r, "file_name": "./images/00001.png"} for i, r in enumerate(rows_of(d))]),
        r"file_name './images/00001\.png' appears on lines 2 and 6",
    ),
    "corrupt image": (lambda d: _corrupt(d), r"image .*images/00002\.png cannot be decoded"),
    "bad attn_list": (
        lambda d: write_rows(d, [r if i != 0 else {**r, "attn_list": [["hat"]]} for i, r in enumerate(rows_of(d))]),
        r"line 1 .*attn_list must be a list of \[phrase, mask path or null\] pairs",
    ),
    "attn mask missing": (
        lambda d: write_rows(d, [r if i != 0 else {**r, "attn_list": [["hat", "masks/0.png"], ["woman", None]]} for i, r in enumerate(rows_of(d))]),
        r"line 1 .*attn_list mask .*masks/0\.png does not exist",
    ),
}


@pytest.mark.parametrize("case", list(IMAGEFOLDER_BREAKS))
def test_imagefolder_errors_name_the_problem_and_change_nothing(toy_copy, tmp_path, case):
    breaker, msg = IMAGEFOLDER_BREAKS[case]
    breaker(toy_copy)
    before = snapshot(tmp_path)
    for call in (lambda: PortraitDataset(toy_copy, R), lambda: dataset_fingerprint(toy_copy)):
        with pytest.raises(SpfbenchError, match=msg) as e:
            call()
        assert "\n" not in str(e.value)
    assert snapshot(tmp_path) == before


def test_missing_folder_and_stray_files(tmp_path):
    with pytest.raises(SpfbenchError, match=r"dataset folder .*nope does not exist"):
        PortraitDataset(tmp_path / "nope", R)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(SpfbenchError, match="is a file"):
        detect_format(tmp_path / "f.txt")
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metadata.csv").write_text("file_name\n")
    with pytest.raises(SpfbenchError, match="convert it to metadata.jsonl"):
        PortraitDataset(tmp_path / "csv", R)


def test_corrupt_image_unvalidated_fails_at_read_with_its_name(toy_copy):
    _corrupt(toy_copy, 5)
    ds = PortraitDataset(toy_copy, R, validate_images=False)
    ds[0]
    with pytest.raises(SpfbenchError, match=r"images/00005\.png cannot be decoded"):
        ds[5]


def test_valid_attn_list_is_kept_and_its_masks_enter_the_fingerprint(toy_copy):
    from PIL import Image

    (toy_copy / "masks").mkdir()
    Image.new("L", (SIZE, SIZE), 255).save(toy_copy / "masks" / "0.png")
    rows = rows_of(toy_copy)
    rows[0]["attn_list"] = [["a hat", "masks/0.png"], ["woman", None]]
    write_rows(toy_copy, rows)
    ds = PortraitDataset(toy_copy, R)
    assert ds[0]["extras"]["attn_list"] == [["a hat", "masks/0.png"], ["woman", None]]
    assert ds.resolve("masks/0.png").is_file()
    fp = dataset_fingerprint(toy_copy)
    Image.new("L", (SIZE, SIZE), 0).save(toy_copy / "masks" / "0.png")
    assert dataset_fingerprint(toy_copy) != fp


def test_hf_errors(toy, tmp_path):
    import datasets

    with pytest.raises(SpfbenchError, match="not an Image feature"):
        PortraitDataset(make_hf(toy, tmp_path / "str", image_feature=False), R)
    with pytest.raises(SpfbenchError, match="no 'train' split"):
        PortraitDataset(make_hf(toy, tmp_path / "val", dict_split="validation"), R)
    ds = datasets.Dataset.from_dict({"image": [str(toy / "images/00000.png")], "base_caption": ["A man"]}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "nocol"))
    with pytest.raises(SpfbenchError, match="lacks column target_text"):
        PortraitDataset(tmp_path / "nocol", R)
    ds = datasets.Dataset.from_dict(
        {"image": [str(toy / "images/00000.png")] * 2, "base_caption": ["A man", "A woman"], "target_text": ["a hat", None]}
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "none"))
    with pytest.raises(SpfbenchError, match=r"item 1: column target_text is missing"):
        PortraitDataset(tmp_path / "none", R)
    datasets.Dataset.from_dict({"image": [], "base_caption": [], "target_text": []}).cast_column("image", datasets.Image()).save_to_disk(
        str(tmp_path / "empty")
    )
    with pytest.raises(SpfbenchError, match=r"HF dataset .*empty holds no rows"):
        PortraitDataset(tmp_path / "empty", R)
    bad = tmp_path / "bad.png"
    bad.write_bytes((toy / "images/00001.png").read_bytes()[:50])
    ds = datasets.Dataset.from_dict(
        {"image": [str(toy / "images/00000.png"), str(bad)], "base_caption": ["A man"] * 2, "target_text": ["a hat"] * 2}
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "corrupt"))
    with pytest.raises(SpfbenchError, match=r"HF dataset .*corrupt item 1 cannot be decoded"):
        PortraitDataset(tmp_path / "corrupt", R)


def _drop(ext):
    return lambda i, m: {k: v for k, v in m.items() if not (i == 4 and k.endswith(ext))}


WDS_BREAKS = {
    "no json": (dict(mutate=_drop(".json")), r"shard-0001\.tar sample 00004: no 00004\.json"),
    "no image": (dict(mutate=_drop(".png")), r"shard-0001\.tar sample 00004: no image"),
    "bad json": (dict(mutate=lambda i, m: {**m, f"{i:05d}.json": b"{" if i == 1 else m[f"{i:05d}.json"]}), r"shard-0000\.tar sample 00001: 00001\.json is not valid JSON"),
    "empty target": (
        dict(mutate=lambda i, m: {**m, f"{i:05d}.json": json.dumps({"base_caption": "A man", "target_text": ""}).encode() if i == 7 else m[f"{i:05d}.json"]}),
        r"shard-0002\.tar sample 00007: target_text is empty",
    ),
    "two images": (dict(mutate=lambda i, m: {**m, f"{i:05d}.jpg": b"x"} if i == 0 else m), r"sample 00000: two images"),
    "corrupt image": (dict(mutate=lambda i, m: {**m, f"{i:05d}.png": m[f"{i:05d}.png"][:70]} if i == 3 else m), r"shard-0001\.tar: 00003\.png cannot be decoded"),
}


@pytest.mark.parametrize("case", list(WDS_BREAKS))
def test_webdataset_errors(toy, tmp_path, case):
    kwargs, msg = WDS_BREAKS[case]
    wds = make_wds(toy, tmp_path / "wds", **kwargs)
    before = snapshot(tmp_path)
    with pytest.raises(SpfbenchError, match=msg):
        PortraitDataset(wds, R)
    assert snapshot(tmp_path) == before


def test_webdataset_structure_errors(toy, tmp_path):
    wds = make_wds(toy, tmp_path / "dup")
    shutil.copy(wds / "shard-0000.tar", wds / "shard-0009.tar")
    with pytest.raises(SpfbenchError, match=r"sample key '00000' appears in shard .*shard-0000\.tar and in shard .*shard-0009\.tar"):
        PortraitDataset(wds, R)
    gz = tmp_path / "gz"
    gz.mkdir()
    (gz / "a.tar").write_bytes(gzip.compress((wds / "shard-0000.tar").read_bytes()))
    with pytest.raises(SpfbenchError, match="not an uncompressed tar"):
        PortraitDataset(gz, R)
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "a.tar").write_bytes((wds / "shard-0000.tar").read_bytes()[:1500])
    with pytest.raises(SpfbenchError, match="truncated|not a readable tar|no 00000.json|no image"):
        PortraitDataset(trunc, R)
    with pytest.raises(SpfbenchError, match="no .tar shards found"):
        PortraitDataset(str(tmp_path / "none-*.tar"), R)


# ---------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_content_based(toy_copy):
    from PIL import Image

    fp = dataset_fingerprint(toy_copy)
    assert len(fp) == 64 and fp == PortraitDataset(toy_copy, R).fingerprint
    p = toy_copy / "images/00003.png"
    p.touch()  # mtime alone: same data
    assert dataset_fingerprint(toy_copy) == fp
    img = Image.open(p).convert("RGB")
    img.putpixel((0, 0), (1, 2, 3))
    img.save(p)
    fp2 = dataset_fingerprint(toy_copy)
    assert fp2 != fp
    rows = rows_of(toy_copy)
    rows[0]["target_text"] = "a red hat"
    write_rows(toy_copy, rows)
    fp3 = dataset_fingerprint(toy_copy)
    assert fp3 not in (fp, fp2)
    rows[0]["attributes"]["hat"] = "green"
    write_rows(toy_copy, rows)
    assert dataset_fingerprint(toy_copy) not in (fp, fp2, fp3)


# ---------------------------------------------------------------------------------------------- cache


class Encoders:
    """Small deterministic encoders that count their calls."""

    def __init__(self, fail_after: int | None = None):
        self.image_calls = self.text_calls = 0
        self.fail_after = fail_after

    def image(self, pixels):
        self.image_calls += 1
        if self.fail_after is not None and self.image_calls > self.fail_after:
            raise RuntimeError("interrupted")
        return torch.nn.functional.avg_pool2d(pixels, 8)[:, :, :, :] * 0.5  # (B, 3, R/8, R/8)

    def text(self, captions):
        self.text_calls += 1
        return torch.stack([torch.tensor([float(len(c)), float(sum(map(ord, c)) % 97)]).repeat(3, 1) for c in captions])


def test_cache_computed_once_equal_to_direct_and_invalidated(toy_copy, tmp_path):
    cache = tmp_path / "cache"
    ds = PortraitDataset(toy_copy, R)
    enc = Encoders()
    cached = cache_encodings(ds, enc.image, enc.text, cache, model_key="m1", batch_size=3, shard_size=4, progress=False)
    assert isinstance(cached, CachedDataset) and len(cached) == N
    assert (enc.image_calls, enc.text_calls) == (4, 4)  # shards of 4 in batches of 3: 3+1, 3+1
    files = snapshot(cache)
    assert len([f for f in files if f.endswith(".safetensors")]) == 2 and not [f for f in files if f.endswith(".tmp")]
    for i in range(N):
        it, direct = cached[i], ds[i]
        assert torch.allclose(it["latents"], enc.image(direct["pixel_values"][None])[0], atol=1e-6)
        assert torch.equal(it["encoder_hidden_states"], enc.text([direct["caption"]])[0])
        assert {k: it[k] for k in ("caption", "base_caption", "target_text", "index", "extras")} == {
            k: direct[k] for k in ("caption", "base_caption", "target_text", "index", "extras")
        }
    batch = next(iter(torch.utils.data.DataLoader(cached, batch_size=5, collate_fn=collate)))
    assert batch["latents"].shape == (5, 3, R // 8, R // 8) and batch["encoder_hidden_states"].shape == (5, 3, 2)
    pickle.loads(pickle.dumps(cached))[1]

    # rerun: nothing recomputed, nothing rewritten
    enc2 = Encoders()
    cache_encodings(PortraitDataset(toy_copy, R), enc2.image, enc2.text, cache, model_key="m1", batch_size=3, progress=False)
    assert (enc2.image_calls, enc2.text_calls) == (0, 0) and snapshot(cache) == files

    # another model key, another resolution, or changed data: recomputed in a new folder
    for kwargs, res in [(dict(model_key="m2"), R), (dict(model_key="m1"), 16)]:
        enc3 = Encoders()
        c = cache_encodings(PortraitDataset(toy_copy, res), enc3.image, enc3.text, cache, batch_size=8, progress=False, **kwargs)
        assert enc3.image_calls == 1 and c.folder != cached.folder
    rows = rows_of(toy_copy)
    rows[2]["base_caption"] = "A man, smiling, with a red background, in a blue shirt"
    write_rows(toy_copy, rows)
    enc4 = Encoders()
    c = cache_encodings(PortraitDataset(toy_copy, R), enc4.image, enc4.text, cache, model_key="m1", batch_size=8, progress=False)
    assert enc4.image_calls == 1 and c.folder != cached.folder
    assert c[2]["caption"].startswith("A man, smiling")
    with pytest.raises(SpfbenchError, match="belongs to other data"):
        CachedDataset(cached.folder, PortraitDataset(toy_copy, R))


def test_cache_resumes_after_interruption(toy, tmp_path):
    ds = PortraitDataset(toy, R)
    enc = Encoders(fail_after=2)  # shard 0 (2 batches) written, then the run dies
    with pytest.raises(RuntimeError, match="interrupted"):
        cache_encodings(ds, enc.image, enc.text, tmp_path / "c", model_key="m", batch_size=2, shard_size=4, progress=False)
    enc2 = Encoders()
    cached = cache_encodings(ds, enc2.image, enc2.text, tmp_path / "c", model_key="m", batch_size=2, progress=False)
    assert enc2.image_calls == 2  # only shard 1
    full = cache_encodings(ds, Encoders().image, Encoders().text, tmp_path / "d", model_key="m", batch_size=2, shard_size=4, progress=False)
    for i in range(N):
        assert torch.equal(cached[i]["latents"], full[i]["latents"])


def test_cache_with_random_flip_and_dict_outputs(toy, tmp_path):
    ds = PortraitDataset(toy, R, random_flip=True, seed=7)
    enc = Encoders()

    def image(px):
        out = enc.image(px)
        return {"latents": out, "latents_std": out.abs()}

    cached = cache_encodings(ds, image, enc.text, tmp_path / "c", model_key="m", batch_size=8, progress=False)
    assert enc.image_calls == 2  # plain and flipped
    for i in range(N):
        direct = ds[i]["pixel_values"]  # flipped when flip_decision says so
        assert torch.allclose(cached[i]["latents"], enc.image(direct[None])[0], atol=1e-6)
        assert set(cached[i]) >= {"latents", "latents_std", "encoder_hidden_states"}
    cached.set_epoch(3)
    ds.set_epoch(3)
    assert [cached.flipped(i) for i in range(N)] == [ds.flipped(i) for i in range(N)]


def test_cache_bad_arguments_write_nothing(toy, tmp_path):
    ds = PortraitDataset(toy, R)
    with pytest.raises(SpfbenchError, match="model_key"):
        cache_encodings(ds, Encoders().image, Encoders().text, tmp_path / "c", model_key="", progress=False)
    assert not (tmp_path / "c").exists()


def test_cache_stores_record_level_encodings_unflipped(toy, tmp_path):
    """encode_record (what depends on an item's texts only, e.g. SPF's base-caption encoding) is stored per
    item beside the image and text encodings, computed once, and is the same whatever the item's flip."""
    ds = PortraitDataset(toy, R, random_flip=True, seed=7)
    enc, seen = Encoders(), []

    def record(records):
        seen.extend(r.index for r in records)
        return {"base_len": torch.tensor([[float(len(r.base_caption))] for r in records])}

    cached = cache_encodings(ds, enc.image, enc.text, tmp_path / "c", model_key="m", batch_size=3, progress=False,
                             encode_record=record)
    assert sorted(seen) == list(range(N))
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        for i in range(N):
            assert cached[i]["base_len"].tolist() == [float(len(ds.records[i].base_caption))]
    again = cache_encodings(ds, enc.image, enc.text, tmp_path / "c", model_key="m", progress=False, encode_record=record)
    assert len(seen) == N and again.folder == cached.folder  # reused, not recomputed
    with pytest.raises(ValueError, match="latents"):
        cache_encodings(ds, enc.image, enc.text, tmp_path / "d", model_key="m", progress=False,
                        encode_record=lambda recs: {"latents": torch.zeros(len(recs), 1)})


def test_shards_written_by_the_webdataset_library_read_as_its_own_reader_streams_them(toy, tmp_path):
    """Shards made the way users make them (webdataset.ShardWriter) give the imagefolder's items, in the
    order webdataset's own streaming reader yields the samples."""
    import webdataset as wds

    rows = rows_of(toy)
    pattern = str(tmp_path / "w-%04d.tar")
    with wds.ShardWriter(pattern, maxcount=4, verbose=0) as sink:
        for i, r in enumerate(rows):
            meta = {k: v for k, v in r.items() if k != "file_name"}
            sink.write({"__key__": f"s{i:05d}", "png": (toy / r["file_name"]).read_bytes(), "json": json.dumps(meta).encode()})
    shards = sorted(str(p) for p in tmp_path.glob("w-*.tar"))
    assert len(shards) == -(-N // 4)
    ours = PortraitDataset(tmp_path, R)
    ref = PortraitDataset(toy, R)
    assert ours.format == "webdataset" and len(ours) == N
    assert all(item_equal(ours[i], ref[i]) for i in range(N))
    streamed = [json.loads(s["json"])["base_caption"] for s in wds.WebDataset(shards, shardshuffle=False)]
    assert streamed == [ours[i]["base_caption"] for i in range(N)]
