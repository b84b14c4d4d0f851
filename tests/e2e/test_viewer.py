"""The viewer page (viewer/) in a real headless Chromium, against a real TorchServe with the demo model.

The page is served by tools.view on a free loopback port, and TorchServe (free ports too)
allows exactly that origin, as the local config allows http://127.0.0.1:8090: every call the page
makes is a real cross-origin call, JSON POSTs with their preflight included.

Set VIEWER_SCREENSHOTS=<dir> to keep the screenshots (1280x800 and 420x800) for a look.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import psutil
import pytest
from PIL import Image

from tools.view import serve_in_thread
from tools.demo_server import build_store, running_server, shape_png

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium missing: pip install -e '.[test]'")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="chromium/chromedriver missing: bash deploy/install-system-deps.sh browser (make test does it)")

from selenium.common.exceptions import TimeoutException  # noqa: E402 (after the skip checks)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

WIDE = (1280, 800)
NARROW = (420, 800)
WAIT_S = 40  # a first explanation includes TorchServe's worker warming up


# --- servers and browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def viewer_origin():
    server, thread = serve_in_thread("127.0.0.1", 0, quiet=True)
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory, viewer_origin):
    store = build_store(tmp_path_factory.mktemp("store"))
    with running_server(store, tmp_path_factory.mktemp("run"), {"shapes": "shapes.mar"},
                        cors_allowed_origin=viewer_origin) as server:
        yield server


def _process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium through Debian's chromedriver; every process of it is gone afterwards."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking",
                     f"--user-data-dir={profile}", "--window-size=1280,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(profile / "chromedriver.log"))
    driver = None
    known: dict[int, psutil.Process] = {}
    try:
        driver = webdriver.Chrome(service=service, options=options)
        known = {process.pid: process for process in _process_tree(service.process.pid)}
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        yield driver
    finally:
        if service.process is not None:
            known.update({process.pid: process for process in _process_tree(service.process.pid)})
        try:
            if driver is not None:
                driver.quit()
        finally:
            service.stop()
            # quit() ends chromium and stop() chromedriver; anything that outlived them goes by pid.
            _, alive = psutil.wait_procs(list(known.values()), timeout=10)
            for process in alive:
                try:
                    process.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(alive, timeout=5)


@pytest.fixture()
def screenshots(tmp_path) -> Path:
    directory = Path(os.environ.get("VIEWER_SCREENSHOTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


# --- page helpers ----------------------------------------------------------------------------------


def page_state(driver) -> str:
    """What the page says now, for a failure message."""
    return driver.execute_script(
        "return 'status: ' + document.getElementById('status').textContent"
        " + ' | error: ' + document.getElementById('error').textContent")


def console_errors(driver) -> list[str]:
    """Script errors, CSP refusals and failed loads the page logged since the last call."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def wait_for(driver, condition, what: str, timeout: float = WAIT_S):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        pytest.fail(f"timed out waiting for {what} ({page_state(driver)})")


def set_viewport(driver, size: tuple[int, int]) -> None:
    # The window's size includes the browser's own bars; the page must get exactly this much room.
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False})


def screenshot(driver, path: Path, size: tuple[int, int], full_page: bool = False) -> None:
    driver.execute_script("window.scrollTo(0, 0)")
    if full_page:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        set_viewport(driver, (size[0], height))
    try:
        driver.save_screenshot(str(path))
    finally:
        set_viewport(driver, size)


def open_viewer(driver, viewer_origin: str, torchserve, size=WIDE) -> None:
    set_viewport(driver, size)
    console_errors(driver)  # drop what earlier tests left in the log
    query = urlencode({"inference": torchserve.inference_url, "management": torchserve.management_url})
    driver.get(f"{viewer_origin}/?{query}")
    wait_for(driver, lambda d: d.execute_script(
        "const s = document.getElementById('model-select'); return !s.disabled && s.value === 'shapes'"
        " && document.querySelectorAll('#explainer-list input').length > 0"), "the model list")


def choose_explainers(driver, names: list[str]) -> None:
    driver.execute_script(
        "for (const box of document.querySelectorAll('#explainer-list input')) box.checked = arguments[0].includes(box.value);",
        names)


def upload(driver, path: Path) -> None:
    driver.find_element(By.ID, "file-input").send_keys(str(path))


