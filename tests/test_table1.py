"""Table 1 outputs (spfbench.table1): bootstrap CIs, ranking, layout, CSV, paper data."""

import io
import json
import re

import numpy as np
import pandas as pd
import pytest

from spfbench import table1 as t1

IDS = {"FID": "fid@inception-2048", "LPIPS": "lpips@alex-v0.1", "ID": "id@arcface-buffalo-l",
       "CLIP-I": "clip-i@vit-l-14", "Seg-Cons": "seg-cons@sam-vit-h", "CLIP-T": "clip-t@vit-l-14",
       "HPSv2": "hpsv2@v2.1", "MPS": "mps@overall"}


def write_scores(folder, per_sample: dict[str, list], fid=None, nulls=()):
    """A fake ``spfbench score`` folder: per-sample values per column, FID value (set level)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(per_sample.values())))
    metrics = {}
    for col, mid in IDS.items():
        hib = t1.HIGHER[col]
        if col == "FID":
            metrics[mid] = {"id": mid, "column": col, "higher_is_better": hib, "value": fid, "n": n, "failures": 0}
        elif col in per_sample:
            vals = [v for v in per_sample[col] if v is not None]
            value = None if col in nulls or not vals else float(np.mean(vals))
            metrics[mid] = {"id": mid, "column": col, "higher_is_better": hib, "value": value, "n": len(vals), "failures": n - len(vals)}
    (folder / "summary.json").write_text(json.dumps({"metrics": metrics, "triples": n}))
    rows = []
    for i in range(n):
        row = {"id": f"t{i}", "category": "hair", "target_text": "x"}
        for col, vals in per_sample.items():
            row[IDS[col]] = vals[i]
        row["errors"] = {}
        rows.append(json.dumps(row))
    (folder / "samples.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def const(v, n=5):
    return {c: [v] * n for c in t1.COLUMN_NAMES if c != "FID"}


def test_bootstrap_contains_mean_and_deterministic():
    x = np.random.default_rng(1).normal(0.5, 0.1, 200).tolist()
    ci = t1.bootstrap_ci(x)
    assert ci[0] < np.mean(x) < ci[1]
    assert t1.bootstrap_ci(x) == ci
    assert t1.bootstrap_ci(x + [None]) == ci  # nulls dropped
    assert t1.bootstrap_ci([]) is None


def test_ci_shrinks_with_n():
    rng = np.random.default_rng(2)
    widths = []
    for n in (20, 200, 2000):
        lo, hi = t1.bootstrap_ci(rng.normal(0, 1, n).tolist())
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]


def test_collect_reads_summary_and_samples(tmp_path):
    vals = np.linspace(0.2, 0.4, 50).tolist()
    d = write_scores(tmp_path / "a", {"LPIPS": vals, "CLIP-T": vals[:-1] + [None]}, fid=5.0)
    row = t1.collect({"naive": d}).rows[0]
    fid = row.cells["FID"]
    assert (fid.value, fid.n, fid.ci_low, fid.ci_high) == (5.0, 50, None, None)
    lp = row.cells["LPIPS"]
    assert lp.n == 50 and lp.ci_low < lp.value < lp.ci_high
    assert row.cells["CLIP-T"].n == 49
    assert "ID" not in row.cells


def _table(tmp_path):
    # LPIPS lower is better, CLIP-T higher; FID set level.
    scores = {
        "spf-no-sfcm": write_scores(tmp_path / "e", {"LPIPS": [0.05] * 4, "CLIP-T": [0.9] * 4}, fid=1.0),
        "naive": write_scores(tmp_path / "a", {"LPIPS": [0.5] * 4, "CLIP-T": [0.2] * 4}, fid=20.0),
        "lora": write_scores(tmp_path / "b", {"LPIPS": [0.3] * 4, "CLIP-T": [0.25] * 4}, fid=9.0),
        "spf": write_scores(tmp_path / "c", {"LPIPS": [0.2] * 4, "CLIP-T": [0.3] * 4}, fid=4.0),
    }
    return t1.collect(scores)


def test_order_and_ranks(tmp_path):
    table = _table(tmp_path)
    assert [r.method for r in table.rows] == ["naive", "lora", "spf", "spf-no-sfcm"]
    assert table.rows[-1].ablation
    rk = t1.ranks(table.rows)
    # ablation never ranked even though it is best everywhere
    assert not any(i == 3 for i, _ in rk)
    assert rk[(2, "LPIPS")] == 1 and rk[(1, "LPIPS")] == 2 and (0, "LPIPS") not in rk
    assert rk[(2, "CLIP-T")] == 1 and rk[(1, "CLIP-T")] == 2
    assert rk[(2, "FID")] == 1 and rk[(1, "FID")] == 2


def test_markdown_bold_underline_and_nulls(tmp_path):
    md = t1.to_markdown(_table(tmp_path))
    spf = next(line for line in md.splitlines() if line.startswith("| spf |"))
    lora = next(line for line in md.splitlines() if line.startswith("| lora |"))
    assert "**0.20**" in spf and "<u>0.30</u>" in lora and "**4.00** (N=4)" in spf
    assert "| - |" in spf  # ID not scored
    assert "LPIPS (↓)" in md and "CLIP-T (↑)" in md
    lines = md.splitlines()
    assert lines.index(next(x for x in lines if "*ablations*" in x)) < lines.index(next(x for x in lines if x.startswith("| spf-no-sfcm")))


def test_null_value_renders_dash(tmp_path):
    d = write_scores(tmp_path / "a", {"LPIPS": [0.1] * 3}, fid=None, nulls=("LPIPS",))
    table = t1.collect({"naive": d})
    assert table.rows[0].cells["FID"].value is None
    tex = t1.to_latex(table)
    row = next(x for x in tex.splitlines() if x.startswith("naive"))
    assert row.split(" & ")[1] == "-"


def _check_latex(tex):
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert tex.count("{") == tex.count("}")
    assert tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") == 1
    body = tex.split("\\toprule", 1)[1].split("\\bottomrule")[0]
    for line in body.splitlines():
        if not line.strip().endswith("\\\\"):
            continue
        spans = sum(int(k) for k in re.findall(r"\\multicolumn\{(\d+)\}", line))
        ncells = line.count("&") + 1 - len(re.findall(r"\\multicolumn", line)) + spans
        assert ncells == 9, line


def test_latex_structure(tmp_path):
    tex = t1.to_latex(_table(tmp_path))
    _check_latex(tex)
    assert "\\textbf{0.20}" in tex and "\\underline{0.30}" in tex and "$\\downarrow$" in tex
    lines = tex.splitlines()
    i_abl = next(i for i, x in enumerate(lines) if x.startswith("spf-no-sfcm"))
    assert lines[i_abl - 1] == "\\midrule"
    tex_p = t1.to_latex(_table(tmp_path), paper=True)
    _check_latex(tex_p)
    assert "naive (paper)" in tex_p and "\\textbf{75.74}" in tex_p  # the paper's own best Seg-Cons


def test_csv_roundtrip(tmp_path):
    df = pd.read_csv(io.StringIO(t1.to_csv(_table(tmp_path))))
    assert list(df["method"]) == ["naive", "lora", "spf", "spf-no-sfcm"]
    for col in t1.COLUMN_NAMES:
        for suffix in ("", " N", " ci_low", " ci_high", " metric"):
            assert col + suffix in df.columns
    assert df.loc[2, "LPIPS"] == pytest.approx(0.2) and df.loc[2, "FID N"] == 4
    assert pd.isna(df.loc[2, "FID ci_low"])
    dfp = pd.read_csv(io.StringIO(t1.to_csv(_table(tmp_path), paper=True)))
    assert (dfp["source"] == "paper").sum() == 10


def test_paper_data():
    data = t1.load_paper()
    assert data["source"]["table"].startswith("Table 1") and data["source"]["note"]
    assert data["columns"] == t1.COLUMN_NAMES
    assert len(data["rows"]) == 10
    for r in data["rows"]:
        assert set(r["values"]) == set(t1.COLUMN_NAMES)
        assert r["ablation"] == t1.is_ablation(r["method"])
    spf = next(r for r in data["rows"] if r["method"] == "spf")["values"]
    assert spf == {"FID": 4.50, "LPIPS": 0.35, "ID": 0.55, "CLIP-I": 0.83, "Seg-Cons": 75.74, "CLIP-T": 0.30, "HPSv2": 0.28, "MPS": 1.49}


def test_write(tmp_path):
    paths = t1.write(_table(tmp_path), tmp_path / "run", paper=True)
    assert all(p.is_file() for p in paths.values())
    assert {p.name for p in paths.values()} == {"results.csv", "results.md", "results.tex"}


def test_csv_confidence_intervals_match_an_independent_bootstrap(tmp_path):
    """The CSV's 95% CI against scipy's percentile bootstrap (another resampler, 20,000 resamples): the
    endpoints agree within the Monte Carlo error of B=1000 (about 2% of the width; 10% allowed)."""
    from scipy import stats

    rng = np.random.default_rng(7)
    vals = rng.gamma(2.0, 0.1, 300).tolist()
    d = write_scores(tmp_path / "a", {"LPIPS": vals}, fid=1.0)
    df = pd.read_csv(io.StringIO(t1.to_csv(t1.collect({"naive": d}))))
    lo, hi = df.loc[0, "LPIPS ci_low"], df.loc[0, "LPIPS ci_high"]
    ref = stats.bootstrap((np.asarray(vals),), np.mean, n_resamples=20000, method="percentile", confidence_level=0.95,
                          random_state=np.random.default_rng(123)).confidence_interval
    width = ref.high - ref.low
    assert abs(lo - ref.low) < 0.1 * width and abs(hi - ref.high) < 0.1 * width
    assert df.loc[0, "LPIPS"] == pytest.approx(np.mean(vals)) and df.loc[0, "LPIPS N"] == 300


def test_failed_row_in_every_format(tmp_path):
    table = _table(tmp_path)
    table.rows.append(t1.Row(method="tokencompose", cells={}, error="fit: masks | missing"))
    table = t1.Table(rows=t1.ordered_rows(table.rows))
    df = pd.read_csv(io.StringIO(t1.to_csv(table))).set_index("method")
    assert df.loc["tokencompose", "error"] == "fit: masks | missing" and pd.isna(df.loc["tokencompose", "LPIPS"])
    md = t1.to_markdown(table)
    assert "| tokencompose | failed: fit: masks \\| missing |" in md
    tex = t1.to_latex(table)
    _check_latex(tex)
    assert "% tokencompose: failed (fit: masks | missing)" in tex and "\ntokencompose &" not in tex
    # a failed row takes no rank: the best LPIPS is still spf's
    assert "\\textbf{0.20}" in tex


def test_ground_truth_columns_appear_only_when_scored(tmp_path):
    vals = {"LPIPS": [0.2] * 4, "CLIP-T": [0.3] * 4}
    plain = t1.collect({"naive": write_scores(tmp_path / "a", vals, fid=3.0)})
    assert t1.columns(plain.rows) == t1.COLUMN_NAMES and "GT-" not in t1.to_csv(plain)
    d = write_scores(tmp_path / "b", vals, fid=3.0)
    summary = json.loads((d / "summary.json").read_text())
    rows = [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()]
    for mid, col, v in (("gt-target@world-reader", "GT-Target", [1, 1, 0, 1]), ("gt-preserve@world-reader", "GT-Preserve", [0.9] * 4)):
        summary["metrics"][mid] = {"id": mid, "column": col, "higher_is_better": True, "value": float(np.mean(v)), "n": 4, "failures": 0}
        for r, x in zip(rows, v):
            r[mid] = float(x)
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = t1.collect({"naive": d, "spf": write_scores(tmp_path / "c", vals, fid=2.0)})
    assert t1.columns(table.rows) == t1.COLUMN_NAMES + ["GT-Target", "GT-Preserve"]
    tex = t1.to_latex(table)
    assert "\\multicolumn{2}{c}{Ground truth}" in tex and "\\cmidrule(lr){10-11}" in tex
    line = next(x for x in tex.splitlines() if x.startswith("naive"))
    assert line.count("&") == 10 and "\\textbf{0.750}" in line
    assert "GT-Target (↑)" in t1.to_markdown(table)
    df = pd.read_csv(io.StringIO(t1.to_csv(table))).set_index("method")
    assert df.loc["naive", "GT-Target"] == 0.75 and pd.isna(df.loc["spf", "GT-Target"])


def test_small_values_keep_two_significant_digits_and_rank_apart():
    """A value that two decimals would print as 0.00 (FID on random-feature backbones) keeps two
    significant digits; ranks follow the printed values, so 0.00003 beats 0.00032."""
    assert t1.fmt(0.00031540992689601394, "FID") == "0.00032"
    assert t1.fmt(3.13e-05, "FID") == "0.000031"
    assert t1.fmt(0.0, "FID") == "0.00"
    assert t1.fmt(0.0612, "LPIPS") == "0.06"  # the paper's two decimals otherwise
    assert t1.fmt(0.0004, "GT-Target") == "0.00040"
    rows = [t1.Row("naive", {"FID": t1.Cell(0.00032)}), t1.Row("lora", {"FID": t1.Cell(0.00003)})]
    r = t1.ranks(rows)
    assert r[(1, "FID")] == 1 and r[(0, "FID")] == 2


def test_paired_differences_pair_the_triples(tmp_path):
    """Rows that differ by a small per-triple shift on a large shared spread: the paired CI is the shift's,
    far narrower than the unpaired CIs (which overlap); a triple one row lacks is left out of the pair."""
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.8, 60)
    shift = 0.02 + rng.normal(0, 0.005, 60)
    lpips_b = list(base + shift)
    lpips_b[5] = None  # not scored in b: the pair uses 59 triples
    a = write_scores(tmp_path / "a", {"LPIPS": list(base), "CLIP-T": list(base)})
    b = write_scores(tmp_path / "b", {"LPIPS": lpips_b, "CLIP-T": list(base)})
    table = t1.collect({"naive": a, "lora": b})
    paired = t1.paired_differences(table)
    d = t1.find_pair(paired, "lora", "naive", "LPIPS")
    keep = [i for i in range(60) if i != 5]
    assert d["n"] == 59 and d["diff"] == pytest.approx(float(np.mean(shift[keep])))
    assert d["ci_low"] < d["diff"] < d["ci_high"] and d["ci_low"] > 0  # the shift is detected
    assert d["ci_high"] - d["ci_low"] < 0.01
    rows = {r.method: r for r in table.rows}
    assert rows["lora"].cells["LPIPS"].ci_low < rows["naive"].cells["LPIPS"].ci_high  # unpaired CIs overlap
    # the other orientation is the same difference negated, its CI mirrored
    e = t1.find_pair(paired, "naive", "lora", "LPIPS")
    assert (e["diff"], e["ci_low"], e["ci_high"]) == pytest.approx((-d["diff"], -d["ci_high"], -d["ci_low"]))
    # identical values: a zero difference with a degenerate interval
    z = t1.find_pair(paired, "lora", "naive", "CLIP-T")
    assert (z["diff"], z["ci_low"], z["ci_high"]) == (0.0, 0.0, 0.0)
    assert t1.find_pair(paired, "lora", "naive", "FID") is None  # set-level columns are not paired
    assert t1.shown_pairs(table.rows) == [("lora", "naive")]


def test_one_dataframe_feeds_every_format(tmp_path):
    """frame() is Table 1's one source: its values, ranks and CIs are what the CSV, Markdown and LaTeX show."""
    table = _table(tmp_path)
    df = t1.frame(table)
    assert list(df[("", "method")]) == ["naive", "lora", "spf", "spf-no-sfcm"]
    spf = df[df[("", "method")] == "spf"].iloc[0]
    assert spf[("LPIPS", "value")] == pytest.approx(0.2) and spf[("LPIPS", "rank")] == 1
    assert pd.isna(df[df[("", "method")] == "spf-no-sfcm"].iloc[0][("LPIPS", "rank")])  # ablations are not ranked
    csv = pd.read_csv(io.StringIO(t1.to_csv(table)))
    assert csv["LPIPS"].tolist() == pytest.approx(df[("LPIPS", "value")].tolist())
    assert csv["LPIPS N"].tolist() == df[("LPIPS", "n")].tolist()
    tex = t1.to_latex(table)
    assert "\\resizebox" in tex.splitlines()[1] and "table*" in tex.splitlines()[1]  # the width note in the header
    assert "\\cmidrule(lr){2-6}" in tex
    md = t1.to_markdown(table)
    assert sum(line.count("**") // 2 for line in md.splitlines()[4:]) == int((df.xs("rank", axis=1, level=1) == 1).sum().sum())
