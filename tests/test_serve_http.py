"""`deltatune serve` over real HTTP: a uvicorn server in a child process on a free loopback port.

Server A (admin token set): register, mixed predict, hot add/remove under traffic, limits, auth, metrics.
Server B (same registry, restarted without --model and without a token, a long batching wait and a
tiny queue): the registry survived, admin is disabled, and overload answers 503 with Retry-After.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from test_serve_engine import TEXTS, TOL, make_delta, reference_logits

TOKEN = "test-admin-token"
STARTUP_SECONDS = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m deltatune serve ...` on a free port; waits (bounded) until /healthz answers."""

    def __init__(self, registry: Path, log: Path, *args: str, token: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("DELTATUNE_ADMIN_TOKEN", None)
        if token:
            env["DELTATUNE_ADMIN_TOKEN"] = token
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "deltatune", "serve", "--registry", str(registry), "--port", str(self.port),
             "--threads", "1", *args], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start within {STARTUP_SECONDS} s: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


class InProcessServer:
    """A real uvicorn server in a thread of this process, serving `engine` (for tests that inspect it)."""

    def __init__(self, engine, registry: Path, admin_token: str | None = None, limits=None):
        import uvicorn

        from deltatune.serve.app import create_app
        from deltatune.serve.batcher import Batcher
        from deltatune.serve.registry import Registry
        from deltatune.serve.server import Server

        self.server = Server(engine, Registry(registry), admin_token=admin_token)
        self.batcher = Batcher(engine, max_wait_ms=2).start()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(self.server, self.batcher, limits), host="127.0.0.1",
                                                     port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.uvicorn.started, "uvicorn did not start"

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(10)
        self.batcher.stop()


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-http")
    model = tiny_dir("bert")
    deltas = {
        "lora": make_delta(root / "d-lora", model, "lora", seed=1),
        "bitfit": make_delta(root / "d-bitfit", model, "bitfit", labels=("a", "b", "c"), seed=2),
        "prompt": make_delta(root / "d-prompt", model, "prompt", pooling="mean", seed=3),
        # 40 soft tokens + a long text exceed tiny BERT's 64 positions: a delta that fails on some inputs
        "long": make_delta(root / "d-long", model, "prompt", {"num_virtual_tokens": 40, "init": "random"}, seed=4),
        "other": make_delta(root / "d-other", tiny_dir("bert", seed=1), "lora", seed=5),
    }
    reference = {n: reference_logits(p, model, TEXTS).softmax(-1) for n, p in deltas.items() if n != "other"}
    return {"root": root, "model": model, "deltas": deltas, "reference": reference, "registry": root / "registry"}


@pytest.fixture(scope="module")
def server_a(setup):
    server = ServerProcess(setup["registry"], setup["root"] / "a.log", "--model", setup["model"],
                           "--max-items", "8", "--max-text-chars", "300", "--max-body-bytes", "20000",
                           "--max-wait-ms", "2", token=TOKEN)
    yield server
    server.stop()


