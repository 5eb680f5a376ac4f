"""The demo in a real browser: headless Chromium from Debian's packages (no browser download)
types a prompt, draws on the canvas and reads the page, reaching nothing but the loopback; each
tab's screenshot is written to docs/. Slow: ``pytest -m slow tests/test_serve_browser.py``.

The scribble tab uses ``$HYPERSD_CONTROLNET`` when set, else the bundled mini-controlnet, else
a tiny random one (then the picture shows the plumbing, not a trained ControlNet).
"""

import os
import re
import time
from pathlib import Path

import pytest

from hypersd.generate import load_pipeline
from hypersd.serve import ServeConfig
from hypersd.teacher.controlnet import CONTROLNET_DIR
from hypersd.testing import tiny_controlnet

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
DOCS = Path(__file__).resolve().parent.parent / "docs"
WAIT = 90  # seconds for an image to appear (a busy 2-core machine; a model load on first use)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (CHROMIUM.exists() and DRIVER.exists()),
                                 reason="no Chromium: apt-get install chromium chromium-driver")]
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from hypersd.serve.app import serve
    controlnet = os.environ.get("HYPERSD_CONTROLNET") or (
        str(CONTROLNET_DIR) if CONTROLNET_DIR.exists()
        else tiny_controlnet(load_pipeline().unet, tmp_path_factory.mktemp("controlnet")))
    app, address = serve(ServeConfig(controlnet=controlnet, port=0), block=False)
    yield address
    app.close()


@pytest.fixture(scope="module")
def browser(url):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):  # no name but the loopback's
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(DRIVER)), options=options)
    driver.get(url)
    yield driver
    driver.quit()


def _find(driver, css: str):
    """The first element matching ``css`` that is shown, waiting for it."""
    def shown(d):
        return next((e for e in d.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()), None)
    return WebDriverWait(driver, WAIT).until(shown, f"nothing shown matches {css}")


def _text(driver, css: str, pattern: str) -> str:
    return WebDriverWait(driver, WAIT).until(
        lambda d: re.search(pattern, d.find_element(By.CSS_SELECTOR, css).text) and
        d.find_element(By.CSS_SELECTOR, css).text, f"{css} never said {pattern!r}")


def test_typing_a_prompt_draws_it_and_the_teacher_beside_it(browser):
    _find(browser, "#text-prompt textarea").send_keys("rocket")
    assert "/gradio_api/file=" in _find(browser, "#text-student img").get_attribute("src")
    _text(browser, "#text-latency", r"accelerated: \d+ ms for 1 image")
    _find(browser, "#text-compare input").click()
    _find(browser, "#text-teacher img")
    _text(browser, "#text-latency", r"teacher: \d+ ms")
    browser.save_screenshot(str(DOCS / "serve-text.png"))


def test_a_prompt_over_the_cap_is_refused_in_the_page(browser):
    box = _find(browser, "#text-prompt textarea")
    box.send_keys(" " + "x" * 200)
    toast = _find(browser, "[data-testid='toast-body']")
    assert "above this server's cap of 200" in toast.text
    browser.find_element(By.CSS_SELECTOR, "[data-testid='toast-close']").click()
    box.clear()
    box.send_keys("rocket")


def _stroke_pixels(driver, css: str) -> int:
    """How many pixels of the image shown at ``css`` are strokes (bright)."""
    return driver.execute_script("""
        const img = document.querySelector(arguments[0]);
        if (!img || !img.complete || !img.naturalWidth) return 0;
        const canvas = document.createElement("canvas");
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const ctx = canvas.getContext("2d"); ctx.drawImage(img, 0, 0);
        const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0; for (let i = 0; i < data.length; i += 4) n += data[i] > 127;
        return n;""", css)


def test_a_stroke_on_the_canvas_becomes_an_image(browser):
    browser.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Scribble')]").click()
    canvas = _find(browser, "#scribble-canvas canvas")
    _find(browser, "#scribble-prompt textarea").send_keys("rocket")
    _text(browser, "#scribble-latency", r"scribble: \d+ ms for 1 image")  # the prompt alone, no strokes
    assert _stroke_pixels(browser, "#scribble-control img") == 0
    (ActionChains(browser).move_to_element_with_offset(canvas, -40, -60).click_and_hold()
     .move_by_offset(20, 40).move_by_offset(20, 40).move_by_offset(20, -40).move_by_offset(20, -40)
     .release().perform())  # a V, with the brush the tab picked on opening
    WebDriverWait(browser, WAIT).until(lambda d: _stroke_pixels(d, "#scribble-control img") > 10,
                                       "the stroke never reached the ControlNet")
    assert "/gradio_api/file=" in _find(browser, "#scribble-result img").get_attribute("src")
    time.sleep(1)  # the page settles: no request in flight in the picture
    browser.save_screenshot(str(DOCS / "serve-scribble.png"))


def test_the_page_reaches_nothing_but_its_server(browser, url):
    host = re.match(r"https?://[^/]+", url).group(0)
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and [u for u in fetched if not u.startswith((host, "data:", "blob:"))] == []
