"""The static HTML report of a ``spfbench run`` folder: ``RUN/index.html`` (docs/report.md).

One self-contained page (inline CSS and JS, no network, works from ``file://``): run facts and method
statuses, Table 1 (and the retention table), per-category means of every per-sample metric, and the
per-triple grid (original + every method's image, captions, per-sample values) with sort / filter /
paging done in the browser over a JSON blob embedded in the page. Images are linked by paths relative
to ``RUN``, so the run folder (and the test set next to it) can be browsed or copied as plain files.
"""

from __future__ import annotations

import json
import math
import os
from html import escape
from pathlib import Path
from urllib.parse import quote

from . import table1
from .errors import SpfbenchError
from .io import atomic_write_text
from .testset import load_testset

ROW_KEYS = {"id", "category", "target_text", "errors"}  # samples.jsonl keys that are not metric values
PAGE_SIZE = 50


def _json(path: Path, default=None):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def _samples(folder: Path) -> dict[str, dict]:
    path = folder / "samples.jsonl"
    if not path.is_file():
        return {}
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return {r["id"]: r for r in rows}


def _num(v):
    """A finite float, else None (JSON has no NaN)."""
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _href(run: Path, target: Path) -> str:
    return quote(os.path.relpath(target, run).replace(os.sep, "/"))


def format_value(v: float | None) -> str:
    """Like the grid's script: 3 decimals, 1 from 100 up, an exponent below 0.01."""
    if v is None:
        return "-"
    return "0" if v == 0 else f"{v:.1f}" if abs(v) >= 100 else f"{v:.3f}" if abs(v) >= 0.01 else f"{v:.2e}"


def _mean(values) -> tuple[float | None, int]:
    vals = [v for v in map(_num, values) if v is not None]
    return (sum(vals) / len(vals) if vals else None), len(vals)


def load(run: Path) -> dict:
    """Everything the page shows, read from the run folder (plain data, also handy for tests)."""
    run = Path(run)
    info = _json(run / "run.json", {})
    spec = info.get("spec", {})
    names = list(info.get("methods", []))
    if (run / "methods").is_dir():
        names += sorted(p.name for p in (run / "methods").iterdir() if p.is_dir() and p.name not in names)
    methods = []
    for m in names:
        folder = run / "methods" / m
        status = _json(folder / "status.json", {}) or {}
        artifact = _json(Path(status["artifact"]) / "method.json", {}) if status.get("artifact") else {}
        methods.append({
            "name": m, "folder": folder, "status": status.get("status", "not started"),
            "error": status.get("error"), "stage": status.get("stage"), "traceback": status.get("traceback"),
            "notes": list((artifact or {}).get("notes") or []),
            "summary": _json(folder / "score" / "summary.json", {}) or {},
            "samples": _samples(folder / "score"),
        })
    testset = Path(spec["testset"]).resolve() if spec.get("testset") else None
    testset_error = None
    try:
        if testset is None:
            raise SpfbenchError("run.json names no test set")
        _, triples = load_testset(testset)
        triples = [dict(id=t.id, category=t.category, base=t.base_caption, target=t.target_text,
                        original=testset / t.original) for t in triples[: spec.get("limit") or None]]
    except (SpfbenchError, OSError, ValueError) as e:  # the test set moved or is unreadable: the ids scored, no originals
        testset_error = str(e)
        seen = {}
        for m in methods:
            for r in m["samples"].values():
                seen.setdefault(r["id"], dict(id=r["id"], category=r.get("category", "?"), base="",
                                              target=r.get("target_text", ""), original=None))
        triples = list(seen.values())
    # Per-sample metric ids in summary order (then any others seen in the rows), with column/direction.
    metrics: dict[str, dict] = {}
    for m in methods:
        rows = list(m["samples"].values())
        keys = [k for k in m["summary"].get("metrics", {}) if rows and k in rows[0]]
        keys += [k for r in rows[:1] for k in r if k not in ROW_KEYS and k not in keys]
        for k in keys:
            s = m["summary"].get("metrics", {}).get(k, {})
            metrics.setdefault(k, {"id": k, "column": s.get("column") or k, "higher": s.get("higher_is_better")})
    return {"run": run, "info": info, "spec": spec, "testset": testset, "testset_error": testset_error, "methods": methods,
            "triples": triples, "metrics": list(metrics.values())}