def shown_maps(driver, container: str = "maps") -> list[dict]:
    """Explanation figures whose image decoded and takes room on the page."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#' + arguments[0] + ' figure.explanation')].map((figure) => {
          const img = figure.querySelector('img');
          const box = img ? img.getBoundingClientRect() : {width: 0, height: 0};
          return {method: figure.dataset.method, target: figure.dataset.target,
                  decoded: Boolean(img && img.complete && img.naturalWidth > 0),
                  natural: img ? [img.naturalWidth, img.naturalHeight] : [0, 0],
                  visible: box.width > 0 && box.height > 0 && getComputedStyle(img).visibility !== 'hidden',
                  src: img ? img.src : ''};
        });""", container)


def wait_for_maps(driver, expected: int, container: str = "maps", extra=lambda maps: True) -> list[dict]:
    def ready(d):
        maps = shown_maps(d, container)
        return maps if len(maps) == expected and all(m["decoded"] and m["visible"] for m in maps) and extra(maps) else False
    return wait_for(driver, ready, f"{expected} decoded maps in #{container}")


def prediction_bars(driver) -> list[dict]:
    return driver.execute_script("""
        return [...document.querySelectorAll('#prediction-bars button')].map((b) => ({
          index: Number(b.dataset.index), label: b.dataset.label, text: b.textContent,
          selected: b.classList.contains('selected')}));""")


def image_file(tmp_path: Path, shape: str) -> Path:
    path = tmp_path / f"{shape}.png"
    path.write_bytes(shape_png(shape))
    return path


# --- tests ---------------------------------------------------------------------------------------


def test_preflight_allows_the_page_origin_only(torchserve, viewer_origin):
    def preflight(origin: str) -> str | None:
        request = urllib.request.Request(torchserve.url("/predictions/shapes"), method="OPTIONS", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200
            allowed_headers = reply.headers.get("Access-Control-Allow-Headers", "").lower()
            assert "content-type" in allowed_headers and "authorization" in allowed_headers
            assert "POST" in reply.headers.get("Access-Control-Allow-Methods", "")
            return reply.headers.get("Access-Control-Allow-Origin")

    # TorchServe sends its one configured origin whatever the request's: the browser does the refusing.
    assert preflight(viewer_origin) == viewer_origin
    assert preflight("http://127.0.0.1:1") != "http://127.0.0.1:1"


def test_explain_two_methods_then_another_class(browser, viewer_origin, torchserve, tmp_path, screenshots):
    open_viewer(browser, viewer_origin, torchserve)
    choose_explainers(browser, ["grad_cam", "saliency"])
    upload(browser, image_file(tmp_path, "square"))

    maps = wait_for_maps(browser, 2)
    assert sorted(m["method"] for m in maps) == ["grad_cam", "saliency"]
    assert all(m["natural"] == [64, 64] for m in maps)  # the model's input size, decoded from base64 PNG
    bars = prediction_bars(browser)
    assert bars and bars[0]["label"] == "square" and bars[0]["selected"], bars
    assert "square" in bars[0]["text"] and "%" in bars[0]["text"]
    assert {m["target"] for m in maps} == {"square"}
    status = browser.find_element(By.ID, "status").text
    assert "answered in" in status and "ms" in status, status
    assert not browser.find_element(By.ID, "error").is_displayed()

    before = {m["method"]: m["src"] for m in maps}
    other = bars[1]
    browser.find_element(By.CSS_SELECTOR, f"#prediction-bars button[data-index='{other['index']}']").click()
    after = wait_for_maps(browser, 2, extra=lambda ms: all(m["target"] == other["label"] for m in ms))
    changed = {m["method"] for m in after if m["src"] != before[m["method"]]}
    assert "grad_cam" in changed, "Grad-CAM's map did not change with the explained class"
    assert [b["index"] for b in prediction_bars(browser) if b["selected"]] == [other["index"]]
    assert other["label"] in browser.find_element(By.ID, "target-label").text
    assert console_errors(browser) == []


def test_rendering_options_and_quality_score(browser, viewer_origin, torchserve, tmp_path):
    open_viewer(browser, viewer_origin, torchserve)
    choose_explainers(browser, ["saliency"])
    upload(browser, image_file(tmp_path, "cross"))
    before = wait_for_maps(browser, 1)[0]
    Select(browser.find_element(By.ID, "polarity")).select_by_value("both")
    colormaps = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "colormap")).options]
    assert colormaps == ["coolwarm", "bwr", "gray"]  # a diverging map for both signs
    Select(browser.find_element(By.ID, "encoding")).select_by_value("png")
    assert not browser.find_element(By.ID, "overlay-base").is_enabled()
    browser.find_element(By.ID, "quality").click()
    browser.find_element(By.ID, "explain-button").click()

    after = wait_for_maps(browser, 1, extra=lambda ms: ms[0]["src"] != before["src"])[0]
    caption = browser.find_element(By.CSS_SELECTOR, "#maps figure.explanation figcaption").text
    assert re.search(r"deletion AUC 0\.\d{3}", caption), caption
    assert after["natural"] == [64, 64]
    assert console_errors(browser) == []


