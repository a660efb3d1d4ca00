import json

import pytest

from spfbench.captions import (
    categories,
    compose,
    derive_seed,
    join_caption,
    load_vocab,
    read_caption_file,
)
from spfbench.errors import SpfbenchError


def test_compose_is_deterministic_and_prefix_stable():
    a, b = compose(60, seed=3), compose(60, seed=3)
    assert a == b
    assert compose(25, seed=3) == a[:25]
    other = compose(60, seed=4)
    assert sum(x.base_caption != y.base_caption for x, y in zip(a, other)) > 50


def test_categories_round_robin_cover_the_vocabulary():
    cats = categories()
    rows = compose(3 * len(cats), seed=0)
    assert [r.category for r in rows] == cats * 3
    vocab = load_vocab()
    for r in rows:
        assert r.target_text in vocab["targets"][r.category]["texts"]


def _subject(vocab, base):
    # longest match first: "A young woman" must not be read as "A woman"
    for s in sorted(vocab["subjects"], key=lambda s: -len(s["text"])):
        if base.startswith(s["text"] + ","):
            return s
    raise AssertionError(f"no known subject in {base!r}")


def test_base_captions_have_the_paper_shape_and_respect_constraints():
    vocab = load_vocab()
    rows = compose(2000, seed=11)
    for r in rows:
        subj = _subject(vocab, r.base_caption)
        tags = set(subj["tags"])
        rest = r.base_caption[len(subj["text"]) + 2 :]
        action = next(a for a in vocab["actions"] if rest.startswith(a + ", "))
        rest = rest[len(action) + 2 :]
        background = next(b for b in vocab["backgrounds"] if rest.startswith(b + ", "))
        clothing = rest[len(background) + 2 :]
        color, garment = clothing.split(" ", 2)[2].split(" ", 1)
        assert clothing.startswith(("in a ", "in an "))
        assert color in vocab["clothing_colors"] and garment in vocab["clothing_garments"]
        if garment in ("dress", "blouse"):
            assert "female" in tags
        if r.category == "facial_hair":
            assert "male" in tags and "child" not in tags
        if r.category == "age":
            assert tags & {"young", "aged", "child"} == set(), r.base_caption
        if r.category in ("makeup", "jewelry"):
            assert "child" not in tags


def test_join_caption():
    base = "A woman, playing a guitar, with a red background, in a white T-shirt."
    assert join_caption(base, "a hat") == "A woman, playing a guitar, with a red background, in a white T-shirt, a hat"
    assert join_caption(" A man, dancing ", " freckles ") == "A man, dancing, freckles"


def test_derive_seed():
    seeds = [derive_seed(0, i) for i in range(1000)]
    assert seeds == [derive_seed(0, i) for i in range(1000)]
    assert len(set(seeds)) == 1000
    assert all(0 <= s < 2**31 for s in seeds)
    assert derive_seed(1, 0) != derive_seed(0, 0)


def test_read_caption_file_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("base_caption,target_text,category,seed\nA woman, in a park,a hat,headwear,7\nA man,freckles,,\n".replace("A woman, in a park", '"A woman, in a park"'))
    rows = read_caption_file(csv_path)
    assert [(r.base_caption, r.target_text, r.category, r.seed) for r in rows] == [
        ("A woman, in a park", "a hat", "headwear", 7),
        ("A man", "freckles", "custom", None),
    ]
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps(d) for d in [{"base_caption": "A girl", "target_text": "glasses", "id": "g1"}, {"base_caption": "A boy", "target_text": "a hat", "id": "b2"}]) + "\n")
    rows = read_caption_file(jl)
    assert [r.id for r in rows] == ["g1", "b2"]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.csv", "", "no rows"),
        ("header.csv", "base_caption,target_text\n", "no rows"),
        ("cols.csv", "caption,target\nA woman,a hat\n", "lacks column(s) base_caption, target_text"),
        ("blank.csv", "base_caption,target_text\nA woman,\n", "target_text is empty"),
        ("bad.jsonl", '{"base_caption": "A", "target_text": "b"}\nnot json\n', "line 2: not valid JSON"),
        ("seed.jsonl", '{"base_caption": "A", "target_text": "b", "seed": "x"}\n', "not an integer"),
        ("dup.jsonl", '{"base_caption": "A", "target_text": "b", "id": "x"}\n{"base_caption": "C", "target_text": "d", "id": "x"}\n', "appears on lines 1 and 2"),
        ("ids.jsonl", '{"base_caption": "A", "target_text": "b", "id": "../x"}\n', "must use letters"),
        ("c.txt", "base_caption,target_text\nA,b\n", "use a .csv"),
    ],
)
def test_read_caption_file_errors(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(SpfbenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_caption_file(p)


def test_read_caption_file_unreadable(tmp_path):
    with pytest.raises(SpfbenchError, match="does not exist"):
        read_caption_file(tmp_path / "missing.csv")
    p = tmp_path / "latin1.csv"
    p.write_bytes("base_caption,target_text\nA caf\xe9,x\n".encode("latin-1"))
    with pytest.raises(SpfbenchError, match="unreadable"):
        read_caption_file(p)
