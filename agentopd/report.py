"""``agentopd report RUN_DIR``: one self-contained HTML page of a run, for any browser, offline.

From ``metrics.jsonl``: the learning curves (inline SVG). From ``samples.jsonl`` (agentopd.samples):
each sampled response with its tokens coloured by the advantage they got (blue: pushed up, red:
pushed down), the critique beside it, the token's log-probs on hover, and filters by verdict and by
step (a few lines of inline JS). From ``diagnose.json`` (``agentopd diagnose teacher``): its table.
From an ``agentopd rlef`` directory (``results.jsonl`` with transcripts, ``summary.json``): the pass
rate after each turn and every attempt, one block per turn (the answer, the critique that followed).
Nothing is fetched: no external script, style sheet, font or image. The charts are
:func:`line_chart_svg`, which the benchmark scripts use for their plots too (an SVG file, its PNG
by headless Chromium: :func:`png_from_svg`).
"""
from __future__ import annotations

import html
import json
import math
import os

from agentopd import jsonl

CHARTS = [
    ("reward", ["reward_mean"]),
    ("held-out pass@1", ["heldout_pass1"]),
    ("KL to the teacher (per token)", ["kl_teacher"]),
    ("teacher AUC (correct vs wrong)", ["teacher_auc"]),
    ("log-ratio teacher − student per token", ["ratio_correct", "ratio_wrong"]),
    ("response length (tokens)", ["response_len"]),
    ("time per stage (s)", ["time_generate", "time_execute", "time_score", "time_update"]),
]
"""Chart title -> the metrics it draws (a metric absent from the run is left out)."""
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
W, H, PAD = 360, 190, 50
XMLNS = 'xmlns="http://www.w3.org/2000/svg"'
"""An SVG file's namespace (left out inline, where the page names no URL at all)."""


class ReportError(Exception):
    """A run directory the report cannot be made from."""


def _jsonl(path: str) -> list[dict]:
    try:
        return jsonl.read(path)
    except jsonl.JSONLError as e:
        raise ReportError(str(e)) from None


def _json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: {e}") from None


def _load_rlef(run_dir: str) -> dict | None:
    """An ``agentopd rlef`` directory's attempts (``results.jsonl`` rows with a transcript) and
    ``summary.json``; None when it is not one."""
    results, summary = os.path.join(run_dir, "results.jsonl"), os.path.join(run_dir, "summary.json")
    rows = _jsonl(results) if os.path.exists(results) else []
    if not any("transcript" in r for r in rows):
        return None
    return {"rows": [r for r in rows if "transcript" in r],
            "summary": _json(summary) if os.path.exists(summary) else {}}


def load(run_dir: str) -> dict:
    """The run's metrics rows, sample rows, diagnose report and RLEF attempts (each empty/None when absent)."""
    if not os.path.isdir(run_dir):
        raise ReportError(f"{run_dir}: no such directory")
    path = lambda name: os.path.join(run_dir, name)
    metrics = _jsonl(path("metrics.jsonl")) if os.path.exists(path("metrics.jsonl")) else []
    diag = _json(path("diagnose.json")) if os.path.exists(path("diagnose.json")) else None
    rlef = _load_rlef(run_dir)
    if not metrics and diag is None and rlef is None:
        raise ReportError(f"{run_dir}: no metrics.jsonl, diagnose.json or rlef results.jsonl "
                          "(not a run, diagnose or rlef directory)")
    samples = _jsonl(path("samples.jsonl")) if os.path.exists(path("samples.jsonl")) else []
    return {"metrics": metrics, "samples": samples, "diagnose": diag, "rlef": rlef}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def series(metrics: list[dict], key: str) -> list[tuple[float, float]]:
    """(step, value) of each row with a finite ``key``."""
    return [(r["step"], r[key]) for r in metrics if _finite(r.get(key)) and _finite(r.get("step"))]