def test_the_explainers_offered_are_the_models_allowed_ones(browser, viewer_origin, torchserve):
    open_viewer(browser, viewer_origin, torchserve)
    offered = browser.execute_script(
        "return [...document.querySelectorAll('#explainer-list input')].map((box) => box.value)")
    reply = torchserve.request("GET", "/models/shapes?customized=true", api="management")
    metadata = reply.json()[0]["customizedMetadata"]  # the frontend hands the handler's JSON on parsed
    unavailable = metadata.get("unavailable_explainers", [])  # e.g. lrp on a gated model
    assert offered == [name for name in metadata["allowed_explainers"] if name not in unavailable]
    assert browser.find_element(By.ID, "explainer-note").text == ""  # no "not published" note


def test_maps_in_the_original_image_frame(browser, viewer_origin, torchserve, tmp_path):
    open_viewer(browser, viewer_origin, torchserve)
    choose_explainers(browser, ["grad_cam"])
    picture = tmp_path / "wide.png"
    picture.write_bytes(shape_png("star", size=64))
    Image.open(picture).resize((120, 80)).save(picture)  # not the model's 64 x 64
    upload(browser, picture)
    assert wait_for_maps(browser, 1)[0]["natural"] == [64, 64]  # the model input's frame by default
    Select(browser.find_element(By.ID, "frame")).select_by_value("image")
    browser.find_element(By.ID, "explain-button").click()
    assert wait_for_maps(browser, 1, extra=lambda ms: ms[0]["natural"] != [64, 64])[0]["natural"] == [120, 80]
    assert console_errors(browser) == []


def test_examples_paste_and_drop(browser, viewer_origin, torchserve):
    open_viewer(browser, viewer_origin, torchserve)
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button[data-example='star.png']"), "examples")
    browser.find_element(By.CSS_SELECTOR, "#examples button[data-example='star.png']").click()
    wait_for(browser, lambda d: (prediction_bars(d) or [{}])[0].get("label") == "star", "the star's prediction")

    # A real clipboard or drag needs a desktop; the same events, with a real file in them, do not.
    for event in ("paste", "drop"):
        browser.execute_script("""
            const [kind, done] = arguments;
            fetch('examples/circle.png').then((r) => r.blob()).then((blob) => {
              const transfer = new DataTransfer();
              transfer.items.add(new File([blob], kind + '.png', {type: 'image/png'}));
              const event = kind === 'paste'
                ? new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true})
                : new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true});
              (kind === 'paste' ? document.body : document.getElementById('drop-zone')).dispatchEvent(event);
            });""", event)
        wait_for(browser, lambda d: d.execute_script(
            "return document.querySelector('#maps figure.input figcaption').textContent") == f"input{event}.png"
            and (prediction_bars(d) or [{}])[0].get("label") == "circle", f"the {event}d image's prediction")


def test_fields_other_work_will_add_are_shown(browser, viewer_origin, torchserve):
    """latency_ms, rule_sites and sanity are not sent by this server yet: the page's renderer is fed a
    reply that has them (and an explanation error), so the day they come they show up."""
    open_viewer(browser, viewer_origin, torchserve)
    png = base64.b64encode(shape_png("cross")).decode()
    reply = {
        "predictions": [{"index": 3, "label": "cross", "score": 0.9}, {"index": 4, "label": "star", "score": 0.1}],
        "explanations": {"guided_backprop": {
            "target": {"index": 3, "label": "cross"}, "encoding": "png", "shape": [64, 64], "data": png,
            "scale": {"min": 0.0, "max": 0.25}, "quality": {"deletion_auc": 0.2125}, "latency_ms": 3.4,
            "rule_sites": {"relu": 7, "max_pool": 2}, "sanity": {"randomisation_similarity": 0.64}}},
        "explanation_errors": {"occlusion": {"code": "cost_cap_exceeded", "message": "occlusion needs 1600 evaluations"}},
    }
    browser.execute_script("renderResult(arguments[0], 42)", reply)
    caption = browser.find_element(By.CSS_SELECTOR, "#maps figure.explanation figcaption").text
    for expected in ("for “cross”", "3.4 ms on the server", "rule sites: ", "relu 7", "max_pool 2",
                     "deletion AUC 0.212", "sanity: {\"randomisation_similarity\":0.64}"):
        assert expected in caption, (expected, caption)
    assert shown_maps(browser)[0]["decoded"]
    failed = browser.find_element(By.CSS_SELECTOR, "#maps figure.failed")
    assert "occlusion needs 1600 evaluations" in failed.text
    assert "occlusion: occlusion needs 1600 evaluations" in browser.find_element(By.ID, "error").text
    assert "42 ms" in browser.find_element(By.ID, "status").text


