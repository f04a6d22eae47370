"""The playground in a real headless Chromium: type a prompt, watch tokens stream, hover for alternatives."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tinyformer.server import create_app  # noqa: E402

from .helpers import char_lm  # noqa: E402
from .server_helpers import RunningServer, slowed  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1000,800"]


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory() as profile:
        options = Options()
        options.binary_location = CHROMIUM
        for flag in FLAGS + [f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def test_playground_streams_tokens_and_shows_alternatives(browser, tmp_path):
    lm = char_lm(context_length=128)
    slowed(lm.model, 0.02)  # slow enough that the page can be seen mid-stream
    with RunningServer(create_app(lm, name="tiny-char")) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny-char")
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("First Citizen:")
        for field, value in (("temperature", "0"), ("max_tokens", "60")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "generate").click()
        # mid-stream: some tokens are on the page while the Stop button is still live
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#output .tok")) >= 5)
        midway = len(browser.find_elements(By.CSS_SELECTOR, "#output .tok"))
        assert browser.find_element(By.ID, "stop").is_enabled() and midway < 60
        wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
        tokens = browser.find_elements(By.CSS_SELECTOR, "#output .tok")
        want = lm.generate("First Citizen:", max_new_tokens=60, temperature=0, details=True)
        assert "".join(t.get_attribute("data-token") for t in tokens) == want.text
        assert browser.find_element(By.CSS_SELECTOR, "#output .prompt").text == "First Citizen:"
        assert all(t.value_of_css_property("background-color") != "rgba(0, 0, 0, 0)" for t in tokens[:5])
        ActionChains(browser).move_to_element(tokens[3]).perform()
        card = browser.find_element(By.ID, "card")
        wait.until(lambda d: card.is_displayed())
        rows = card.find_elements(By.CSS_SELECTOR, "tr")
        assert len(rows) == 5  # the top-5 alternatives
        assert "%" in rows[0].text and card.find_elements(By.CSS_SELECTOR, "tr.chosen")
        # PLAYGROUND_SCREENSHOT=path.png keeps a picture of the page with the card open, to look at
        browser.save_screenshot(os.environ.get("PLAYGROUND_SCREENSHOT") or str(tmp_path / "playground.png"))