def _scale(lo: float, hi: float, a: float, b: float):
    """The linear map of [lo, hi] onto [a, b] (the middle of [a, b] when lo == hi)."""
    return (lambda v: (a + b) / 2) if hi == lo else (lambda v: a + (v - lo) * (b - a) / (hi - lo))


def _y_range(ys: list[float]) -> tuple[float, float]:
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-9:  # a flat curve: drawn in the middle of a small range around its value
        lo, hi = lo - max(abs(lo) * 0.1, 0.05), hi + max(abs(hi) * 0.1, 0.05)
    return lo, hi


def _series_svg(key: str, pts: list[tuple], color: str, x_of, y_of, xlabel: str) -> list[str]:
    """One series: its mean ± std band (points with a third value), polyline and hoverable points."""
    out = [f'<g class="series" data-key="{html.escape(key)}" data-n="{len(pts)}" stroke="{color}" fill="{color}">']
    if any(len(p) > 2 for p in pts):
        band = [(x, y + sd) for x, y, sd, *_ in pts] + [(x, y - sd) for x, y, sd, *_ in reversed(pts)]
        xy = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in band)
        out.append(f'<polygon class="band" points="{xy}" fill-opacity="0.2" stroke="none"/>')
    xy = " ".join(f"{x_of(p[0]):.1f},{y_of(p[1]):.1f}" for p in pts)
    out.append(f'<polyline points="{xy}" fill="none" stroke-width="1.5"/>')
    out += [f'<circle class="pt" cx="{x_of(p[0]):.1f}" cy="{y_of(p[1]):.1f}" r="2.5">'
            f'<title>{html.escape(xlabel)} {_fmt(p[0])}: {html.escape(key)} = {_fmt(p[1])}'
            + (f" ± {_fmt(p[2])}" if len(p) > 2 else "") + "</title></circle>" for p in pts]
    return out + ["</g>"]


def _hline_svg(label: str, y: float, dash: str, x0: float, x1: float, y_of) -> str:
    return (f'<g class="hline" data-label="{html.escape(label)}"><line x1="{x0}" y1="{y_of(y):.1f}" x2="{x1}" '
            f'y2="{y_of(y):.1f}" stroke="#555" stroke-dasharray="{dash}"/><title>{html.escape(label)} = {_fmt(y)}'
            f'</title></g>')


def _legend_svg(items: list[tuple[str, str, str]], x: float, y: float) -> list[str]:
    """(label, colour, dash) rows from (x, y) down."""
    return [f'<line x1="{x}" y1="{y + 14 * i - 4}" x2="{x + 18}" y2="{y + 14 * i - 4}" stroke="{c}" '
            f'stroke-width="2" stroke-dasharray="{d}"/><text x="{x + 22}" y="{y + 14 * i}">{html.escape(k)}</text>'
            for i, (k, c, d) in enumerate(items)]