def admin(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def check_probabilities(setup, results, items):
    for (task, text), result in zip(items, results):
        expected = setup["reference"][task][TEXTS.index(text)]
        assert result["task"] == task and set(result) == {"task", "label", "probabilities"}
        got = torch.tensor(list(result["probabilities"].values()))
        assert (got - expected).abs().max() <= TOL, (task, text)
        assert result["label"] == max(result["probabilities"], key=result["probabilities"].get)


def test_server_a(setup, server_a):
    url, deltas = server_a.url, setup["deltas"]
    client = httpx.Client(base_url=url, timeout=30)
    assert client.get("/healthz").json()["status"] == "ok"
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/tasks", "/v1/tasks/{task}", "/v1/tasks/{task}/predict"} <= set(schema["paths"])

    # admin: refused without / with a wrong token; then registered
    body = {"path": str(deltas["lora"])}
    assert client.put("/v1/tasks/lora", json=body).status_code == 401
    assert client.put("/v1/tasks/lora", json=body, headers=admin("wrong")).status_code == 401
    for name in ("lora", "bitfit", "prompt", "long"):
        response = client.put(f"/v1/tasks/{name}", json={"path": str(deltas[name])}, headers=admin())
        assert response.status_code == 200, response.text
    assert client.put("/v1/tasks/bad name", json=body, headers=admin()).status_code == 422
    mismatch = client.put("/v1/tasks/other", json={"path": str(deltas["other"])}, headers=admin())
    assert mismatch.status_code == 409 and "different backbone" in mismatch.json()["detail"]
    tasks = {t["name"]: t for t in client.get("/v1/tasks").json()["tasks"]}
    assert set(tasks) == {"lora", "bitfit", "prompt", "long"}
    assert tasks["bitfit"]["labels"] == ["a", "b", "c"] and tasks["bitfit"]["group"] == "own"
    assert tasks["lora"]["method"] == "lora" and tasks["lora"]["metrics"]["accuracy"] == 0.75

    # mixed predict: results in request order, equal to each task alone
    items = [("lora", TEXTS[0]), ("bitfit", TEXTS[1]), ("prompt", TEXTS[2]), ("lora", TEXTS[3]),
             ("prompt", TEXTS[4]), ("bitfit", TEXTS[5])]
    response = client.post("/v1/predict", json={"items": [{"task": t, "text": x} for t, x in items]})
    assert response.status_code == 200, response.text
    check_probabilities(setup, response.json()["results"], items)
    one = client.post("/v1/tasks/prompt/predict", json={"text": TEXTS[1]}).json()["results"]
    check_probabilities(setup, one, [("prompt", TEXTS[1])])
    many = client.post("/v1/tasks/bitfit/predict", json={"texts": TEXTS[:3]}).json()["results"]
    check_probabilities(setup, many, [("bitfit", t) for t in TEXTS[:3]])

    # errors: unknown task, limits, a delta failing on an input (the others keep working)
    assert client.post("/v1/tasks/nope/predict", json={"text": "x"}).status_code == 404
    unknown = client.post("/v1/predict", json={"items": [{"task": "lora", "text": "a"}, {"task": "nope", "text": "b"}]})
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]
    too_many = client.post("/v1/tasks/lora/predict", json={"texts": ["a"] * 9})
    assert too_many.status_code == 422 and "limit is 8" in too_many.json()["detail"]
    too_long = client.post("/v1/tasks/lora/predict", json={"text": "good " * 100})
    assert too_long.status_code == 422 and "limit is 300" in too_long.json()["detail"]
    too_big = client.post("/v1/tasks/lora/predict", json={"texts": ["a" * 250] * 100})
    assert too_big.status_code == 413 and "bytes" in too_big.json()["detail"]
    neither = client.post("/v1/tasks/lora/predict", json={})
    assert neither.status_code == 422
    failing = client.post("/v1/tasks/long/predict", json={"text": " ".join(["good"] * 40)})
    assert failing.status_code == 422 and "positions" in failing.json()["detail"]
    assert client.post("/v1/tasks/lora/predict", json={"text": TEXTS[0]}).status_code == 200

    # hot add / remove while requests for other tasks keep flowing
    stop, codes = threading.Event(), []

    def traffic():
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/v1/predict", json={"items": [{"task": "lora", "text": TEXTS[0]},
                                                          {"task": "bitfit", "text": TEXTS[1]}]})
                codes.append(r.status_code)
                check_probabilities(setup, r.json()["results"], [("lora", TEXTS[0]), ("bitfit", TEXTS[1])])

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        for _ in range(2):
            assert client.put("/v1/tasks/extra", json={"path": str(deltas["lora"])}, headers=admin()).status_code == 200
            assert client.post("/v1/tasks/extra/predict", json={"text": "good"}).status_code == 200
            assert client.delete("/v1/tasks/extra", headers=admin()).status_code == 200
            assert client.post("/v1/tasks/extra/predict", json={"text": "good"}).status_code == 404
    finally:
        stop.set()
        thread.join(30)
    assert codes and set(codes) == {200}
    assert client.delete("/v1/tasks/extra", headers=admin()).status_code == 404
    assert client.delete("/v1/tasks/long", headers=admin()).status_code == 200

    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in ("deltatune_queue_rows", "deltatune_batch_rows_bucket", "deltatune_batch_tasks_bucket",
                 "deltatune_request_seconds_bucket", 'deltatune_passes_total{group="shared"}',
                 'deltatune_passes_total{group="own"}', 'deltatune_rejected_total{reason="body_size"}'):
        assert name in text, name


