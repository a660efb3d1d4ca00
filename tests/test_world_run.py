"""A reduced Portrait World run through the CLI, as `make demo` runs it: world data, captions, a
world test set, naive + SPF, the ten default metrics under the world preset, the attribute report.

The original model here is a random-weight world model folder (the shipped architecture, written by
``spfbench.world.pipeline.save_pipeline``) passed with ``--model``, so the flow is tested whatever weights
are shipped; the shipped model itself is tested in test_world_model.py."""

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reduced_world_run(tmp_path, cli):
    from spfbench.world.attributes import TARGET_TEXTS
    from spfbench.world.components import FORMAT, build_components
    from spfbench.world.pipeline import save_pipeline

    comps = build_components(0)
    model = save_pipeline(tmp_path / "model", comps["unet"], comps["vae"], comps["text_encoder"], {"format": FORMAT})

    code, out, err = cli("world", "data", "--split", "finetune", "--n", "40", "--out", tmp_path / "data")
    assert code == 0, err
    code, out, err = cli("world", "captions", "--n", "5", "--out", tmp_path / "captions.jsonl")
    assert code == 0, err
    code, out, err = cli("build-testset", "--preset", "world", "--model", model, "--captions", tmp_path / "captions.jsonl",
                         "--out", tmp_path / "ts", "--steps", "6", "--no-progress")
    assert code == 0, err
    meta = json.loads((tmp_path / "ts" / "testset.json").read_text())
    assert meta["spec"]["preset"] == "world" and meta["status"] == "complete"

    (tmp_path / "cfg.json").write_text(json.dumps({"all": {"max_train_steps": 2, "train_batch_size": 4, "checkpointing_steps": 2}}))
    code, out, err = cli("run", "--testset", tmp_path / "ts", "--data", tmp_path / "data", "--out", tmp_path / "run",
                         "--method", "naive", "--method", "spf", "--config", tmp_path / "cfg.json", "--no-progress")
    assert code == 0, err + out
    # the metric preset follows the test set's (world), and the world's ground-truth columns are in the table
    assert "GT-Target" in out and "GT-Preserve" in out
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["spec"]["preset"] == "world"
    assert "gt-target@world-reader" in result["spec"]["metrics"] and "gt-preserve@world-reader" in result["spec"]["metrics"]
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"naive", "spf"}
    for m in ("naive", "spf"):
        samples = [json.loads(x) for x in (tmp_path / "run" / "methods" / m / "score" / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 5
        for s in samples:
            assert TARGET_TEXTS[s["target_text"]]  # a world target
            assert s["errors"] == {}
            assert s["gt-target@world-reader"] in (0.0, 1.0)
            assert 0.0 <= s["gt-preserve@world-reader"] <= 1.0
            assert -1.0 <= s["clip-t@vit-l-14"] <= 1.0

    # `spfbench world attributes` reads the images again, by another path: its per-attribute kept rates are
    # GT-Preserve's per-attribute rates, its per-target hits average to GT-Target
    code, out, err = cli("world", "attributes", tmp_path / "run")
    assert code == 0, err
    rep = json.loads((tmp_path / "run" / "attributes.json").read_text())
    assert set(rep["methods"]) == {"naive", "spf"}
    for m in ("naive", "spf"):
        summary = json.loads((tmp_path / "run" / "methods" / m / "score" / "summary.json").read_text())["metrics"]
        per_attr = summary["gt-preserve@world-reader"]["per_attribute"]
        assert rep["methods"][m]["kept"] == pytest.approx(per_attr)
        hits = rep["methods"][m]["target"]
        n = rep["methods"][m]["target_n"]
        assert sum(hits[t] * n[t] for t in hits) / sum(n.values()) == pytest.approx(summary["gt-target@world-reader"]["value"])
    assert (tmp_path / "run" / "attributes.md").read_text().startswith("Attribute reads of 5 triples")

    # the report draws the trade-off whenever ground truth is scored: one point per row, the rows' own means
    from spfbench import tradeoff

    assert (tmp_path / "run" / "tradeoff.png").is_file() and "Trade-off" in (tmp_path / "run" / "index.html").read_text()
    saved = {p["method"]: p for p in json.loads((tmp_path / "run" / "tradeoff.json").read_text())["points"]}
    assert set(saved) == {"naive", "spf"}
    for m in ("naive", "spf"):
        assert saved[m]["response"] == pytest.approx(rows[m]["metrics"]["GT-Target"]["value"])
        assert saved[m]["preservation"] == pytest.approx(rows[m]["metrics"]["GT-Preserve"]["value"])
    assert {p.method for p in tradeoff.run_points(tmp_path / "run")} == {"naive", "spf"}