def _frame_svg(width: int, height: int, top: float, bottom: float, ranges: tuple, title: str, xlabel: str,
               ylabel: str, legend: bool) -> list[str]:
    """The opening tag, background, axes, their end values (``ranges``: x0, x1, lo, hi) and labels."""
    x0, x1, lo, hi = ranges
    out = [(f'<svg {XMLNS} class="chart" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="10">'),
           f'<rect width="{width}" height="{height}" fill="#fff"/>',
           f'<line x1="{PAD}" y1="{bottom}" x2="{width - 10}" y2="{bottom}" class="axis" stroke="#999"/>',
           f'<line x1="{PAD}" y1="{top}" x2="{PAD}" y2="{bottom}" class="axis" stroke="#999"/>',
           f'<text x="{PAD - 4}" y="{top + 4}" text-anchor="end">{_fmt(hi)}</text>',
           f'<text x="{PAD - 4}" y="{bottom}" text-anchor="end">{_fmt(lo)}</text>',
           f'<text x="{PAD}" y="{bottom + 16}">{"" if legend else html.escape(xlabel) + " "}{_fmt(x0)}</text>',
           f'<text x="{width - 10}" y="{bottom + 16}" text-anchor="end">{_fmt(x1)}</text>']
    if title:
        out.append(f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="13">{html.escape(title)}</text>')
    if legend and xlabel:
        out.append(f'<text x="{(PAD + width) / 2}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>')
    if ylabel:
        out.append(f'<text x="12" y="{(top + bottom) / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 12 {(top + bottom) / 2})">{html.escape(ylabel)}</text>')
    return out


def line_chart_svg(series: dict[str, list[tuple]], *, hlines: list[tuple[str, float]] = (), title: str = "",
                   xlabel: str = "step", ylabel: str = "", width: int = W, height: int = H,
                   legend: bool = False) -> str:
    """An SVG line chart (a string; standalone as a file or inline in HTML). ``series``: name ->
    [(x, y)] or [(x, mean, std)] (then a mean ± std band); ``hlines``: (label, y) reference lines,
    dashed; ``legend``: draw the series' and lines' names inside the chart (else leave them to the
    page). Empty series are left out; "" when none is left."""
    data = {k: list(s) for k, s in series.items() if s}
    if not data:
        return ""
    xs = [p[0] for s in data.values() for p in s]
    ys = ([p[1] + sgn * (p[2] if len(p) > 2 else 0) for s in data.values() for p in s for sgn in (1, -1)]
          + [y for _, y in hlines])
    lo, hi = _y_range(ys)
    dashes = ["6,3", "2,2", "8,3,2,3", "1,3"]
    items = [(k, COLORS[c % len(COLORS)], "") for c, k in enumerate(data)]
    items += [(label, "#555", dashes[i % len(dashes)]) for i, (label, _) in enumerate(hlines)]
    top = 10 + (18 if title else 0) + (14 * len(items) + 4 if legend else 0)
    bottom = height - 22 - (14 if xlabel and legend else 0)
    x_of, y_of = _scale(min(xs), max(xs), PAD, width - 10), _scale(lo, hi, bottom, top)
    out = _frame_svg(width, height, top, bottom, (min(xs), max(xs), lo, hi), title, xlabel, ylabel, legend)
    if legend:
        out += _legend_svg(items, PAD + 8, top - 14 * len(items) + 6)
    out += [_hline_svg(label, y, d, PAD, width - 10, y_of) for (label, y), (_, _, d) in zip(hlines, items[len(data):])]
    for (key, pts), (_, color, _) in zip(data.items(), items):
        out += _series_svg(key, pts, color, x_of, y_of, xlabel)
    return "".join(out) + "</svg>"


def chart(title: str, metrics: list[dict], keys: list[str]) -> str:
    """One inline SVG chart of the metrics ``keys`` against the step, its legend in the caption."""
    data = {k: s for k in keys if (s := series(metrics, k))}
    if not data:
        return ""
    legend = " ".join(f'<span style="color:{COLORS[c % len(COLORS)]}">■ {k}</span>' for c, k in enumerate(data))
    return (f'<figure><figcaption>{html.escape(title)}<br><small>{legend}</small></figcaption>'
            f"{line_chart_svg(data).replace(' ' + XMLNS, '', 1)}</figure>")


def png_from_svg(svg_path: str, png_path: str, width: int, height: int) -> bool:
    """Render an SVG file to PNG with headless Chromium (Debian's ``chromium``); False when there is
    none (or it failed)."""
    import shutil
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        return False
    got = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          f"--screenshot={os.path.abspath(png_path)}", f"--window-size={width},{height}",
                          "file://" + os.path.abspath(svg_path)], check=False, capture_output=True, timeout=120)
    return got.returncode == 0 and os.path.exists(png_path)


def curves(metrics: list[dict]) -> str:
    figs = "".join(chart(title, metrics, keys) for title, keys in CHARTS)
    return f'<h2>Learning curves</h2><div class="charts">{figs}</div>' if figs else ""


