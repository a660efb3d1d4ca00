"""RUN/index.html (spfbench.report): content checks, then the page in a real headless Chromium."""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from spfbench import report, table1

CATEGORIES = ["age", "style", "age", "clothing", "style", "age"]
EVIL = "A man </script><script>alert('x')</script> & <b>friends</b>"
METRICS = {  # id -> (column, higher_is_better, per-sample)
    "fid@inception-2048": ("FID", False, False),
    "lpips@alex-v0.1": ("LPIPS", False, True),
    "clip-t@vit-l-14": ("CLIP-T", True, True),
}
PER_SAMPLE = [k for k, (_, _, ps) in METRICS.items() if ps]
METHODS = ["naive", "lora", "magnet"]  # magnet fails


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _score(folder: Path, rows: list[dict], fid: float) -> None:
    metrics = {"fid@inception-2048": {"id": "fid@inception-2048", "column": "FID", "higher_is_better": False,
                                      "value": fid, "n": len(rows), "failures": 0}}
    for k in [k for k in PER_SAMPLE if k in rows[0]]:
        vals = [r[k] for r in rows if r[k] is not None]
        metrics[k] = {"id": k, "column": METRICS[k][0], "higher_is_better": METRICS[k][1],
                      "value": float(np.mean(vals)), "n": len(vals), "failures": len(rows) - len(vals)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _write_json(folder / "summary.json", {"triples": len(rows), "metrics": metrics})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A test set of 6 triples (written in spfbench.testset's format) and a run of 3 methods: naive
    complete, lora complete with one image missing and one null value, magnet failed at fit."""
    root = tmp_path_factory.mktemp("report")
    ts, run = root / "test set", root / "run"  # a space in the path: hrefs must be URL-quoted
    triples = []
    for i, cat in enumerate(CATEGORIES):
        tid = f"{i:05d}-t{i}"
        base = EVIL if i == 1 else f"A person number {i}"
        triples.append(dict(id=tid, index=i, base_caption=base, target_text=f"target {i}", target_caption=f"{base}, target {i}",
                            category=cat, seed=i, original=f"originals/{tid}.png"))
        _png(ts / "originals" / f"{tid}.png", i)
    _write_json(ts / "testset.json", {"format_version": 1, "status": "complete", "content_sha256": "ab" * 32})
    (ts / "testset.jsonl").write_text("".join(json.dumps(t) + "\n" for t in triples))
    _write_json(run / "run.json", {"format_version": 1, "methods": METHODS, "status": "complete",
                                   "spec": {"testset": str(ts), "testset_content_sha256": "ab" * 32, "preset": "tiny",
                                            "metrics": list(METRICS), "limit": None, "triples": len(triples)}})
    rng = np.random.default_rng(1)
    for j, m in enumerate(METHODS):
        d = run / "methods" / m
        failed = m == "magnet"
        _write_json(d / "status.json", {"method": m, "status": "failed" if failed else "complete",
                                        "error": "CUDA out of memory <b>8 GiB</b>" if failed else None,
                                        "traceback": "Traceback ...\nRuntimeError: boom" if failed else None,
                                        "stage": "fit" if failed else None, "artifact": None, "config": {}})
        if failed:
            continue
        rows = []
        for i, t in enumerate(triples):
            missing = m == "lora" and i == 2
            if not missing:
                _png(d / "images" / f"{t['id']}.png", 100 * (j + 1) + i)
            row = {"id": t["id"], "category": t["category"], "target_text": t["target_text"], "errors": {}}
            for k in PER_SAMPLE:
                row[k] = None if missing else round(float(rng.uniform(0, 1)), 4)
            if missing:
                row["errors"] = {"input": "no customized image"}
            rows.append(row)
        rows[3]["clip-t@vit-l-14"] = rows[0]["clip-t@vit-l-14"]  # a tie: broken by test set order
        _score(d / "score", rows, fid=10.0 + j)
    _score(run / "methods" / "naive" / "retention" / "score",
           [{"id": t["id"], "category": t["category"], "target_text": "", "lpips@alex-v0.1": 0.1 * i, "errors": {}}
            for i, t in enumerate(triples)], fid=1.0)
    _png(run / "methods" / "naive" / "curve" / "curve.png", 7)
    table1.write(table1.collect({m: run / "methods" / m / "score" for m in METHODS[:2]}), run)
    report.write_html(run)
    return run


def _blob(html: str) -> dict:
    m = re.search(r"<script type='application/json' id='data'>(.*?)</script>", html, re.S)
    return json.loads(m.group(1))


def _samples(run: Path, m: str) -> list[dict]:
    return [json.loads(x) for x in (run / "methods" / m / "score" / "samples.jsonl").read_text().splitlines()]


def _ids(run: Path) -> list[str]:
    ts = Path(json.loads((run / "run.json").read_text())["spec"]["testset"])
    return [json.loads(x)["id"] for x in (ts / "testset.jsonl").read_text().splitlines()]


def test_embedded_data_has_every_triple(run_dir):
    html = (run_dir / "index.html").read_text()
    data = _blob(html)
    assert [r["id"] for r in data["rows"]] == _ids(run_dir)
    assert [m["name"] for m in data["methods"]] == METHODS
    assert [k["id"] for k in data["metrics"]] == PER_SAMPLE  # FID is set-level: not in the grid
    assert "http://" not in html and "https://" not in html  # self-contained
    assert "not readable" not in html


def test_captions_are_escaped(run_dir):
    html = (run_dir / "index.html").read_text()
    assert html.count("</script>") == 2 and html.count("<script") == 2  # only the page's own two scripts
    assert "alert(" in html and "<b>friends" not in html
    assert _blob(html)["rows"][1]["base"] == EVIL  # round-trips intact
    assert "CUDA out of memory &lt;b&gt;8 GiB&lt;/b&gt;" in html and "<code>fit</code>" in html  # failed method


def test_relative_paths_resolve(run_dir):
    data = _blob((run_dir / "index.html").read_text())
    ts = Path(json.loads((run_dir / "run.json").read_text())["spec"]["testset"])
    for r in data["rows"]:
        assert not os.path.isabs(unquote(r["orig"]))
        assert (run_dir / unquote(r["orig"])).samefile(ts / "originals" / f"{r['id']}.png")
        for m, src in zip(METHODS, r["img"]):
            expected = run_dir / "methods" / m / "images" / f"{r['id']}.png"
            assert (src is not None) == expected.is_file()
            if src is not None:
                assert (run_dir / unquote(src)).samefile(expected)
    assert sum(src is None for r in data["rows"] for src in r["img"]) == 6 + 1  # magnet: all; lora: one


def test_category_means_match_numpy(run_dir):
    means = report.category_means(report.load(run_dir))
    assert list(means) == list(dict.fromkeys(CATEGORIES))
    html = (run_dir / "index.html").read_text()
    for m in METHODS[:2]:
        rows = _samples(run_dir, m)
        for cat in set(CATEGORIES):
            for k in PER_SAMPLE:
                x = np.array([np.nan if r[k] is None else r[k] for r in rows if r["category"] == cat], dtype=float)
                mean, n = means[cat][m][k]
                assert n == int(np.sum(~np.isnan(x)))
                assert mean == pytest.approx(float(np.nanmean(x)), rel=1e-12)
                assert f"{report.format_value(mean)} <small>N={n}</small>" in html
    assert "magnet" not in means["age"]  # no samples: no row


def test_table1_matches_markdown_ranking(run_dir):
    html = (run_dir / "index.html").read_text()
    t1 = html.split("<h2>Table 1</h2>")[1].split("<h2>")[0]
    md = (run_dir / "results.md").read_text()
    assert re.findall(r"<b>([-\d.]+)</b>|<u>([-\d.]+)</u>", t1) == re.findall(r"\*\*([-\d.]+)\*\*|<u>([-\d.]+)</u>", md)
    assert "Retention" in html and "methods/naive/curve/curve.png" in html and "href='results.md'" in html


def test_table_with_failed_rows(run_dir, tmp_path):
    """The runner passes its own table, where a failed method is a row holding only its error."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    table = table1.collect({"naive": run / "methods" / "naive" / "score"})
    row = table1.Row(method="magnet", cells={})
    row.error = "fit: CUDA out of memory <b>8 GiB</b>"  # Row.error: set as an attribute, whatever Row's fields
    table.rows.append(row)
    html = report.write_html(run, table).read_text()
    t1 = html.split("<h2>Table 1</h2>")[1].split("<h2>")[0]
    assert "<th>magnet</th><td colspan='8' class='err'>fit: CUDA out of memory &lt;b&gt;" in t1
    assert "<th>lora</th>" not in t1  # the table given is the one shown


def test_limit_and_moved_testset(run_dir, tmp_path):
    """--limit N: the grid holds the first N triples; a test set that is gone: the ids scored, no originals."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    info = json.loads((run / "run.json").read_text())
    info["spec"]["limit"] = 4
    _write_json(run / "run.json", info)
    assert [r["id"] for r in _blob(report.write_html(run).read_text())["rows"]] == _ids(run_dir)[:4]
    info["spec"]["testset"] = str(tmp_path / "gone")
    _write_json(run / "run.json", info)
    html = report.write_html(run).read_text()
    assert "not readable" in html
    rows = _blob(html)["rows"]
    assert [r["id"] for r in rows] == _ids(run_dir) and all(r["orig"] is None for r in rows)


# ---- the page in a real browser ---------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def driver():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("SPFBENCH_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} / {CHROMEDRIVER} missing (run `make browser`)")
        pytest.skip("no Debian chromium (make browser installs it)")
    if os.environ.get("SPFBENCH_REQUIRE_BROWSER") != "1":
        pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="spfbench-chromium-")
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={profile}", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _row_ids(d) -> list[str]:
    return d.execute_script("return [...document.querySelectorAll('#grid .row:not(.head)')].map(r => r.dataset.id)")


def _choose(d, **values) -> None:
    from selenium.webdriver.support.ui import Select

    for name, value in values.items():
        Select(d.find_element("id", name)).select_by_value(value)


def _python_order(run: Path, method: str, metric: str, desc: bool, cat: str = "") -> list[str]:
    rows = [(i, r) for i, r in enumerate(_samples(run, method)) if not cat or r["category"] == cat]
    key = lambda ir: (ir[1][metric] is None, -(ir[1][metric] or 0) if desc else (ir[1][metric] or 0), ir[0])  # noqa: E731
    return [r["id"] for _, r in sorted(rows, key=key)]


def test_page_in_headless_chromium(run_dir, driver, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    d = driver
    d.get((run_dir / "index.html").as_uri())
    ids = _ids(run_dir)
    assert _row_ids(d) == ids
    # every image loads (scrolled into view, since they are loading="lazy"); placeholders elsewhere
    d.execute_script("document.querySelectorAll('#grid img').forEach(i => i.scrollIntoView())")
    loaded = ("return [...document.querySelectorAll('#grid img')].map(i => i.complete && i.naturalWidth > 0)")
    WebDriverWait(d, 10).until(lambda d: all(d.execute_script(loaded)))
    assert len(d.execute_script(loaded)) == 6 + 6 + 5
    assert d.execute_script("return document.querySelectorAll('#grid .ph.failed').length") == 6
    assert d.execute_script("return document.querySelectorAll('#grid .ph:not(.failed)').length") == 1
    caption = d.execute_script("return document.querySelector('#grid .row[data-id=\"00001-t1\"] .cap').textContent")
    assert caption.startswith(f"00001-t1 · style{EVIL}")  # shown as text, not markup

    # sort: lora (method 1) by CLIP-T (metric 1), both directions; null (missing image) last, ties in test set order
    for direction in ("desc", "asc"):
        _choose(d, sort="1:1", dir=direction)
        assert _row_ids(d) == _python_order(run_dir, "lora", "clip-t@vit-l-14", direction == "desc")
    _choose(d, sort="0:0", dir="asc")
    assert _row_ids(d) == _python_order(run_dir, "naive", "lpips@alex-v0.1", False)
    # category filter (keeps the sort), then back to all in test set order
    _choose(d, cat="age")
    assert _row_ids(d) == _python_order(run_dir, "naive", "lpips@alex-v0.1", False, cat="age")
    _choose(d, cat="", sort="")
    assert _row_ids(d) == ids
    # paging: 4 rows a page
    d.execute_script("D.pageSize = 4; render()")
    assert _row_ids(d) == ids[:4] and "page 1 / 2" in d.find_element("id", "page").text
    d.find_element("id", "next").click()
    assert _row_ids(d) == ids[4:]
    d.find_element("id", "prev").click()
    assert _row_ids(d) == ids[:4]

    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    d.find_element("id", "controls").location_once_scrolled_into_view
    shot = tmp_path / "grid.png"
    assert d.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert im.size[0] > 500 and im.size[1] > 500
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # not blank
        assert len(im.convert("RGB").getcolors(1 << 20) or range(1 << 20)) > 100  # images, not just text