def category_means(data: dict) -> dict[str, dict[str, dict[str, tuple[float | None, int]]]]:
    """category -> method -> metric id -> (mean of the non-null per-sample values, N)."""
    cats = list(dict.fromkeys(t["category"] for t in data["triples"]))
    out = {}
    for c in cats:
        ids = [t["id"] for t in data["triples"] if t["category"] == c]
        out[c] = {m["name"]: {k["id"]: _mean(m["samples"].get(i, {}).get(k["id"]) for i in ids) for k in data["metrics"]}
                  for m in data["methods"] if m["samples"]}
    return out


def grid_data(data: dict) -> dict:
    """The JSON blob the page's script renders: per triple, captions, image paths and values per method."""
    run, mids = data["run"], [k["id"] for k in data["metrics"]]
    rows = []
    for t in data["triples"]:
        imgs, vals, errs = [], [], []
        for m in data["methods"]:
            p = m["folder"] / "images" / f"{t['id']}.png"
            imgs.append(_href(run, p) if p.is_file() else None)
            s = m["samples"].get(t["id"])
            vals.append([_num(s.get(k)) for k in mids] if s else None)
            errs.append("; ".join(f"{k}: {v}" for k, v in (s or {}).get("errors", {}).items()) or None)
        orig = t["original"]
        rows.append({"id": t["id"], "cat": t["category"], "base": t["base"], "target": t["target"],
                     "orig": _href(run, orig) if orig is not None and orig.is_file() else None,
                     "img": imgs, "v": vals, "err": errs})
    return {"metrics": data["metrics"], "methods": [{"name": m["name"], "status": m["status"]} for m in data["methods"]],
            "rows": rows, "pageSize": PAGE_SIZE}


