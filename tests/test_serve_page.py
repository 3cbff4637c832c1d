"""The page at `/`, in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

The server is a real uvicorn server on a free loopback port, in a thread of this process. The test installs
nothing: `scripts/setup.sh --dev` installs chromium and chromium-driver; without them the test skips and says so.
"""

from __future__ import annotations

import os
import shutil

import pytest
import tiny
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


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """A tiny Llama served with two generation deltas (LoRA, prefix) and a classification one."""
    from test_openai_api import save_tiny_lm
    from test_serve_http import InProcessServer

    from deltatune.serve.engine import Engine

    root = tmp_path_factory.mktemp("serve-chat")
    model = save_tiny_lm(root)
    with tiny.torch_threads(1):
        engine = Engine(model, device="cpu")
        server = InProcessServer(engine, root / "registry")
        for name, method, seed in (("chat-lora", "lora", 0), ("chat-prefix", "prefix", 1)):
            server.server.register(name, str(make_delta(root / name, model, method, pooling="lm", labels=(),
                                                        kind="generation", seed=seed)))
        server.server.register("mood", str(make_delta(root / "mood", model, "lora", seed=4)))
        yield server.url
        server.stop()


def test_chat_box_streams_the_greedy_reply_and_keeps_the_history(chat_server, browser):
    """One chat box per generation delta; two turns typed in the page equal the API's greedy replies to the
    same conversation (so the page sends the history, and the streamed chunks add up to the whole reply)."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(chat_server + "/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".chat")) == 2)
    assert sorted(b.get_attribute("data-model") for b in browser.find_elements(By.CSS_SELECTOR, ".chat")) == [
        "chat-lora", "chat-prefix"]  # none for the classification delta
    box = browser.find_element(By.CSS_SELECTOR, '.chat[data-model="chat-prefix"]')
    limit = box.find_element(By.CSS_SELECTOR, ".max-tokens")
    limit.clear()
    limit.send_keys("12")
    def greedy(messages: list[dict]) -> str:
        body = {"model": "chat-prefix", "messages": messages, "max_tokens": 12, "temperature": 0}
        return httpx.post(chat_server + "/v1/chat/completions", json=body, timeout=30).json()[
            "choices"][0]["message"]["content"]

    messages = []
    for turn, text in enumerate(("hello there", "and what about the plot?")):
        box.find_element(By.CSS_SELECTOR, ".message").send_keys(text)
        box.find_element(By.CSS_SELECTOR, ".send").click()
        wait.until(lambda d, n=turn + 1: len(box.find_elements(By.CSS_SELECTOR, '.assistant[data-state="done"]')) == n)
        shown = box.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("textContent")
        messages.append({"role": "user", "content": text})
        reply = greedy(messages)
        assert reply and shown == reply, turn
        messages.append({"role": "assistant", "content": reply})
    assert greedy(messages[-2:-1]) != shown, "this delta replies the same without the history: pick another"
    assert [m.get_attribute("textContent") for m in box.find_elements(By.CSS_SELECTOR, ".msg.user")] == [
        "hello there", "and what about the plot?"]
    if os.environ.get("DELTATUNE_PAGE_SCREENSHOT"):  # a PNG of the page, to look at by eye
        browser.set_window_size(1100, 1400)
        browser.save_screenshot(os.environ["DELTATUNE_PAGE_SCREENSHOT"])
