"""``rloo report``: a finished tiny run's page in real headless Chromium with the network off, a 100k-step
run's time and size, damaged inputs, and escaped sample texts."""

from __future__ import annotations

import doctest
import io
import json
import math
import re
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rloo import train
from rloo.cli import main
from rloo.report import PLOT_FILES, last_step_rows, write_report
from test_train_e2e import tiny_config

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def test_plot_math_doctests():
    import rloo.plots

    assert doctest.testmod(rloo.plots).failed == 0


def open_offline(page: Path):
    """Headless Chromium with the network emulated off, the page loaded, the browser's console kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # --no-sandbox: tests run as root in containers, where Chromium's sandbox refuses to start.
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(180)  # a loaded CI machine: generous, and get() waits for the load event
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": True, "latency": 0,
                                                                     "downloadThroughput": 0, "uploadThroughput": 0})
        driver.get(page.resolve().as_uri())
    except BaseException:
        driver.quit()
        raise
    return driver


needs_chromium = pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                                    reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian's chromium and "
                                    "chromium-driver; .ci/run installs them)")


@needs_chromium
def test_finished_tiny_run_report_renders_offline_in_chromium(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(tiny_model_dir, run, max_steps=3))
    assert main(["report", str(run)]) == 0
    page = run / "report.html"
    assert capsys.readouterr().out.strip().endswith(str(page))
    text = page.read_text()
    assert not re.search(r"""\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text), "a network reference"
    assert "<script" not in text and str(run.parent) not in text  # no script, no local absolute path
    for name in ("reward", "kl", "completion_length"):
        assert (run / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    check_in_browser(page)


def check_in_browser(page: Path) -> None:
    """Offline in headless Chromium: every image loaded, no network reference, no console error, and a
    screenshot that is not blank."""
    from PIL import Image

    driver = open_offline(page)
    try:
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0]);")
        network = driver.execute_script("return document.querySelectorAll('[src^=http],[href^=http]').length;")
        severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        screenshot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    finally:
        driver.quit()
    assert images and all(ok for _, ok in images), images
    assert "reward (total)" in [alt for alt, _ in images]
    assert network == 0 and severe == []
    colors = screenshot.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, "a blank screenshot"


