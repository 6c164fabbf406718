"""The static site in a real headless Chromium: the ranking renders with the expected rows and plots,
hostile text (a defence named like a script, a generation holding one) shows as text and never
runs, and the browser logs no errors. Screenshots go to tests/artifacts/ for a person to look at.

Chromium comes from Debian (`apt-get install -y chromium chromium-driver`; CI's .ci/run does it).
Without it this test fails, saying so; HARNESS_SKIP_BROWSER=1 skips it on a machine without one.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import leaderboard_fixtures as lf
import pytest

from leaderboard.aggregate import build_board
from leaderboard.site import build_site

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1300,1600"]
ARTIFACTS = Path(__file__).parent / "artifacts"
HOSTILE_NAME = "<script>window.__pwned=1</script>x"
HOSTILE_ANSWER = '<script>window.__pwned=2</script><img src=x onerror="window.__pwned=3">'
HARM = {("none", "full-ft", 1): 0.9, ("none", "lora", 1): 0.8,
        ("repnoise", "full-ft", 1): 0.6, ("repnoise", "lora", 1): 0.3}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    runs = lf.grid(tmp_path_factory)
    root = tmp_path_factory.mktemp("site-board")

    def capability_and_judge(obj):
        if "undefended" in obj["results"]:
            lf.add_evaluation(obj, "capability", {"mean_acc": 0.39}, "defended")
            lf.add_evaluation(obj, "capability", {"mean_acc": 0.40}, "undefended")
            judge = obj["results"]["defended"]["post_attack"]["harmfulness"]["info"]["judges"]["refusal-keywords"]
            judge.update(accuracy=0.875, validation={"xstest": {"accuracy": 0.875, "n": 2250}})
            lf.set_over_refusal(0.12, 0.10)(obj)
            if obj["attack"]["name"] == "full-ft":  # the worst attack; two judges whose corrected rates disagree
                lf.set_corrected(obj, {"refusal-keywords": (0.62, 0.55, 0.70), lf.SECOND_JUDGE: (0.20, 0.10, 0.30)})

    lf.controlled_board(runs, root, HARM, capability_and_judge)

    def hostile(obj):
        lf.rename_defence(obj, HOSTILE_NAME)
        lf.set_harm(obj, 0.1)
        lf.set_fluency(obj, False)
        lf.set_fluency(obj, True, "defended")  # flagged: must sort last however low its harm

    results = lf.copy_run(lf.find_run(runs, "repnoise", "lora", 2), root, hostile, name="hostile-run")
    records = results.parent / json.loads(results.read_text())["results"]["defended"]["post_attack"][
        "harmfulness"]["records"]
    lines = records.read_text().splitlines()
    first = json.loads(lines[0])
    first["response"] = HOSTILE_ANSWER
    records.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    return build_site(build_board([root]), tmp_path_factory.mktemp("site") / "www")


def test_the_html_escapes_hostile_text(site):
    pages = "".join(p.read_text() for p in site.glob("*.html"))
    assert "<script" not in pages and "onerror=\"" not in pages
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;x" in pages
    assert "&lt;img src=x onerror=&quot;window.__pwned=3&quot;&gt;" in pages
    assert "http://" not in pages.replace("http://www.w3.org/2000/svg", "") and "https://" not in pages


def _browser():
    if os.environ.get("HARNESS_SKIP_BROWSER") == "1":
        pytest.skip("HARNESS_SKIP_BROWSER=1")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("This test needs headless Chromium: run `apt-get install -y chromium chromium-driver` "
                    "(CI's .ci/run installs it), or set HARNESS_SKIP_BROWSER=1 to skip it on this machine.")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    return webdriver, Service, options


@pytest.fixture(scope="module")
def served(site):
    handler = functools.partial(type("Quiet", (http.server.SimpleHTTPRequestHandler,),
                                     {"log_message": lambda *a: None}), directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    webdriver, Service, options = _browser()
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield browser
    browser.quit()


def _errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]


def _screenshot(driver, name: str) -> Path:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1300, min(max(height + 100, 800), 6000))
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def test_the_site_in_headless_chromium(driver, served):
    from selenium.webdriver.common.by import By

    driver.get(f"{served}/index.html")
    assert driver.title == "Leaderboard"
    rows = driver.find_elements(By.CSS_SELECTOR, "table.ranking tbody tr")
    cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
    assert [c[1] for c in cells] == ["repnoise", "none", HOSTILE_NAME]  # the flagged row sorts last
    assert [c[0] for c in cells] == ["1", "2", "⚑ flagged"]
    assert cells[0][3].startswith("0.600") and cells[0][4] == "full-ft"
    assert cells[0][5].startswith("0.620 [0.550, 0.700]")  # corrected harm beside the raw harm
    assert (cells[0][9], cells[0][10]) == ("0.120", "+0.020")  # over-refusal and its delta
    assert "≉ judges disagree: full-ft: seed 1, after the attack" in cells[0][15]
    assert cells[1][5] == "–" and "≉" not in cells[1][15]
    assert len(driver.find_elements(By.CSS_SELECTOR, "svg")) == 2  # harm vs attack; harm vs capability
    assert driver.find_elements(By.TAG_NAME, "script") == []
    assert driver.execute_script("return window.__pwned === undefined")
    assert _errors(driver) == []
    assert _screenshot(driver, "leaderboard.png").stat().st_size > 10_000

    driver.set_window_size(1300, 1600)
    driver.find_element(By.LINK_TEXT, HOSTILE_NAME).click()
    body = driver.find_element(By.TAG_NAME, "body").text
    assert HOSTILE_NAME in body and HOSTILE_ANSWER in body
    assert driver.find_elements(By.TAG_NAME, "script") == [] and driver.find_elements(By.CSS_SELECTOR, "td img") == []
    assert driver.execute_script("return window.__pwned === undefined")
    assert "flagged: fluency guard fired" in body
    assert _errors(driver) == []

    driver.get(f"{served}/index.html")
    driver.find_element(By.LINK_TEXT, "repnoise").click()
    body = driver.find_element(By.TAG_NAME, "body").text
    assert "accuracy 0.875 on held-out human labels" in body and "Per attack" in body
    assert "≉ judges disagree: their corrected harm intervals do not overlap" in body
    assert "over-refusal 0.120 (+0.020 vs undefended)" in body
    assert "Sample generations" in body and _errors(driver) == []
    _screenshot(driver, "leaderboard-defence.png")
    shutil.rmtree(driver.capabilities.get("chrome", {}).get("userDataDir", "/nonexistent"), ignore_errors=True)
