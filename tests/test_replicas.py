"""Serve replicas sharing one registry folder: a task added or removed through one is served by the other.

Replica A is a real `deltatune serve` process (its catalog watch every 2 s); replica B runs in this process
(real uvicorn on 127.0.0.1, its watch every 0.1 s). They share only the folder: SQLite in WAL mode.
"""

from __future__ import annotations

import sqlite3
import time

import httpx
import pytest
import torch
from test_serve_engine import TEXTS, make_delta, reference_logits
from test_serve_http import TOKEN, InProcessServer, ServerProcess, admin

from deltatune.serve.engine import Engine

WAIT_SECONDS = 20


def until(check, seconds: float = WAIT_SECONDS):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


def served(url: str) -> set[str]:
    return {t["name"] for t in httpx.get(url + "/v1/tasks", timeout=10).json()["tasks"]}


@pytest.fixture(scope="module")
def replicas(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    model = tiny_dir("bert")
    registry = root / "registry"
    a = ServerProcess(registry, root / "a.log", "--model", model, "--max-wait-ms", "2", token=TOKEN)
    b = InProcessServer(Engine(model, device="cpu"), registry, admin_token=TOKEN)
    b.server.watch(0.1)
    yield {"a": a, "b": b, "root": root, "model": model, "registry": registry}
    b.server.stopped.set()
    b.stop()
    a.stop()


def test_the_shared_catalog_runs_in_wal_mode(replicas):
    with sqlite3.connect(replicas["registry"] / "catalog.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_task_added_through_one_replica_is_served_by_the_other(replicas):
    a, b, root, model = replicas["a"], replicas["b"], replicas["root"], replicas["model"]
    delta = make_delta(root / "d-lora", model, "lora", seed=1)
    assert httpx.put(a.url + "/v1/tasks/sentiment", json={"path": str(delta)}, headers=admin(),
                     timeout=60).status_code == 200
    until(lambda: "sentiment" in served(b.url))
    answer = httpx.post(b.url + "/v1/tasks/sentiment/predict", json={"texts": TEXTS}, timeout=30)
    assert answer.status_code == 200
    got = torch.tensor([[r["probabilities"][k] for k in ("neg", "pos")] for r in answer.json()["results"]])
    torch.testing.assert_close(got, reference_logits(delta, model, TEXTS).softmax(-1), atol=1e-4, rtol=1e-4)
    # and back: B removes it, A (polling every 2 s) stops serving it
    assert httpx.delete(b.url + "/v1/tasks/sentiment", headers=admin(), timeout=30).status_code == 200
    until(lambda: httpx.post(a.url + "/v1/tasks/sentiment/predict", json={"text": "good"},
                             timeout=30).status_code == 404)
    assert "sentiment" not in served(a.url)


def test_a_replaced_delta_reaches_the_other_replica(replicas):
    a, b, root, model = replicas["a"], replicas["b"], replicas["root"], replicas["model"]
    first, second = (make_delta(root / f"d-{seed}", model, "lora", seed=seed) for seed in (2, 3))
    for delta in (first, second):  # the same name registered twice through B
        assert httpx.put(b.url + "/v1/tasks/swap", json={"path": str(delta)}, headers=admin(),
                         timeout=60).status_code == 200
    expected = reference_logits(second, model, TEXTS[:2]).softmax(-1)

    def a_serves_second():
        answer = httpx.post(a.url + "/v1/tasks/swap/predict", json={"texts": TEXTS[:2]}, timeout=30)
        if answer.status_code != 200:
            return False
        got = torch.tensor([[r["probabilities"][k] for k in ("neg", "pos")] for r in answer.json()["results"]])
        return torch.allclose(got, expected, atol=1e-4, rtol=1e-4)

    until(a_serves_second)
