"""``agentopd report``: built from a short real run on the tiny model, opened in a real headless
Chromium (Debian's ``chromium``): one coloured span per sampled response token, every curve with
all its points, nothing fetched from the network; a diagnose directory, a run without samples and
bad input."""
import html
import json
import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from agentopd import report
from agentopd.config import load
from agentopd.train import train

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package "
                                    "(apt-get install chromium; scripts/setup.sh installs it)")
# appended to a copy of the page: every resource the page asked for, failed ones included
PROBE = ("<script>window.addEventListener('load', function () { document.body.setAttribute('data-fetched', "
         "performance.getEntriesByType('resource').map(function (e) { return e.name; }).join(' ')); });</script>")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = load(str(ROOT / "configs" / "micro-sdpo.yaml"),
               [f"run.out={out}", "run.progress=false", "model.path=tiny", "env.id=agentopd/Math-v0", "env.kwargs.problems=arithmetic",
                "eval.problems=2", "eval.every=1", "eval.samples=1", "sampling.prompts_per_step=2",
                "sampling.group_size=2", "sampling.max_new_tokens=10", "run.steps=2", "run.samples_every=1",
                "run.samples_per_step=3", "run.samples_max_tokens=8", "run.checkpoint_every=0"])
    train(cfg)
    return out


def _chromium(*args) -> str:
    got = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND",
                          *args], check=False, capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr[-2000:]
    return got.stdout


