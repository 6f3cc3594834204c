"""`blitext report`: the page holds the table, verdicts, captions beside their images, per-class accuracy and
curves; a real headless Chromium (Debian's, which `make test` installs) opens it, takes a screenshot, and
counts the images that loaded and reads the table, through the browser rather than from the HTML text.

The runs are folders as `blitext eval` writes them (eval/<task>-<data>/metrics.json and predictions.json,
metrics.jsonl), built here around real PNG images of coloured shapes."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from blitext.cli.main import app
from blitext.errors import BlitextError
from blitext.evaluation.report import ReportConfig, caption_classes, read_budget, write_report
from blitext.plot import plot_keys, read_records

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 60)}
SHAPES = ("circle", "rectangle")


def make_data(folder):
    """Six test images, one per colour x shape, with their captions in LAVIS JSON."""
    (folder / "images").mkdir(parents=True)
    entries = []
    for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        image = Image.new("RGB", (64, 64), "white")
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)((12, 12, 52, 52), fill=COLOURS[colour])
        image.save(folder / "images" / f"{i}.png")
        entries.append({"image": f"images/{i}.png", "caption": [f"a {colour} {shape}"], "image_id": i})
    (folder / "captions_test.json").write_text(json.dumps(entries))
    return folder / "captions_test.json", entries


def make_run(folder, data, entries, wrong: set[int], lm_start: float, vqa: float, temp: float):
    """A stage-2 run as `eval caption` and `eval vqa` leave it: captions wrong for the ids in `wrong`."""
    cap = folder / "eval" / "caption-captions_test"
    cap.mkdir(parents=True)
    predictions = [{"image_id": e["image_id"], "caption": "a blue circle" if e["image_id"] in wrong else e["caption"][0]}
                   for e in entries]
    (cap / "predictions.json").write_text(json.dumps(predictions))
    exact = 1 - len(wrong) / len(entries)
    (cap / "metrics.json").write_text(json.dumps({"task": "caption", "eval": "caption-captions_test", "data": str(data),
                                                  "metrics": {"exact_match": exact, "CIDEr": 5 * exact}}))
    qa = folder / "eval" / "vqa-questions"
    qa.mkdir(parents=True)
    (qa / "metrics.json").write_text(json.dumps({
        "task": "vqa", "eval": "vqa-questions", "metrics": {"accuracy": vqa},
        "text_ceiling": {"metrics": {"accuracy": 37.5}}, "base_rate": {"accuracy": 44.2},
        "ceiling_verdict": {"near_floor": True, "line": "the LLM cannot answer these questions even from the caption"}}))
    with open(folder / "metrics.jsonl", "w") as log:
        for step in range(20):  # temp: stage 2 does not train it, so each run's is flat (at its own stage 1's value)
            log.write(json.dumps({"step": step, "loss": lm_start / (step + 1), "lm": lm_start / (step + 1),
                                  "temp": temp, "pairs_per_s": 10.0}) + "\n")
    return folder


@pytest.fixture
def runs(tmp_path):
    data, entries = make_data(tmp_path / "data")
    base = make_run(tmp_path / "runs" / "baseline-stage2", data, entries, wrong={1, 4}, lm_start=8.5, vqa=40.0,
                    temp=0.0741)
    pformer = make_run(tmp_path / "runs" / "pformer-stage2", data, entries, wrong={4}, lm_start=0.9, vqa=48.3, temp=0.0711)
    (tmp_path / "runs" / "budget.json").write_text(json.dumps(
        {"metric": "exact match", "runs": {"baseline": {"50": 0.2, "100": 0.6}, "pformer": [[50, 0.3], [100, 0.7]]}}))
    return [base, pformer]


def test_report_holds_every_section(runs, tmp_path):
    out = write_report(ReportConfig(runs=[str(r) for r in runs], out=str(tmp_path / "report.html")))
    page = out.read_text()
    for heading in ("Comparison", "Verdicts", "Test images", "Exact match per class", "Loss curves", "Budget curve"):
        assert f"<h2>{heading}" in page, heading
    assert "caption-captions_test, exact match: baseline-stage2 0.6667 vs pformer-stage2 0.8333 (best: pformer-stage2)" in page
    assert "the LLM cannot answer these questions even from the caption" in page
    assert "LM loss at the start of training" in page and "baseline-stage2 3.88 vs pformer-stage2 0.41" in page
    # 6 thumbnails + curves + budget, all inline: the page needs no other file
    assert page.count('src="data:image/png;base64,') == 8 and 'src="http' not in page and 'src="/' not in page
    # image 1 (a red rectangle) is wrong for the baseline only; image 4 (a green circle) for both
    assert page.count('class="wrong"') == 3 and page.count('class="right"') == 9
    assert "✗ <b>baseline-stage2</b>: a blue circle" in page


def test_per_class_accuracy_follows_the_caption_template():
    kinds = caption_classes(["a red circle", "a blue circle", "a red square", "a blue square"] * 2)
    assert set(kinds) == {"word 2", "word 3", "combination"} and kinds["word 2"][:2] == ["red", "blue"]
    assert caption_classes(["a dog runs on the grass", "two cats sleep", "a man rides a bike"]) is None


def test_budget_json_is_read_loosely(tmp_path):
    path = tmp_path / "budget.json"
    path.write_text(json.dumps({"a": {"200": 0.9, "50": 0.4}, "b": [[50, 0.5]]}))
    assert read_budget(path) == ("metric by steps", {"a": [(50.0, 0.4), (200.0, 0.9)], "b": [(50.0, 0.5)]})
    path.write_text(json.dumps({"a": "many"}))
    with pytest.raises(BlitextError, match="not steps -> numbers"):
        read_budget(path)


def test_constant_series_get_no_panel(runs):
    records = {r.name: read_records(r / "metrics.jsonl") for r in runs}
    # temp is flat in each run (0.0741 in one, 0.0711 in the other, as in the demo): two flat lines say
    # nothing, so no panel; rates are off by default
    assert plot_keys(records, None) == ["loss", "lm"]
    assert plot_keys(records, ["temp"]) == ["temp"]   # asked for, drawn


def test_report_command(runs, tmp_path):
    out = tmp_path / f"report-{'x' * 80}.html"  # longer than the 80 columns a pipe gets
    result = CliRunner().invoke(app, ["report", *map(str, runs), "--out", str(out), "--labels", "baseline,pformer"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output.splitlines(), result.output  # one line to copy, never folded
    assert "<th>pformer</th>" in out.read_text()
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output


# What the browser reports once the page has loaded: written into the DOM that --dump-dom prints.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const probe = {images: images.length, loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
                 table: document.querySelector("table").innerText,
                 wrong: document.querySelectorAll(".wrong").length};
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(probe);
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
    pytest.skip("chromium is not installed (`make test` installs it; CI must)")


def headless(browser: str, profile, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run on a profile of its own (a shared default profile can be locked, and then
    Chromium waits for it)."""
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def test_the_page_renders_in_a_real_browser(runs, tmp_path):
    browser = chromium()
    report = write_report(ReportConfig(runs=[str(r) for r in runs], out=str(tmp_path / "report.html")))
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    shot = tmp_path / "shot.png"
    headless(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri())
    with Image.open(shot) as image:  # a real picture of the page, not a blank one
        assert image.size == (1280, 2400) and len(image.convert("RGB").getcolors(1 << 20) or []) > 50
    dom = headless(browser, tmp_path / "profile", "--dump-dom", "--virtual-time-budget=10000", probed.as_uri()).stdout
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom)
    assert match, dom[-2000:]
    probe = json.loads(match.group(1).replace("&quot;", '"'))
    assert probe["images"] == 8 and probe["loaded"] == 8, probe  # thumbnails, curves, budget: all decoded
    assert "exact_match" in probe["table"] and "pformer-stage2" in probe["table"] and "0.8333" in probe["table"]
    assert probe["wrong"] == 3