def credit_scale(samples: list[dict]) -> float:
    """The advantage that gets the full colour: the 95th percentile of |advantage| over all tokens."""
    mags = sorted(abs(a) for s in samples for a in s["advantage"] if a is not None)
    return max(mags[int(0.95 * (len(mags) - 1))], 1e-6) if mags else 1.0


def color(adv: float | None, scale: float) -> str:
    """Diverging: red (pushed down) through white (0) to blue (pushed up)."""
    t = max(-1.0, min(1.0, (adv or 0.0) / scale))
    r, g, b = (214, 39, 40) if t < 0 else (31, 119, 180)
    mix = lambda c: round(255 + (c - 255) * abs(t))
    return f"rgb({mix(r)},{mix(g)},{mix(b)})"


def tokens_html(s: dict, scale: float) -> str:
    """The response's tokens as spans coloured by advantage; hover: the token's log-probs."""
    spans = []
    teacher = s.get("teacher_lp") or [None] * len(s["tokens"])
    for tok, ls, lt, a in zip(s["tokens"], s["student_lp"], teacher, s["advantage"]):
        tip = f"student {_fmt(ls)}  teacher {_fmt(lt)}  advantage {_fmt(a)}"
        spans.append(f'<span class="tok" style="background:{color(a, scale)}" title="{html.escape(tip)}">'
                     f"{html.escape(tok)}</span>")
    more = s.get("n_tokens", len(s["tokens"])) - len(s["tokens"])
    return "".join(spans) + (f'<span class="more"> … {more} more tokens</span>' if more > 0 else "")


def sample_html(s: dict, scale: float) -> str:
    verdict = "correct" if s.get("correct") else "wrong"
    head = (f'step {s["step"]} · sample {s.get("sample", "?")} · <b class="{verdict}">{html.escape(s["status"])}</b>'
            f' · score {_fmt(s.get("score"))} · {s.get("n_tokens", len(s["tokens"]))} tokens'
            + ("" if s.get("teacher_lp") else " · no teacher signal"))
    unseen = " (not in the teacher context)" if s.get("critique_in_context") is False else ""
    side = f'<div class="label">critique{unseen}</div><pre>{html.escape(s.get("critique") or "(none)")}</pre>'
    if s.get("demonstration"):
        side += f'<div class="label">demonstration</div><pre>{html.escape(s["demonstration"])}</pre>'
    return (f'<div class="sample" data-step="{s["step"]}" data-correct="{int(bool(s.get("correct")))}">'
            f'<div class="head">{head}</div><div class="body"><div class="main">'
            f'<div class="label">prompt</div><pre class="prompt">{html.escape(s["prompt"])}</pre>'
            f'<div class="label">response</div><div class="response">{tokens_html(s, scale)}</div></div>'
            f'<div class="side">{side}</div></div></div>')


FILTER_JS = """
function applyFilters() {
  var v = document.getElementById('f-verdict').value, s = document.getElementById('f-step').value, n = 0;
  document.querySelectorAll('.sample').forEach(function (e) {
    var show = (v === 'all' || e.dataset.correct === (v === 'correct' ? '1' : '0')) &&
               (s === 'all' || e.dataset.step === s);
    e.style.display = show ? '' : 'none';
    if (show) n++;
  });
  document.getElementById('f-count').textContent = n + ' shown';
}
document.querySelectorAll('select').forEach(function (e) { e.addEventListener('change', applyFilters); });
applyFilters();
"""


def credit(samples: list[dict]) -> str:
    """The token-credit view: a legend, the filters and every sample."""
    if not samples:
        return ("<h2>Token credit</h2><p>No samples.jsonl in this directory: train with run.samples_every &gt; 0 "
                "to see which tokens the self-teacher blamed.</p>")
    scale = credit_scale(samples)
    steps = sorted({s["step"] for s in samples})
    legend = (f'<span class="legend">{_fmt(-scale)} pushed down <span class="bar"></span> pushed up '
              f'{_fmt(scale)}</span>')
    filters = ('<select id="f-verdict"><option value="all">all samples</option><option value="correct">correct</option>'
               '<option value="wrong">wrong</option></select> <select id="f-step"><option value="all">all steps</option>'
               + "".join(f'<option value="{k}">step {k}</option>' for k in steps) + '</select> <span id="f-count"></span>')
    return (f'<h2>Token credit</h2><p>Each token coloured by the advantage it got {legend}; hover a token for '
            f'its log-probs.</p><p class="filters">{filters}</p>'
            + "".join(sample_html(s, scale) for s in samples) + f"<script>{FILTER_JS}</script>")


