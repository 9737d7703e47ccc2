"""``agentopd report RUN_DIR``: one self-contained HTML page of a run, for any browser, offline.

From ``metrics.jsonl``: the learning curves (inline SVG). From ``samples.jsonl`` (agentopd.samples):
each sampled response with its tokens coloured by the advantage they got (blue: pushed up, red:
pushed down), the critique beside it, the token's log-probs on hover, and filters by verdict and by
step (a few lines of inline JS). From ``diagnose.json`` (``agentopd diagnose teacher``): its table.
Nothing is fetched: no external script, style sheet, font or image.
"""
from __future__ import annotations

import html
import json
import math
import os

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


class ReportError(Exception):
    """A run directory the report cannot be made from."""


def _jsonl(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: {e}") from None


def load(run_dir: str) -> dict:
    """The run's metrics rows, sample rows and diagnose report (each empty/None when absent)."""
    if not os.path.isdir(run_dir):
        raise ReportError(f"{run_dir}: no such directory")
    path = lambda name: os.path.join(run_dir, name)
    metrics = _jsonl(path("metrics.jsonl")) if os.path.exists(path("metrics.jsonl")) else []
    diag = None
    if os.path.exists(path("diagnose.json")):
        try:
            with open(path("diagnose.json"), encoding="utf-8") as f:
                diag = json.load(f)
        except (OSError, ValueError) as e:
            raise ReportError(f"{path('diagnose.json')}: {e}") from None
    if not metrics and diag is None:
        raise ReportError(f"{run_dir}: no metrics.jsonl or diagnose.json (not a run or diagnose directory)")
    samples = _jsonl(path("samples.jsonl")) if os.path.exists(path("samples.jsonl")) else []
    return {"metrics": metrics, "samples": samples, "diagnose": diag}


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


def chart(title: str, metrics: list[dict], keys: list[str]) -> str:
    """One inline SVG chart: a polyline and a point (hover: its value) per metric of ``keys``."""
    data = {k: s for k in keys if (s := series(metrics, k))}
    if not data:
        return ""
    xs = [x for s in data.values() for x, _ in s]
    ys = [y for s in data.values() for _, y in s]
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-9:  # a flat curve: drawn in the middle of a small range around its value
        lo, hi = lo - max(abs(lo) * 0.1, 0.05), hi + max(abs(hi) * 0.1, 0.05)
    x_of = _scale(min(xs), max(xs), PAD, W - 10)
    y_of = _scale(lo, hi, H - 22, 10)
    out = [f'<svg class="chart" width="{W}" height="{H}" viewBox="0 0 {W} {H}">',
           f'<line x1="{PAD}" y1="{H - 22}" x2="{W - 10}" y2="{H - 22}" class="axis"/>',
           f'<line x1="{PAD}" y1="10" x2="{PAD}" y2="{H - 22}" class="axis"/>',
           f'<text x="{PAD - 4}" y="14" text-anchor="end">{_fmt(hi)}</text>',
           f'<text x="{PAD - 4}" y="{H - 22}" text-anchor="end">{_fmt(lo)}</text>',
           f'<text x="{PAD}" y="{H - 6}">step {_fmt(min(xs))}</text>',
           f'<text x="{W - 10}" y="{H - 6}" text-anchor="end">{_fmt(max(xs))}</text>']
    for c, (key, pts) in enumerate(data.items()):
        color = COLORS[c % len(COLORS)]
        xy = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in pts)
        out.append(f'<g class="series" data-key="{key}" data-n="{len(pts)}" stroke="{color}" fill="{color}">'
                   f'<polyline points="{xy}" fill="none" stroke-width="1.5"/>')
        out += [f'<circle class="pt" cx="{x_of(x):.1f}" cy="{y_of(y):.1f}" r="2.5">'
                f'<title>step {x}: {key} = {_fmt(y)}</title></circle>' for x, y in pts]
        out.append("</g>")
    out.append("</svg>")
    legend = " ".join(f'<span style="color:{COLORS[c % len(COLORS)]}">■ {k}</span>' for c, k in enumerate(data))
    return f'<figure><figcaption>{html.escape(title)}<br><small>{legend}</small></figcaption>{"".join(out)}</figure>'


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
    if data["metrics"]:
        parts.append(credit(data["samples"]))
    steps = [r["step"] for r in data["metrics"] if "step" in r]
    sub = f"{max(steps)} steps, {len(data['samples'])} sampled responses · " if steps else ""
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