def write_long_run(run: Path, num_steps: int) -> None:
    run.mkdir()
    lines = []
    for step in range(1, num_steps + 1):
        reward = 1 - math.exp(-step / 20_000) + 0.1 * math.sin(step)
        lines.append(json.dumps({
            "step": step, "reward": reward, "reward_std": 0.3, "rewards/grounding": reward,
            "rewards/length": reward / 2,
            "kl": step / num_steps, "entropy": 6 - step / num_steps, "completion_length": 40 + math.cos(step),
            "frac_truncated": 0.1, "clip_ratio": 0.01, "grad_norm": 1.5 + math.sin(step / 7), "learning_rate": 1e-6,
            "episodes_per_s": 120.0, "step_seconds": 0.5, "time/generate": 0.3, "time/score": 0.01,
            "time/reference": 0.05, "time/update": 0.14, "loss": 0.0}))
        if step % 1000 == 0:
            lines.append(json.dumps({"step": step, "eval/reward": reward, "eval/reward_std": 0.2,
                                     "eval/rewards/grounding": reward, "eval/completion_length": 40.0,
                                     "eval/num_prompts": 64}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    rows = [{"step": step, "prompt": f"prompt {step}.{i}", "completion": f"completion {step}.{i}",
             "rewards": {"grounding": 0.5}, "reward": 0.5, "advantage": 0.0, "length": 3, "truncated": False}
            for step in (1, num_steps) for i in range(6)]
    (run / "completions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_100k_step_run_renders_in_seconds_to_a_small_page(tmp_path):
    run = tmp_path / "long"
    write_long_run(run, 100_000)
    start = time.perf_counter()
    written = write_report(run)
    seconds = time.perf_counter() - start
    size = (run / "report.html").stat().st_size
    assert seconds < 5, f"{seconds:.1f} s"
    assert size < 2_000_000, f"{size} bytes"
    names = {p.relative_to(run).as_posix() for p in written}
    assert {"plots/reward.png", "plots/eval_reward.png", "plots/timings.png"} <= names <= set(PLOT_FILES)
    text = (run / "report.html").read_text()
    assert "100000 logged" in text and "start: step 1" in text and "end: step 100000" in text
    assert "completion 100000.3" in text and "completion 100000.4" not in text  # four rows of the last step


def test_last_step_rows_reads_back_until_the_step_changes(tmp_path):
    path = tmp_path / "completions.jsonl"
    rows = [{"step": step, "completion": f"{step}.{i}"} for step in (1, 2, 2, 3) for i in range(3)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 3, "compl')  # a cut last line
    assert [r["completion"] for r in last_step_rows(path, chunk=40)] == ["3.0", "3.1", "3.2"]


class Checked(HTMLParser):
    """Parses a page and keeps its text, to check what a reader sees."""

    def __init__(self, page: str):
        super().__init__()
        self.text: list[str] = []
        self.feed(page)
        self.close()

    def handle_data(self, data):
        self.text.append(data)


def test_damaged_metrics_give_a_valid_page_and_bad_folders_one_line(tmp_path, capsys):
    pyplot_before = "matplotlib.pyplot" in sys.modules
    run = tmp_path / "damaged"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join([
        json.dumps({"step": 1, "reward": 0.1, "kl": None, "rewards/grounding": None, "time/generate": 0.2}),
        json.dumps({"step": 2, "reward": None, "kl": None, "note": "text", "flag": True}),
        '{"step": 2, "reward": 0.3, "kl": NaN}',  # a resumed run logs step 2 again: this line wins
        json.dumps({"step": 3, "reward": 0.9, "kl": None, "time/generate": 0.1, "time/update": 0.3}),
        "[1, 2]",
        '{"step": 4, "rew',  # cut short by a kill
    ]))
    written = write_report(run)
    assert sorted(p.name for p in written) == ["reward.png", "timings.png"]
    page = (run / "report.html").read_text()
    seen = " ".join(Checked(page).text)
    assert "3 logged (steps 1 to 3)" in seen and "0.1 at step 1 → 0.9 at step 3" in seen
    assert "No sample completions" in seen and "No config.yaml" in seen
    assert pyplot_before or "matplotlib.pyplot" not in sys.modules  # the object API only

    (run / "metrics.jsonl").write_text("")
    assert write_report(run) == [] and not (run / "plots" / "reward.png").exists()  # the stale plot removed
    assert "Nothing to plot" in (run / "report.html").read_text()

    for folder, problem in ((tmp_path / "missing", "not a folder"), (tmp_path, "no metrics.jsonl")):
        assert main(["report", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(folder) in err and problem in err, err


def test_before_after_samples_side_by_side_escaped_from_the_staged_eval_json(tmp_path):
    run, staged = tmp_path / "run", tmp_path / "staged"
    run.mkdir()
    staged.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    (run / "eval.json").write_text(json.dumps({"samples": []}))  # the old one: the staged file wins
    samples = [{"prompt": [{"role": "user", "content": "Say <b>hi</b> & go"}], "before": "plain before text",
                "after": "<script>alert('after')</script>", "reward_before": 0.25, "reward_after": None}]
    (staged / "eval.json").write_text(json.dumps({"reward_before": 0.25, "reward_after": 0.5, "gain": 0.25,
                                                  "gain_se": 0.1, "num_prompts": 1, "samples": samples}))
    (staged / "config.yaml").write_text("learning_rate: 1.0e-06\nreward_funcs: [grounding]\n")
    written = write_report(run, staged)
    assert [p.relative_to(staged).as_posix() for p in written] == ["plots/reward.png"]
    assert not (run / "report.html").exists()
    page = (staged / "report.html").read_text()
    assert "plain before text" in page and "&lt;script&gt;alert(&#x27;after&#x27;)&lt;/script&gt;" in page
    assert "<script" not in page and "Say &lt;b&gt;hi&lt;/b&gt; &amp; go" in page
    seen = " ".join(Checked(page).text)
    assert "before training" in seen and "after training" in seen and "0.25 before → 0.5 after" in seen
    assert "learning_rate" in seen and '["grounding"]' in seen