def diagnose_table(report: dict) -> str:
    """``agentopd diagnose teacher``'s report: one row per figure, one column per context kind."""
    kinds = list(report.get("contexts", {}))
    keys = list(report["contexts"][kinds[0]]) if kinds else []
    head = "".join(f"<th>{html.escape(k)}</th>" for k in kinds)
    body = "".join(f"<tr><td>{html.escape(k)}</td>" + "".join(
        f"<td>{_fmt(report['contexts'][c].get(k))}</td>" for c in kinds) + "</tr>" for k in keys)
    return (f"<h2>Can the self-teacher teach? (agentopd diagnose teacher)</h2><p>student pass@1 "
            f"{_fmt(report.get('student_pass1'))} on {report.get('problems')} held-out problems × "
            f"{report.get('group_size')} samples ({html.escape(str(report.get('model')))})</p>"
            f'<table class="diag"><tr><th>figure</th>{head}</tr>{body}</table>')


def pass_after_turn(rlef: dict) -> list[float]:
    """The held-out pass rate after each turn: the summary's, else counted over the judged attempts."""
    got = rlef["summary"].get("pass_after_turn")
    rows = [r for r in rlef["rows"] if not r.get("judge_error") and r.get("passed_after_turn")]
    if got or not rows:
        return list(got or [])
    return [sum(r["passed_after_turn"][t] for r in rows) / len(rows) for t in range(len(rows[0]["passed_after_turn"]))]


def turn_html(row: dict, t: int) -> str:
    """Turn ``t`` of an attempt: the answer, its verdicts and the critique that followed it."""
    turn, last = row["transcript"][t], t == len(row["transcript"]) - 1
    passed = turn.get("held_out") == "ok"
    if turn.get("public") == "ok":
        note = "public tests pass: the attempt ends"
    else:
        note = "critique (the last turn: not sent)" if last else "critique (sent back for the next turn)"
    attempt = f'{row.get("task_id")}/{row.get("sample_index")}'
    return (f'<div class="turn" data-attempt="{html.escape(attempt)}" data-passed="{int(passed)}">'
            f'<div class="head">turn {t + 1} · public tests {html.escape(str(turn.get("public")))} · held-out '
            f'<b class="{"correct" if passed else "wrong"}">{"passed" if passed else "failed"}</b></div>'
            f'<div class="body"><div class="main"><div class="label">answer</div><pre>{html.escape(turn.get("response") or "")}'
            f'</pre></div><div class="side"><div class="label">{note}</div>'
            f'<pre>{html.escape(turn.get("critique") or "(none)")}</pre></div></div></div>')


def attempt_html(row: dict) -> str:
    passed = bool(row.get("passed"))
    head = (f'{html.escape(str(row.get("task_id")))} · attempt {row.get("sample_index", "?")} · '
            f'<b class="{"correct" if passed else "wrong"}">{html.escape(str(row.get("result", "")))}</b> · '
            f'{len(row["transcript"])} turn(s)')
    return (f'<div class="sample attempt" data-correct="{int(passed)}"><div class="head">{head}</div>'
            + "".join(turn_html(row, t) for t in range(len(row["transcript"]))) + "</div>")


