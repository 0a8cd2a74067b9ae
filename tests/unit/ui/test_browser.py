"""The web UI in headless Chromium, end to end on a tiny model: a lint error for a broken file, fixed; a 4-step run
followed until its loss plot has points; a streamed chat with the tuned run; an evaluation report; an export with
its gate lines; a server with its snippets; a reload and a second tab still showing the run. No JavaScript error
in the console at any point. Screenshots of each tab go to $AYAR_UI_SCREENSHOTS (default: the test's tmp folder);
$AYAR_UI_MODEL=default runs it on the real default model (`make ui-screenshots`: the README's pictures).

Chromium and chromedriver come from Debian's packages (scripts/install-browser.sh, which `make test` runs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ayar.netutil import free_port
from tests.helpers import save_tiny

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="Chromium/chromedriver not installed (scripts/install-browser.sh installs them as root or on CI)",
)
# `make ui-screenshots` runs this test on the real default model for the README's pictures
MODEL = os.environ.get("AYAR_UI_MODEL", "tiny")
GOOD = [
    {"instruction": f"What is {a} plus {b}?", "output": f"{a} plus {b} is {a + b}."}
    for a in range(3, 9)
    for b in (2, 5)
]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def ui(tmp_path):
    """`ayar ui` on 127.0.0.1 in a working folder holding a tiny model and a data file with one broken row."""
    save_tiny(tmp_path / "tiny")
    _jsonl(tmp_path / "data.jsonl", [*GOOD[:5], {"instruction": "Say hi", "output": ""}, *GOOD[5:]])
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(tmp_path / "ui.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ayar", "ui", "--port", str(port)], cwd=tmp_path, stdout=log, stderr=log, env=env
    )
    url = f"http://127.0.0.1:{port}/"
    import httpx

    for _ in range(120):
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "ui.log").read_text()
    yield url, tmp_path
    proc.terminate()
    proc.wait(30)
    subprocess.run([sys.executable, "-c", _STOP_JOBS, str(tmp_path / "runs")], check=False)


_STOP_JOBS = (
    "import sys; from ayar.ui.jobs import Jobs; Jobs(sys.argv[1] + '/.ayar-ui').stop_all(('serve', 'eval', 'export'))"
)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


# what gradio's client logs as errors when the page is navigated away from (a reload) with a stream still open (its
# stream's close() aborting the fetch: "AbortError: signal is aborted without reason", seen once in a fresh clone)
LEAVING = ("BodyStreamBuffer was aborted", "Connection errored out", "signal is aborted without reason")


def test_the_whole_loop_in_a_browser(ui, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, folder = ui
    shots = Path(os.environ.get("AYAR_UI_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    d, errors = browser, []
    wait = WebDriverWait(d, 240, poll_frequency=0.25)

    left = []  # set once the walk navigates away: the page left behind aborts its open streams

    def console():  # every console entry so far: errors are kept to fail the test at the end
        for e in d.get_log("browser"):
            if e["level"] == "SEVERE" and not (left and any(m in e["message"] for m in LEAVING)):
                errors.append(e)

    def field(eid):
        return wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#{eid} textarea, #{eid} input"))

    def type_into(eid, text):
        el = field(eid)
        el.clear()
        el.send_keys(text)

    def text(eid):
        return d.find_element(By.ID, eid).text

    def value(eid):
        return field(eid).get_attribute("value")

    def tab(name):
        wait.until(lambda d: d.find_element(By.XPATH, f"//button[@role='tab' and normalize-space()='{name}']")).click()
        console()

    def shot(name):  # the whole page, not just the window
        height = d.execute_script(
            "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight,"
            " document.querySelector('.gradio-container')?.scrollHeight || 0)"
        )
        d.set_window_size(1400, min(max(height, 1100), 4000))
        time.sleep(1.5)  # the plots redraw after a resize
        if d.find_elements(By.CSS_SELECTOR, "#loss-plot g.mark-line path"):
            until("the plot redrawn", lambda: d.find_elements(By.CSS_SELECTOR, "#loss-plot g.mark-line path"))
        d.save_screenshot(str(shots / name))
        d.set_window_size(1400, 1100)

    def until(what, predicate):
        try:
            wait.until(lambda d: predicate())
        except Exception:
            d.save_screenshot(str(tmp_path / "failure.png"))  # beside the logs, never into docs/
            logs = "\n".join(p.read_text()[-3000:] for p in (folder / "runs" / ".ayar-ui").glob("*.log"))
            raise AssertionError(f"waiting for {what}; job logs:\n{logs}") from None

    d.get(url)
    # --- Train: a broken row is named; fixed, the checks pass; a 4-step run starts -------------------------
    type_into("model", MODEL)
    type_into("data", "data.jsonl")
    type_into("max-steps", "4")
    d.find_element(By.ID, "check").click()
    until("the lint error", lambda: "Cannot train yet" in text("check-result"))
    assert "data.jsonl:6" in text("check-result") and "empty" in text("check-result"), text("check-result")
    _jsonl(folder / "data.jsonl", GOOD)
    d.find_element(By.ID, "check").click()
    until("the checks to pass", lambda: "Ready to train" in text("check-result"))
    assert "fits:" in value("plan") and "alpaca" in text("check-result")
    until("the preview", lambda: d.find_elements(By.CSS_SELECTOR, "#preview span.t"))  # trained tokens highlighted
    assert "model:" in d.find_element(By.ID, "yaml").text
    shot("ui-train.png")
    d.find_element(By.ID, "start").click()
    until("the run to start", lambda: "Started" in text("start-result"))
    run_name = text("start-result").split("Started ")[1].split(":")[0].strip()

    # --- Runs: progress and the loss plot, live -----------------------------------------------------------
    tab("Runs")
    until("the loss plot to show points", lambda: d.find_elements(By.CSS_SELECTOR, "#loss-plot g.mark-line path"))
    until("the run to complete", lambda: "completed" in text("run-progress"))
    assert run_name in text("run-progress") and "step 4 of 4" in text("run-progress"), text("run-progress")
    time.sleep(2.5)  # one more refresh: the plot with all four steps
    lines = "#loss-plot g.mark-line path"
    until(
        "the finished run's loss line",
        lambda: any(p.get_attribute("d").count("L") >= 3 for p in d.find_elements(By.CSS_SELECTOR, lines)),
    )
    shot("ui-runs.png")

    # --- Chat: the tuned run beside its base, streamed ------------------------------------------------------
    tab("Chat")
    until("the run in the chat picker", lambda: run_name in value("chat-left-pick"))
    type_into("chat-input", "What is 3 plus 2?")
    d.find_element(By.ID, "chat-send").click()
    until("the answers", lambda: "answered in" in text("chat-message"))
    answers = [e.text.strip() for e in d.find_elements(By.CSS_SELECTOR, "#chat-left .bot, #chat-right .bot")]
    assert len(answers) == 2 and all(answers), answers  # the run's and its base's, each shown
    assert "What is 3 plus 2?" in text("chat-left") and "What is 3 plus 2?" in text("chat-right")
    shot("ui-chat.png")

    # --- Evaluate: the report, from the run directory -----------------------------------------------------------
    tab("Evaluate")
    type_into("eval-data", "data.jsonl")
    type_into("eval-rows", "6")
    type_into("eval-tokens", "32")
    d.find_element(By.ID, "eval").click()
    until("the evaluation report", lambda: "eval: done" in text("eval-status") and "tuned" in text("eval-report"))
    shot("ui-evaluate.png")

    # --- Export & serve: the gate's lines; a server with its snippets ---------------------------------------------
    tab("Export & serve")
    d.find_element(By.ID, "export").click()
    until("the gate's lines", lambda: "gate passed" in value("gate"))
    assert "PASS" in value("gate"), value("gate")
    d.find_element(By.ID, "serve").click()
    until("the server", lambda: "serving" in text("serve-status") and "curl" in text("serve-status"))
    shot("ui-export.png")
    d.find_element(By.ID, "serve-stop").click()
    until("the server to stop", lambda: "stopped" in text("serve-status") or "serve: " in text("serve-status"))

    # --- state lives on disk: a reload and a second tab show the same run ----------------------------------------
    console()  # the walk's own entries, before the page is left
    left.append(True)
    for opened in ("reload", "second tab"):
        if opened == "second tab":
            d.switch_to.new_window("tab")
        d.get(url)
        tab("Runs")
        until(f"the run after a {opened}", lambda: run_name in text("runs-table") and "completed" in text("runs-table"))
        if opened == "reload":  # the picture of Runs from a fresh page
            until("the plot", lambda: d.find_elements(By.CSS_SELECTOR, lines))
            shot("ui-runs.png")
    console()
    assert not errors, f"JavaScript errors in the console: {errors}"