def embed_json(obj) -> str:
    """JSON safe inside <script>: no '<' (so no '</script>' or '<!--'), '>' or '&' survive literally."""
    return json.dumps(obj, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _table1_html(table: table1.Table, paper: bool, columns: list[str]) -> str:
    rows = table1.table_rows(table, paper)
    rk = table1.ranks(rows)
    head = "".join(f"<th>{escape(c)} {table1.arrow(c, False)}</th>" for c in columns)
    body = []
    for i, r in enumerate(rows):
        cls = " class='abl'" if r.ablation or r.source == "paper" else ""
        if getattr(r, "error", None):  # a method that failed or did not finish: its error across the row
            body.append(f"<tr{cls}><th>{escape(r.label)}</th><td colspan='{len(columns)}' class='err'>{escape(r.error)}</td></tr>")
            continue
        cells = []
        for col in columns:
            c = r.cells.get(col, table1.Cell(None))
            s = table1.fmt(c.value, col)
            s = {1: f"<b>{s}</b>", 2: f"<u>{s}</u>"}.get(rk.get((i, col)), s)
            if c.value is not None and c.ci_low is not None:
                s += f' <small>[{table1.fmt(c.ci_low, col)}, {table1.fmt(c.ci_high, col)}]</small>'
            if c.value is not None and c.n is not None:
                s += f" <small>N={c.n}</small>"
            cells.append(f"<td>{s}</td>")
        body.append(f"<tr{cls}><th>{escape(r.label)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>Method</th>{head}</tr>{''.join(body)}</table>"


def _paired_html(table: table1.Table) -> str:
    """Each method against naive and each ablation against full SPF: the mean per-triple difference with its
    95% paired bootstrap CI; a CI that excludes 0 in the better direction is bold, in the worse italic."""
    rows = [r for r in table.rows if r.source == "ours" and not r.error]
    pairs = table1.shown_pairs(rows)
    if not pairs:
        return ""
    paired = table1.paired_differences(table)
    cols = [c for c in table1.columns(rows) if any(d["column"] == c for d in paired)]
    body = []
    for a, b in pairs:
        cells = []
        for col in cols:
            d = table1.find_pair(paired, a, b, col)
            if d is None:
                cells.append("<td>-</td>")
                continue
            s = f"{d['diff']:+.3f}"
            if d["ci_low"] is not None:
                s += f" <small>[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]</small>"
                better = d["ci_low"] > 0 if d["higher_is_better"] else d["ci_high"] < 0
                worse = d["ci_high"] < 0 if d["higher_is_better"] else d["ci_low"] > 0
                s = f"<b>{s}</b>" if better else f"<i>{s}</i>" if worse else s
            cells.append(f"<td>{s}</td>")
        body.append(f"<tr><th>{escape(a)} &minus; {escape(b)}</th>{''.join(cells)}</tr>")
    head = "".join(f"<th>{escape(c)} {table1.arrow(c, False)}</th>" for c in cols)
    return ("<h2>Paired differences</h2><p>Mean over the triples both rows scored of the per-triple difference, 95% "
            "paired bootstrap CI (<code>scipy.stats.bootstrap</code>, percentile); <b>bold</b>: better beyond its CI, "
            "<i>italic</i>: worse beyond its CI. Every pair of rows is in <a href='results.json'>results.json</a> (<code>paired</code>).</p>"
            f"<table><tr><th>Comparison</th>{head}</tr>{''.join(body)}</table>")


def _run_status(info: dict, methods: list[dict]) -> str:
    """The run's status as its methods' outcomes say (a run whose every method failed is not "complete")."""
    status = str(info.get("status", "-"))
    failed = [m["name"] for m in methods if m["status"] == "failed"]
    if failed and status == "complete":  # a run.json written before statuses were derived from the methods
        status = "failed" if len(failed) == len(methods) else "partial"
    return status + (f" ({len(failed)} of {len(methods)} methods failed: {', '.join(failed)})" if failed else "")


def _header_html(data: dict) -> str:
    spec, info = data["spec"], data["info"]
    sha = str(spec.get("testset_content_sha256") or "")[:12]
    unread = data["testset_error"]
    note = f" <span class='err'>not readable ({escape(unread)}): no originals or base captions below</span>" if unread else ""
    facts = [("Test set", f"{escape(str(data['testset']))} <code>{escape(sha)}</code>{note}"),
             ("Triples", escape(str(spec.get("triples", len(data["triples"]))))),
             ("Metrics preset", escape(str(spec.get("preset", "-")))),
             ("Metrics", escape(", ".join(spec.get("metrics", [])))),
             ("Limit", escape(str(spec.get("limit")))), ("Run status", escape(_run_status(info, data["methods"])))]
    out = ["<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>", "<ul class='methods'>"]
    for m in data["methods"]:
        line = f"<b>{escape(m['name'])}</b> <span class='st {escape(m['status'])}'>{escape(m['status'])}</span>"
        for note in m.get("notes", []):
            line += f" <span class='note'>note: {escape(note)}</span>"
        if m["status"] == "failed":
            line += f" at stage <code>{escape(str(m['stage']))}</code>: <span class='err'>{escape(str(m['error']))}</span>"
            if m["traceback"]:
                line += f"<details><summary>traceback</summary><pre>{escape(m['traceback'])}</pre></details>"
        out.append(f"<li>{line}</li>")
    return "".join(out) + "</ul>"


def _categories_html(data: dict) -> str:
    means = category_means(data)
    if not data["metrics"] or not means:
        return "<p>No per-sample scores yet.</p>"
    head = "".join(f"<th>{escape(k['column'])}{'' if k['higher'] is None else ' ↑' if k['higher'] else ' ↓'}"
                   f"<br><small>{escape(k['id'])}</small></th>" for k in data["metrics"])
    out = [f"<table><tr><th>Category</th><th>Method</th>{head}</tr>"]
    for cat, per_method in means.items():
        for j, (m, vals) in enumerate(per_method.items()):
            first = f"<th rowspan='{len(per_method)}'>{escape(cat)}</th>" if j == 0 else ""
            cells = "".join(f"<td>{format_value(v)} <small>N={n}</small></td>" for v, n in vals.values())
            out.append(f"<tr class='{'grp' if j == 0 else ''}'>{first}<th>{escape(m)}</th>{cells}</tr>")
    return "".join(out) + "</table>"


def render(data: dict, table: table1.Table, paper: bool = False) -> str:
    run = data["run"]
    sections = [f"<h1>spfbench run <code>{escape(run.name)}</code></h1>", _header_html(data),
                "<h2>Table 1</h2>", _table1_html(table, paper, table1.columns(table.rows))]
    links = [f"<a href='{n}'>{n}</a>" for n in ("results.md", "results.csv", "results.tex", "results.json",
                                                               "retention.md", "retention.csv", "retention.tex") if (run / n).is_file()]
    if links:
        sections.append("<p>Files: " + ", ".join(links) + "</p>")
    sections.append(_paired_html(table))
    retention = {m["name"]: m["folder"] / "retention" / "score" for m in data["methods"]
                 if m["status"] == "complete" and (m["folder"] / "retention" / "score" / "summary.json").is_file()}
    if retention:
        rt = table1.collect(retention)
        cols = [c for c in table1.columns(rt.rows) if any(c in r.cells for r in rt.rows)]
        sections += ["<h2>Retention (image from the base text only)</h2>", _table1_html(rt, False, cols)]
    sections += ["<h2>Per category</h2><p>Mean of the per-sample values (non-null) per method; N = triples with a value.</p>",
                 _categories_html(data)]
    curves = [(m["name"], f"methods/{m['name']}/curve/curve.png") for m in data["methods"]
              if (m["folder"] / "curve" / "curve.png").is_file()]
    if curves:
        sections.append("<h2>Training curves (Fig. 5)</h2>" + "".join(
            f"<a href='{escape(src)}'><img class='curve' src='{escape(src)}' alt='{escape(name)} curve'></a>" for name, src in curves))
    if (run / "tradeoff.png").is_file():
        sections.append("<h2>Trade-off</h2><p>Preservation against response (ground truth), 95% CIs; a method beats "
                        "another only where its line dominates (<a href='tradeoff.json'>tradeoff.json</a>).</p>"
                        "<a href='tradeoff.png'><img class='curve' src='tradeoff.png' alt='trade-off plot'></a>")
    sections.append(
        "<h2>Triples</h2><div id='controls'>Sort by <select id='sort'><option value=''>test set order</option></select>"
        "<select id='dir'><option value='desc'>descending</option><option value='asc'>ascending</option></select>"
        " Category <select id='cat'><option value=''>all</option></select>"
        " <button id='prev'>&larr;</button> <span id='page'></span> <button id='next'>&rarr;</button></div>"
        "<div id='grid'></div>")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>spfbench run {escape(run.name)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(sections)}"
            f"<script type='application/json' id='data'>{embed_json(grid_data(data))}</script>"
            f"<script>{JS}</script></body></html>\n")


def write_html(run: Path, table: table1.Table | None = None, paper: bool = False) -> Path:
    """Write ``RUN/index.html`` atomically and return its path (``table`` defaults to the complete methods')."""
    run = Path(run)
    data = load(run)
    if table is None:
        table = table1.collect({m["name"]: m["folder"] / "score" for m in data["methods"]
                                if m["status"] == "complete" and (m["folder"] / "score" / "summary.json").is_file()})
    from . import tradeoff

    points = tradeoff.run_points(run)
    if points:  # the run has trade-off metrics (ground truth): its rows and curve steps on one plot
        tradeoff.write(points, run, title=f"{run.name}: preservation against response")
    out = run / "index.html"
    atomic_write_text(out, render(data, table, paper))
    return out


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f4f4f4}tr.abl th,tr.abl td{color:#666}tr.grp td,tr.grp th{border-top:2px solid #888}
small{color:#666}dl{display:grid;grid-template-columns:max-content auto;gap:0 1em}dt{font-weight:bold}dd{margin:0}
.st{padding:0 4px;border-radius:3px;background:#ddd}.st.complete{background:#cfc}.st.failed{background:#fcc}
.err{color:#a00}.note{color:#850}pre{font-size:11px;max-height:20em;overflow:auto;background:#f8f8f8}img.curve{max-width:800px}
#controls{position:sticky;top:0;background:#fff;padding:4px 0;z-index:2;border-bottom:1px solid #ccc}
.row{display:flex;gap:8px;align-items:flex-start;border-bottom:1px solid #eee;padding:6px 0}
.cap{width:220px;flex:none;font-size:12px}.cap .id{font-family:monospace;color:#666}
.cell{width:160px;flex:none;font-size:11px;text-align:center}
.cell img,.ph{width:160px;height:160px;object-fit:contain;background:#eee;display:block}
.ph{display:flex;align-items:center;justify-content:center;color:#888}.ph.failed{background:#fdd;color:#a00}
.cell table{margin:2px auto;font-size:11px}.cell td,.cell th{border:none;padding:0 3px}.cell th{background:none;font-weight:normal;color:#666}
.head .cell{font-weight:bold;font-size:13px}.cell tr.sorted td,.cell tr.sorted th{font-weight:bold;color:#000;background:#ffc}
"""

JS = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const $ = id => document.getElementById(id);
const el = (tag, props, ...kids) => { const e = Object.assign(document.createElement(tag), props || {});
  for (const k of kids) if (k != null) e.append(k); return e; };
const fmt = v => v == null ? '-' : v === 0 ? '0' : Math.abs(v) >= 100 ? v.toFixed(1)
  : Math.abs(v) >= 0.01 ? v.toFixed(3) : v.toExponential(2);
let page = 0;
D.methods.forEach((m, i) => D.metrics.forEach((k, j) =>
  $('sort').append(el('option', {value: i + ':' + j, textContent: m.name + ' \u00b7 ' + k.column + ' (' + k.id + ')'}))));
[...new Set(D.rows.map(r => r.cat))].forEach(c => $('cat').append(el('option', {value: c, textContent: c})));

function visible() {
  const cat = $('cat').value, s = $('sort').value, sign = $('dir').value === 'asc' ? 1 : -1;
  const rows = D.rows.map((r, i) => [r, i]).filter(([r]) => !cat || r.cat === cat);
  if (!s) return rows.map(([r]) => r);
  const [mi, kj] = s.split(':').map(Number);
  const val = r => r.v[mi] ? r.v[mi][kj] : null;
  rows.sort(([a, i], [b, j]) => {
    const x = val(a), y = val(b);
    if (x == null || y == null) return (x == null) - (y == null) || i - j;  // no value: last
    return sign * (x - y) || i - j;
  });
  return rows.map(([r]) => r);
}

function image(src, alt, status) {
  if (src) return el('a', {href: src, target: '_blank'}, el('img', {src: src, alt: alt, loading: 'lazy'}));
  return el('div', {className: 'ph ' + (status === 'failed' ? 'failed' : ''), textContent: status === 'failed' ? 'failed' : 'missing'});
}

function render() {
  const rows = visible(), pages = Math.max(1, Math.ceil(rows.length / D.pageSize));
  page = Math.min(page, pages - 1);
  $('page').textContent = 'page ' + (page + 1) + ' / ' + pages + ' (' + rows.length + ' triples)';
  const head = el('div', {className: 'row head'}, el('div', {className: 'cap', textContent: 'Triple'}),
    el('div', {className: 'cell', textContent: 'original'}),
    ...D.methods.map(m => el('div', {className: 'cell', textContent: m.name + (m.status === 'complete' ? '' : ' (' + m.status + ')')})));
  const out = [head];
  for (const r of rows.slice(page * D.pageSize, (page + 1) * D.pageSize)) {
    const cap = el('div', {className: 'cap'}, el('div', {className: 'id', textContent: r.id + ' \u00b7 ' + r.cat}),
      el('div', {textContent: r.base}), el('div', {}, el('b', {textContent: '+ ' + r.target})));
    const cells = D.methods.map((m, i) => {
      const t = el('table');
      if (r.v[i]) D.metrics.forEach((k, j) => t.append(el('tr', {className: $('sort').value === i + ':' + j ? 'sorted' : ''},
        el('th', {textContent: k.column}), el('td', {textContent: fmt(r.v[i][j])}))));
      return el('div', {className: 'cell', title: r.err[i] || ''}, image(r.img[i], m.name + ' ' + r.id, m.status), t);
    });
    const row = el('div', {className: 'row'}, cap, el('div', {className: 'cell'}, image(r.orig, 'original ' + r.id, 'missing')), ...cells);
    row.dataset.id = r.id;
    out.push(row);
  }
  $('grid').replaceChildren(...out);
}

['sort', 'dir', 'cat'].forEach(id => $(id).addEventListener('change', () => { page = 0; render(); }));
$('prev').addEventListener('click', () => { page = Math.max(0, page - 1); render(); });
$('next').addEventListener('click', () => { page += 1; render(); });
render();
"""