def rlef_html(rlef: dict) -> str:
    """``agentopd rlef``'s run: the pass rate per turn (a chart and the summary) and every attempt, a block per turn."""
    rates, summ = pass_after_turn(rlef), rlef["summary"]
    table = "".join(f"<tr><td>pass rate after turn {t + 1}</td><td>{_fmt(v)}</td></tr>" for t, v in enumerate(rates))
    table += "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in summ.items()
                     if "@" in k or k in ("mean_turns", "problems", "attempts", "judge_errors", "model", "dataset"))
    fig = line_chart_svg({"pass_after_turn": [(t + 1, v) for t, v in enumerate(rates) if _finite(v)]}, xlabel="turn")
    fig = fig.replace(" " + XMLNS, "", 1)
    return (f"<h2>In-context RLEF (agentopd rlef)</h2><p>Held-out pass rate after each turn (an attempt that "
            f"ended earlier keeps its last answer).</p><div class=\"charts\"><figure><figcaption>held-out pass rate "
            f'after turn</figcaption>{fig}</figure><table class="diag">{table}</table></div>'
            f"<h2>Attempts ({len(rlef['rows'])})</h2><p>One block per turn: the answer, its verdicts, and the "
            "public tests' critique that followed it.</p>" + "".join(attempt_html(r) for r in rlef["rows"]))


CSS = """
body { font: 14px system-ui, sans-serif; margin: 20px; color: #222; max-width: 1160px; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.charts { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; } figcaption { font-size: 13px; font-weight: 600; }
svg text { font-size: 10px; fill: #555; } .axis { stroke: #999; }
.sample { border: 1px solid #ddd; border-radius: 4px; margin: 10px 0; padding: 8px; }
.head { font-size: 13px; color: #555; margin-bottom: 4px; } .correct { color: #2ca02c; } .wrong { color: #d62728; }
.body { display: flex; gap: 14px; } .main { flex: 3; min-width: 0; } .side { flex: 2; min-width: 0; }
.label { font-size: 11px; text-transform: uppercase; color: #888; margin-top: 4px; }
pre { white-space: pre-wrap; margin: 2px 0; font: 12px ui-monospace, monospace; background: #f7f7f7; padding: 4px; }
.prompt { color: #555; }
.turn { border-left: 3px solid #ddd; margin: 6px 0 6px 6px; padding-left: 8px; }
.response { white-space: pre-wrap; font: 13px/1.7 ui-monospace, monospace; }
.tok { border-right: 1px solid #fff; } .tok:hover { outline: 1px solid #000; } .more { color: #888; }
.bar { display: inline-block; width: 120px; height: 10px; vertical-align: middle;
       background: linear-gradient(to right, rgb(214,39,40), #fff, rgb(31,119,180)); border: 1px solid #ccc; }
table.diag { border-collapse: collapse; } .diag td, .diag th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
.diag td:first-child, .diag th:first-child { text-align: left; }
"""


def page(run_dir: str, data: dict) -> str:
    """The whole HTML page."""
    parts = [curves(data["metrics"])]
    if data["diagnose"] is not None:
        parts.append(diagnose_table(data["diagnose"]))
    if data["rlef"] is not None:
        parts.append(rlef_html(data["rlef"]))
    if data["metrics"]:
        parts.append(credit(data["samples"]))
    steps = [r["step"] for r in data["metrics"] if "step" in r]
    sub = f"{max(steps)} steps, {len(data['samples'])} sampled responses · " if steps else ""
    if data["rlef"] is not None:
        sub += f"{len(data['rlef']['rows'])} RLEF attempts · "
    title = html.escape(os.path.basename(os.path.abspath(run_dir)))
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>agentopd report: {title}</title>'
            f"<style>{CSS}</style></head><body><h1>agentopd report: {title}</h1>"
            f"<p>{sub}{html.escape(run_dir)}</p>"
            + "".join(parts) + "</body></html>")


def write(run_dir: str, out: str | None = None) -> str:
    """Write the report of ``run_dir`` to ``out`` (default ``<run_dir>/report.html``); returns its path."""
    data = load(run_dir)
    out = out or os.path.join(run_dir, "report.html")
    with open(out, "w", encoding="utf-8") as f:
        f.write(page(run_dir, data))
    return out
