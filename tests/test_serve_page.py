"""The page at `/`, in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

The server is a real uvicorn server on a free loopback port, in a thread of this process. The test installs
nothing: `scripts/setup.sh --dev` installs chromium and chromium-driver; without them the test skips and says so.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from test_serve_engine import make_delta


def chromium_paths() -> tuple[str, str]:
    """(chromium, chromedriver) from PATH; skip, naming what is missing, when either is not there."""
    found = {name: shutil.which(name) for name in ("chromium", "chromedriver")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not on PATH: run scripts/setup.sh --dev "
                    "(apt-get install chromium chromium-driver)")
    return found["chromium"], found["chromedriver"]


@pytest.fixture(scope="module")
def server_url(tiny_dir, tmp_path_factory):
    from test_serve_http import InProcessServer

    from deltatune.serve.engine import Engine

    root = tmp_path_factory.mktemp("serve-page")
    model = tiny_dir("bert")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine(model, device="cpu")
    server = InProcessServer(engine, root / "registry")
    server.server.register("sentiment", str(make_delta(root / "sentiment", model, "lora", seed=1)))
    server.server.register("topic", str(make_delta(root / "topic", model, "bitfit", labels=("sport", "tech", "vote"),
                                                   seed=2)))
    yield server.url, engine
    server.stop()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium missing: pip install -e '.[dev]'")
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_page_lists_tasks_and_predicts(server_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, engine = server_url
    browser.get(url + "/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tasks tbody tr[data-task]")) == 2)
    rows = {r.get_attribute("data-task"): [c.text for c in r.find_elements(By.TAG_NAME, "td")]
            for r in browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr[data-task]")}
    assert rows["sentiment"][:3] == ["sentiment", "lora", "neg, pos"]
    assert rows["topic"][:3] == ["topic", "bitfit", "sport, tech, vote"]
    assert "accuracy 0.750" in rows["sentiment"][3]
    assert rows["sentiment"][4] == "shared" and rows["topic"][4].startswith("own")

    for task, text in (("topic", "the team won the match"), ("sentiment", "a great film")):
        Select(browser.find_element(By.ID, "task-select")).select_by_value(task)
        box = browser.find_element(By.ID, "text")
        box.clear()
        box.send_keys(text)
        browser.find_element(By.ID, "predict").click()
        expected = engine.classify([(task, text)])[0]
        wait.until(lambda d, want=expected["label"]: d.find_elements(By.ID, "label")
                   and d.find_element(By.ID, "label").text == want)
        shown = browser.find_elements(By.CSS_SELECTOR, "#result table tr")
        assert len(shown) == len(expected["probabilities"])
        best = max(expected["probabilities"].values())
        assert shown[0].text.split()[0] == expected["label"] and f"{best:.3f}" in shown[0].text