class _Dom(HTMLParser):
    """The parts of the dumped DOM the tests read."""

    def __init__(self):
        super().__init__()
        self.tokens, self.series, self.body, self._key, self._count = 0, {}, {}, None, False
        self.count_text, self.attempts, self.turns = "", 0, {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        self.tokens += tag == "span" and "tok" in classes
        if tag == "g" and "series" in classes:
            self._key = a["data-key"]
            self.series[self._key] = 0
        if tag == "circle" and "pt" in classes:
            self.series[self._key] += 1
        if tag == "body":
            self.body = a
        self.attempts += tag == "div" and "attempt" in classes
        if tag == "div" and "turn" in classes:
            self.turns[a["data-attempt"]] = self.turns.get(a["data-attempt"], 0) + 1
        self._count = a.get("id") == "f-count"

    def handle_data(self, data):
        if self._count:
            self.count_text += data


def _dom(html_file: Path) -> _Dom:
    dom = _Dom()
    dom.feed(_chromium("--dump-dom", str(html_file)))
    return dom


def _probed(page: Path, extra: str = "") -> Path:
    copy = page.with_name("probed-" + page.name)
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", extra + PROBE + "</body>"), encoding="utf-8")
    return copy


@needs_chromium
def test_the_report_of_a_real_run_in_chromium(run_dir, tmp_path):
    page = Path(report.write(str(run_dir), str(tmp_path / "report.html")))
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and all(len(s["tokens"]) <= 8 for s in samples)
    # the config's teacher sees a wrong sample's critique only
    assert all(s["critique_in_context"] == (not s["correct"] and s["teacher_lp"] is not None) for s in samples)
    dom = _dom(_probed(page))
    assert dom.tokens == sum(len(s["tokens"]) for s in samples) > 0
    assert dom.count_text == f"{len(samples)} shown"  # the filter script ran
    def finite(v):
        return isinstance(v, (int, float)) and math.isfinite(v)

    drawn = {k for _, keys in report.CHARTS for k in keys if any(finite(r.get(k)) for r in metrics)}
    assert {"reward_mean", "heldout_pass1", "kl_teacher", "response_len", "time_update"} <= drawn
    assert dom.series == {k: sum(finite(r.get(k)) for r in metrics) for k in drawn}
    assert dom.series["heldout_pass1"] == 3  # before training and after each step
    assert dom.body.get("data-fetched") == ""  # nothing requested: no script, style, font or image
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    # the probe sees a request that fails (the network is mapped away)
    remote = _dom(_probed(page, '<img src="http://example.com/x.png">'))
    assert remote.body.get("data-fetched") == "http://example.com/x.png"
    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,1600", str(page))
    assert shot.stat().st_size > 10_000


@pytest.fixture(scope="module")
def rlef_dir(tmp_path_factory):
    from agentopd.eval.rlef import rlef

    out = tmp_path_factory.mktemp("rlef")
    rlef(load(str(ROOT / "configs" / "micro-rlef.yaml"),
              ["model.path=tiny", "env.kwargs.n=2", "eval.samples=2", "env.max_turns=2", "sampling.max_new_tokens=12",
               f"run.out={out}", "run.progress=false"]))
    return out


def test_the_report_of_an_rlef_run_has_a_block_per_turn(rlef_dir, tmp_path):
    rows = [json.loads(x) for x in (rlef_dir / "results.jsonl").read_text().splitlines()]
    summary = json.loads((rlef_dir / "summary.json").read_text())
    assert len(rows) == 4 and all(len(r["transcript"]) == r["turns"] for r in rows)
    got = subprocess.run([sys.executable, "-m", "agentopd.cli", "report", str(rlef_dir), "--out", str(tmp_path / "r.html")],
                         check=False, capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    page = tmp_path / "r.html"
    text = page.read_bytes().decode("utf-8")  # as written: read_text would turn a sampled "\r" into "\n"
    for t, v in enumerate(summary["pass_after_turn"]):
        assert f"<td>pass rate after turn {t + 1}</td><td>{report._fmt(v)}</td>" in text
    dom = _Dom()
    dom.feed(text)
    want = {f"{r['task_id']}/{r['sample_index']}": r["turns"] for r in rows}
    assert dom.attempts == 4 and dom.turns == want
    assert dom.series == {"pass_after_turn": 2}  # a point per turn
    for r in rows:
        for turn in r["transcript"]:
            assert html.escape(turn["response"]) in text and html.escape(turn["critique"]) in text
    assert text.count("critique (sent back for the next turn)") == sum(
        t["public"] != "ok" for r in rows for t in r["transcript"][:-1])
    if CHROMIUM:
        dom = _dom(_probed(page))
        assert dom.attempts == 4 and dom.turns == want and dom.body.get("data-fetched") == ""


def test_an_rlef_attempt_that_passes_ends_and_the_rates_are_counted_without_a_summary(tmp_path):
    turn = lambda r, pub, held, c: {"response": r, "public": pub, "held_out": held, "critique": c}
    rows = [{"task_id": "p", "sample_index": 0, "turns": 2, "passed": True, "result": "passed",
             "passed_after_turn": [False, True], "transcript": [turn("<1>", "fail", "fail", "expected 2"),
                                                                turn("2", "ok", "ok", "")]},
            {"task_id": "p", "sample_index": 1, "turns": 1, "passed": False, "result": "failed: fail",
             "passed_after_turn": [False, False], "transcript": [turn("3", "ok", "fail", "")]}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = Path(report.write(str(tmp_path))).read_text(encoding="utf-8")
    assert "<td>pass rate after turn 1</td><td>0</td>" in text and "<td>pass rate after turn 2</td><td>0.5</td>" in text
    assert text.count("public tests pass: the attempt ends") == 2 and "&lt;1&gt;" in text
    dom = _Dom()
    dom.feed(text)
    assert dom.turns == {"p/0": 2, "p/1": 1} and text.count('data-passed="1"') == 1


def test_a_diagnose_directory_and_a_run_without_samples(run_dir, tmp_path):
    diag = tmp_path / "diag"
    diag.mkdir()
    shutil.copy(ROOT / "bench" / "results" / "diagnose_math.json", diag / "diagnose.json")
    text = Path(report.write(str(diag))).read_text(encoding="utf-8")
    expected = json.loads((diag / "diagnose.json").read_text())
    assert "<table" in text and all(f"<th>{k}</th>" in text for k in expected["contexts"])
    assert "Learning curves" not in text
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", bare / "metrics.jsonl")
    text = Path(report.write(str(bare))).read_text(encoding="utf-8")
    assert "No samples.jsonl" in text and 'class="series"' in text


@pytest.mark.parametrize("what", ["missing", "empty", "garbled"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, what):
    d = tmp_path / "d"
    if what != "missing":
        d.mkdir()
    if what == "garbled":
        (d / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')
    got = subprocess.run([sys.executable, "-m", "agentopd.cli", "report", str(d)], check=False, capture_output=True, text=True)
    assert got.returncode == 2
    assert got.stderr.startswith("agentopd: error: ") and got.stderr.count("\n") == 1, got.stderr


# ------------------------------------------------------------------------------ the chart code, outside the report

SVG = "{http://www.w3.org/2000/svg}"


def _svg(text: str):
    import xml.etree.ElementTree as ET

    return ET.fromstring(text)  # standalone: well-formed XML in the SVG namespace


def test_line_chart_svg_draws_points_bands_and_reference_lines():
    svg = _svg(report.line_chart_svg({"a": [(0, 0.1, 0.02), (10, 0.3, 0.05), (20, 0.4, 0.0)], "b": [(0, 0.2), (20, 0.5)],
                                      "empty": []}, hlines=[("target", 0.45), ("rlef", 0.35)], title="t",
                                     xlabel="rollouts", width=720, height=480, legend=True))
    groups = {g.get("data-key"): g for g in svg.iter(SVG + "g") if g.get("class") == "series"}
    assert list(groups) == ["a", "b"]  # an empty series is left out
    assert [len(g.findall(SVG + "circle")) for g in groups.values()] == [3, 2]
    assert [len(g.findall(SVG + "polyline")) for g in groups.values()] == [1, 1]
    assert len(groups["a"].findall(SVG + "polygon")) == 1 and not groups["b"].findall(SVG + "polygon")
    band = groups["a"].find(SVG + "polygon").get("points").split()
    assert len(band) == 6  # mean + std out, mean - std back
    assert [g.get("data-label") for g in svg.iter(SVG + "g") if g.get("class") == "hline"] == ["target", "rlef"]
    texts = [t.text for t in svg.iter(SVG + "text")]
    assert {"a", "b", "target", "rlef", "t", "rollouts"} <= set(texts)
    # every drawn y lies inside the plot, the reference lines included
    ys = [float(c.get("cy")) for c in svg.iter(SVG + "circle")] + [float(xy.split(",")[1]) for xy in band]
    assert all(0 < y < 480 for y in ys)
    assert report.line_chart_svg({"a": []}) == ""


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_efficiency", ROOT / "bench" / "sample_efficiency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_benchmark_plot_is_the_report_chart(tmp_path):
    curves = {"grpo": [[(0, 0.3), (8, 0.4), (16, 0.5)], [(0, 0.3), (8, 0.2), (16, 0.45)]],
              "sd_token": [[(0, 0.3), (8, 0.5), (16, 0.6)], [(0, 0.3), (8, 0.45), (16, 0.7)]]}
    svg, png = tmp_path / "out.svg", tmp_path / "out.png"
    written = _bench().plot(curves, 0.4, str(svg), str(png), "math", [0.35, 0.38, 0.42])
    root = _svg(svg.read_text(encoding="utf-8"))
    groups = [g for g in root.iter(SVG + "g") if g.get("class") == "series"]
    assert [g.get("data-key") for g in groups] == ["grpo", "sd_token"]
    assert all(len(g.findall(SVG + "circle")) == 3 and len(g.findall(SVG + "polygon")) == 1 for g in groups)
    assert [g.get("data-label") for g in root.iter(SVG + "g") if g.get("class") == "hline"] == [
        "target", "RLEF in context, 1 turn(s)", "RLEF in context, 3 turn(s)"]
    if CHROMIUM:
        assert written == [str(svg), str(png)] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 5_000
    else:
        assert str(svg) in written
