"""Portrait World's ground-truth metrics on renders whose attributes are known."""

import pytest

import spfbench.world.metrics  # noqa: F401  (registers the world-reader backbone)
from spfbench.metrics import Backbones, Batch, create
from spfbench.world.attributes import sample
from spfbench.world.render import render

pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(n=12):
    """(original attrs, customized attrs, target text): a hat added; for odd i the hair colour moves too."""
    out = []
    for i in range(n):
        a = sample("heldout", i, 5)
        b = {**a, "headwear": "hat"}
        if i % 2:
            b["hair_color"] = "red" if a["hair_color"] != "red" else "black"
        out.append((a, b, "a hat"))
    return out


def test_target_and_preserve_against_ground_truth():
    bb = Backbones("tiny", "cpu")
    pairs = _pairs()
    reader = bb.get("world-reader")
    originals = [render(a, 64, variant=i) for i, (a, _, _) in enumerate(pairs)]
    customized = [render(b, 64, variant=i) for i, (_, b, _) in enumerate(pairs)]
    # keep the pairs the reader reads exactly right, so the expected values follow from the ground truth alone
    ok = [i for i, (a, b, _) in enumerate(pairs)
          if reader.read([originals[i]])[0] == a and reader.read([customized[i]])[0] == b]
    assert len(ok) >= 8
    batch = Batch(ids=[f"t{i}" for i in ok], originals=[originals[i] for i in ok], customized=[customized[i] for i in ok],
                  target_texts=[pairs[i][2] for i in ok])
    target, preserve = create("gt-target@world-reader", bb), create("gt-preserve@world-reader", bb)
    target.update(batch)
    preserve.update(batch)
    assert all(target.values[f"t{i}"] == 1.0 for i in ok)
    others = len(pairs[0][0]) - 1  # every attribute but headwear
    for i in ok:
        assert preserve.values[f"t{i}"] == pytest.approx((others - (i % 2)) / others)
    per = preserve.compute()["per_attribute"]
    assert "headwear" not in per and per["background"] == 1.0
    assert per["hair_color"] == pytest.approx(sum(1 for i in ok if i % 2 == 0) / len(ok))
    # merge round trip: two halves give the same set-level result
    halves = [create("gt-preserve@world-reader", bb) for _ in range(2)]
    for k, h in enumerate(halves):
        sub = [j for j in range(len(ok)) if j % 2 == k]
        h.update(Batch([batch.ids[j] for j in sub], [batch.originals[j] for j in sub], [batch.customized[j] for j in sub],
                       [batch.target_texts[j] for j in sub]))
    halves[0].merge(halves[1].state())
    assert halves[0].compute() == preserve.compute()


def test_a_target_that_is_absent_scores_zero_and_unknown_targets_fail():
    bb = Backbones("tiny", "cpu")
    a = sample("heldout", 0, 5)
    im = render(a, 64, variant=0)
    m = create("gt-target@world-reader", bb)
    m.update(Batch(["x", "y"], [im, im], [im, im], ["a hat", "a crown"]))
    assert m.values["x"] == 0.0 and m.values["y"] is None and "not a Portrait World target" in m.reasons["y"]
    assert m.compute()["failures"] == 1