def test_unsupported_file_shows_the_server_message(browser, viewer_origin, torchserve, tmp_path):
    open_viewer(browser, viewer_origin, torchserve)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image, just words\n")
    upload(browser, notes)

    error = browser.find_element(By.ID, "error")
    wait_for(browser, lambda d: error.is_displayed() and error.text, "the error message")
    # The same request straight to the server: the page shows its error.message word for word.
    document = {"image": base64.b64encode(notes.read_bytes()).decode(), "explain": ["grad_cam"]}
    reply = torchserve.request("POST", "/predictions/shapes", json.dumps(document).encode(),
                               {"Content-Type": "application/json"})
    assert reply.status == 400
    assert error.text == reply.json()["error"]["message"]
    assert shown_maps(browser) == []


def test_a_refused_cap_is_shown_in_words(browser, viewer_origin, torchserve, tmp_path):
    open_viewer(browser, viewer_origin, torchserve)
    choose_explainers(browser, ["saliency", "input_x_gradient", "guided_backprop", "deconvnet", "grad_cam"])
    upload(browser, image_file(tmp_path, "circle"))
    error = browser.find_element(By.ID, "error")
    wait_for(browser, lambda d: error.is_displayed() and error.text, "the refusal")
    assert "5 explainers requested" in error.text and "allows 4" in error.text, error.text


def test_compare_classes_shows_two_maps(browser, viewer_origin, torchserve, tmp_path, screenshots):
    open_viewer(browser, viewer_origin, torchserve)
    choose_explainers(browser, ["guided_backprop", "grad_cam"])
    upload(browser, image_file(tmp_path, "star"))
    wait_for_maps(browser, 2)
    bars = prediction_bars(browser)
    Select(browser.find_element(By.ID, "compare-method")).select_by_value("grad_cam")
    Select(browser.find_element(By.ID, "compare-a")).select_by_value(str(bars[0]["index"]))
    Select(browser.find_element(By.ID, "compare-b")).select_by_value(str(bars[2]["index"]))
    browser.find_element(By.ID, "compare-button").click()

    pair = wait_for_maps(browser, 2, container="compare-maps")
    assert [m["target"] for m in pair] == [bars[0]["label"], bars[2]["label"]]
    assert {m["method"] for m in pair} == {"grad_cam"}
    assert pair[0]["src"] != pair[1]["src"]
    screenshot(browser, screenshots / "viewer-1280x800.png", WIDE)
    screenshot(browser, screenshots / "viewer-1280-full.png", WIDE, full_page=True)


def test_narrow_window_keeps_the_controls_usable(browser, viewer_origin, torchserve, tmp_path, screenshots):
    try:
        open_viewer(browser, viewer_origin, torchserve, size=NARROW)
        upload(browser, image_file(tmp_path, "triangle"))
        wait_for_maps(browser, 2)
        width = browser.execute_script("return document.documentElement.clientWidth")
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width, "page scrolls sideways"
        # The rendering form starts folded on a narrow window; its summary opens it.
        assert not browser.find_element(By.ID, "polarity").is_displayed()
        browser.find_element(By.CSS_SELECTOR, "#rendering summary").click()
        for selector in ("#model-select", "label[for='file-input']", "#explain-button", "#polarity",
                         "#explainer-list input", "#prediction-bars button", "#maps figure.explanation img",
                         "#compare-button"):
            element = browser.find_element(By.CSS_SELECTOR, selector)
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
            assert element.is_displayed(), selector
            box = element.rect
            assert box["width"] > 0 and box["x"] >= 0 and box["x"] + box["width"] <= width + 1, (selector, box, width)
        browser.find_element(By.CSS_SELECTOR, "#rendering summary").click()
        screenshot(browser, screenshots / "viewer-420x800.png", NARROW)
        screenshot(browser, screenshots / "viewer-420-full.png", NARROW, full_page=True)
    finally:
        set_viewport(browser, WIDE)