def test_restart_keeps_registry_admin_disabled_and_overload(setup, server_a):
    server_a.stop()  # the module fixture's second stop() is harmless
    server = ServerProcess(setup["registry"], setup["root"] / "b.log", "--max-queue", "4", "--max-items", "4",
                           "--max-batch-size", "64", "--max-wait-ms", "1500")
    try:
        client = httpx.Client(base_url=server.url, timeout=30)
        listing = client.get("/v1/tasks").json()
        assert {t["name"] for t in listing["tasks"]} == {"lora", "bitfit", "prompt"}
        assert listing["model"] == str(Path(setup["model"]))
        disabled = client.put("/v1/tasks/x", json={"path": str(setup["deltas"]["lora"])}, headers=admin())
        assert disabled.status_code == 403 and "DELTATUNE_ADMIN_TOKEN" in disabled.json()["detail"]

        items = [("lora", TEXTS[0]), ("bitfit", TEXTS[1]), ("prompt", TEXTS[2]), ("lora", TEXTS[3])]
        with ThreadPoolExecutor(1) as pool:  # 4 rows fill the queue while the batch waits 1.5 s
            first = pool.submit(client.post, "/v1/predict",
                                json={"items": [{"task": t, "text": x} for t, x in items]})
            time.sleep(0.5)
            refused = httpx.post(server.url + "/v1/tasks/lora/predict", json={"text": "good"}, timeout=30)
            assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
            assert "queue is full" in refused.json()["detail"]
            response = first.result(30)
        assert response.status_code == 200
        check_probabilities(setup, response.json()["results"], items)
        assert 'deltatune_rejected_total{reason="overload"} 1' in client.get("/metrics").text
    finally:
        server.stop()


def test_generate_over_http(tiny_dir, tmp_path):
    from deltatune.serve.engine import Engine

    model = tiny_dir("llama")
    engine = Engine(model, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    server = InProcessServer(engine, tmp_path / "registry", admin_token=TOKEN)
    try:
        client = httpx.Client(base_url=server.url, timeout=30)
        for name, method in (("chat-lora", "lora"), ("chat-prompt", "prompt")):
            path = make_delta(tmp_path / name, model, method, pooling="lm", labels=(), kind="generation")
            assert client.put(f"/v1/tasks/{name}", json={"path": str(path)}, headers=admin()).status_code == 200
        items = [("chat-lora", "hi how are you"), ("chat-prompt", "good movie"), ("chat-lora", "what")]
        response = client.post("/v1/generate", json={"items": [{"task": t, "text": x} for t, x in items],
                                                     "max_new_tokens": 5})
        assert response.status_code == 200, response.text
        assert response.json()["results"] == engine.generate([(t, x, 5) for t, x in items])
        wrong_kind = client.post("/v1/tasks/chat-lora/predict", json={"text": "hi"})
        assert wrong_kind.status_code == 422 and "generation task" in wrong_kind.json()["detail"]
        assert client.post("/v1/generate", json={"items": [{"task": "chat-lora", "text": "hi"}],
                                                 "max_new_tokens": 0}).status_code == 422
    finally:
        server.stop()
        torch.set_num_threads(threads)
