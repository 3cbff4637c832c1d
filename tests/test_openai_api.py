"""The OpenAI-compatible endpoints over real HTTP (uvicorn on 127.0.0.1) with the real `openai` client.

A tiny Llama with a tied LM head (so the bare backbone generates too) and a 1024-token context; random
generation deltas of every servable kind (LoRA, prompt, prefix, IA3, adapter, full: its own group) and a
classification delta. References decode each delta alone without any cache (`greedy_alone`).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import tiny
import torch
from test_serve_engine import greedy_alone, make_delta
from test_serve_http import InProcessServer

from deltatune.loading import load_delta
from deltatune.rendering import prompt_ids
from deltatune.serve.app import Limits
from deltatune.serve.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")
TOKEN = "openai-admin"
KINDS = ["lora", "prompt", "prefix", "ia3", "adapter", "full"]
PROMPTS = ["good movie", "the plot was very dull and boring and so on", "hi"]


def save_tiny_lm(root) -> str:
    """A tiny Llama with a tied LM head (the bare backbone generates) and a 1024-token context: its folder."""
    from transformers import AutoModelForCausalLM

    config = tiny.tiny_config("llama")
    config.tie_word_embeddings, config.max_position_embeddings = True, 1024
    torch.manual_seed(0)
    model = str(root / "tiny-llama-lm")
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    tiny._tokenizer("llama").save_pretrained(model)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    model = save_tiny_lm(root)
    deltas = {m: make_delta(root / m, model, m, pooling="lm", labels=(), kind="generation", seed=i)
              for i, m in enumerate(KINDS)}
    deltas["late"] = make_delta(root / "late", model, "ia3", pooling="lm", labels=(), kind="generation", seed=11)
    deltas["cls"] = make_delta(root / "cls", model, "lora", seed=12)
    engine = Engine(model, device="cpu")
    for name in KINDS + ["cls"]:
        engine.add_task(name, deltas[name])
    server = InProcessServer(engine, root / "registry", admin_token=TOKEN, limits=Limits(max_new_tokens=1000))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield {"model": model, "deltas": deltas, "server": server, "client": client, "engine": engine,
           "scheduler": server.uvicorn.config.app.app.state.scheduler}
    server.stop()


def reference(setup, name: str | None, ids: list[int], steps: int) -> str:
    """The delta (or the bare backbone) alone, no cache: the text of its greedy continuation."""
    cache = setup.setdefault("refs", {})
    if name not in cache:
        from deltatune.backbone import load_task_model

        cache[name] = (load_task_model(setup["model"], 0, pooling="lm") if name is None
                       else load_delta(setup["deltas"][name], model=setup["model"]).task_model).module
    tokenizer = setup["engine"].shared.tokenizer
    new, _ = greedy_alone(cache[name], ids, steps, tokenizer.eos_token_id)
    return tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def chat(setup, model: str, text: str, **options):
    options.setdefault("temperature", 0)
    return setup["client"].chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                   **options)


def test_models_chat_completion_and_stream(setup):
    client, tokenizer = setup["client"], setup["engine"].shared.tokenizer
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny-llama-lm", *KINDS, "cls"}
    assert models["lora"].parent == "tiny-llama-lm" and models["lora"].kind == "generation"
    assert models["cls"].kind == "classification" and models["prefix"].method == "prefix"

    reply = chat(setup, "prefix", PROMPTS[1], max_tokens=7, logprobs=True, top_logprobs=3)
    ids = prompt_ids(tokenizer, [("user", PROMPTS[1])])
    assert reply.choices[0].message.content == reference(setup, "prefix", ids, 7)
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 7
    assert reply.choices[0].finish_reason == "length" and reply.model == "prefix"
    content = reply.choices[0].logprobs.content
    assert len(content) == 7 and all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob)  # greedy: the most likely

    # /v1/completions: raw text, the bare backbone by its folder name
    done = client.completions.create(model="tiny-llama-lm", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2)
    raw = prompt_ids(tokenizer, PROMPTS[0], raw=True)
    assert done.choices[0].text == reference(setup, None, raw, 6)
    assert len(done.choices[0].logprobs.tokens) == 6 and done.usage.prompt_tokens == len(raw)

    # streamed: the same text in chunks, a finish chunk, then the usage chunk
    chunks = list(client.chat.completions.create(model="prefix", messages=[{"role": "user", "content": PROMPTS[1]}],
                                                 max_tokens=7, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    streamed = list(client.completions.create(model="lora", prompt=PROMPTS[0], max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == reference(setup, "lora", raw, 5)


def test_stop_strings_seed_and_n(setup):
    full = chat(setup, "lora", PROMPTS[0], max_tokens=8).choices[0].message.content
    words = full.split(" ")
    stop = words[1][-2:] + " " + words[2][:2]  # spans a token boundary
    cut = chat(setup, "lora", PROMPTS[0], max_tokens=8, stop=[stop, "never there"]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[:full.index(stop)]
    streamed = chat(setup, "lora", PROMPTS[0], max_tokens=8, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.message.content

    sampled = [chat(setup, "ia3", PROMPTS[2], max_tokens=6, temperature=1.0, seed=5, n=3) for _ in range(2)]
    texts = [[c.message.content for c in s.choices] for s in sampled]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1  # seeded: repeatable; choice i uses seed + i


def test_mixed_deltas_equal_each_alone(setup):
    """Every delta kind and the bare backbone, many requests at once, equal each request alone."""
    tokenizer, scheduler = setup["engine"].shared.tokenizer, setup["scheduler"]
    requests = [(m, p, 4 + (i % 5)) for i, (m, p) in enumerate((m, p) for m in KINDS + ["tiny-llama-lm"]
                                                               for p in PROMPTS)]
    alone = {r: chat(setup, r[0], r[1], max_tokens=r[2]).choices[0].message.content for r in requests}
    scheduler.peak_tasks = 0
    with ThreadPoolExecutor(len(requests)) as pool:
        mixed = dict(zip(requests, pool.map(lambda r: chat(setup, r[0], r[1], max_tokens=r[2]), requests)))
    assert scheduler.peak_tasks >= 3, "the requests did not share the mixed batch"
    for r in requests:
        assert mixed[r].choices[0].message.content == alone[r], r
    for name, text, steps in requests:  # and equal to the delta alone without any cache
        if text == PROMPTS[1] and name in ("ia3", "adapter", "full"):
            ids = prompt_ids(tokenizer, [("user", text)])
            assert alone[(name, text, steps)] == reference(setup, name, ids, steps), name


def test_cancelled_stream_frees_its_slot_and_overload_answers_503(setup):
    scheduler, url = setup["scheduler"], setup["server"].url
    scheduler.max_kv_tokens = 1000  # one request of 900 tokens fits, two do not
    try:
        stream = chat(setup, "tiny-llama-lm", PROMPTS[0], max_tokens=900, stream=True)
        next(iter(stream)), next(iter(stream))
        assert httpx.get(url + "/healthz").json()["generation"]["sequences"] == 1
        with pytest.raises(openai.APIStatusError) as refused:
            chat(setup, "lora", PROMPTS[0], max_tokens=900)
        assert refused.value.status_code == 503 and int(refused.value.response.headers["retry-after"]) >= 1
        assert refused.value.body["type"] == "server_error" and "KV-cache" in refused.value.body["message"]
        stream.close()  # the client goes away mid-stream
        steps = scheduler.steps
        deadline = time.monotonic() + 10
        while httpx.get(url + "/healthz").json()["generation"]["sequences"] and time.monotonic() < deadline:
            time.sleep(0.05)
        state = httpx.get(url + "/healthz").json()["generation"]
        assert state["sequences"] == 0 and state["kv_tokens"] == 0
        assert scheduler.steps - steps < 400, "the cancelled request kept decoding"
        admitted = chat(setup, "lora", PROMPTS[0], max_tokens=900, stream=True)  # fits again
        assert next(iter(admitted)).choices[0].delta.role == "assistant"
        admitted.close()
    finally:
        scheduler.max_kv_tokens = 65536


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_bad_requests_answer_400_and_server_keeps_serving(setup):
    http = httpx.Client(base_url=setup["server"].url, timeout=30)
    chat_url, good = "/v1/chat/completions", {"model": "lora", "messages": [{"role": "user", "content": "hi"}]}
    assert error_of(http.post(chat_url, content=b'{"model": "lora",', headers={"content-type": "application/json"}),
                    400)["type"] == "invalid_request_error"
    assert error_of(http.post(chat_url, json={**good, "messages": []}), 400)["param"] == "messages"
    assert error_of(http.post(chat_url, json={**good, "max_tokens": -3}), 400)["param"] == "max_tokens"
    assert error_of(http.post(chat_url, json={"model": "lora"}), 400)["param"] == "messages"
    long = {**good, "messages": [{"role": "user", "content": "good " * 1100}]}
    assert error_of(http.post(chat_url, json=long), 400)["code"] == "context_length_exceeded"
    assert error_of(http.post("/v1/completions", json={"model": "lora", "prompt": "a", "max_tokens": 2000}),
                    400)["param"] == "max_tokens"
    assert error_of(http.post(chat_url, json={**good, "temperature": -1}), 400)["param"] == "temperature"
    assert error_of(http.post(chat_url, json={**good, "model": "nope"}), 404)["code"] == "model_not_found"
    assert "/v1/predict" in error_of(http.post(chat_url, json={**good, "model": "cls"}), 400)["message"]
    assert http.post("/v1/predict", json={}).status_code == 422  # the existing endpoints keep their 422
    with pytest.raises(openai.NotFoundError):
        chat(setup, "nope", "hi")
    assert http.post(chat_url, json=good).status_code == 200


def test_load_and_unload_any_delta_kind(setup):
    http, client = httpx.Client(base_url=setup["server"].url, timeout=30), setup["client"]
    body = {"lora_name": "late", "lora_path": str(setup["deltas"]["late"])}
    assert error_of(http.post("/v1/load_lora_adapter", json=body), 401)["type"] == "invalid_request_error"
    admin = {"Authorization": f"Bearer {TOKEN}"}
    loaded = http.post("/v1/load_lora_adapter", json=body, headers=admin)
    assert loaded.status_code == 200 and "late" in loaded.text
    assert error_of(http.post("/v1/load_lora_adapter", json=body, headers=admin), 400)["param"] == "lora_name"
    assert "late" in {m.id for m in client.models.list()}
    assert "late" in {e["name"] for e in setup["server"].server.registry.entries()}  # persisted like PUT /v1/tasks
    ids = prompt_ids(setup["engine"].shared.tokenizer, [("user", PROMPTS[0])])
    assert chat(setup, "late", PROMPTS[0], max_tokens=5).choices[0].message.content == reference(setup, "late", ids, 5)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}, headers=admin).status_code == 200
    assert "late" not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        chat(setup, "late", PROMPTS[0])
    assert error_of(http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}, headers=admin), 404)
    missing = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nonexistent"}, headers=admin)
    assert error_of(missing, 400)


def test_unload_while_decoding_ends_the_request(setup):
    """A request whose delta is unloaded mid-decode stops with an error instead of switching deltas."""
    http, admin = httpx.Client(base_url=setup["server"].url, timeout=30), {"Authorization": f"Bearer {TOKEN}"}
    body = {"lora_name": "late", "lora_path": str(setup["deltas"]["late"])}
    assert http.post("/v1/load_lora_adapter", json=body, headers=admin).status_code == 200
    result: dict = {}

    def long_request():
        result["response"] = http.post("/v1/chat/completions", json={
            "model": "late", "max_tokens": 900, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]})

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.monotonic() + 10
    while not setup["scheduler"].stats()["sequences"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}, headers=admin).status_code == 200
    thread.join(30)
    assert "unloaded" in error_of(result["response"], 400)["message"]


def test_completion_equals_cli_generate_raw(setup):
    """/v1/completions reads the prompt as raw text: greedy, it emits the tokens `deltatune generate --raw` emits.

    Both are checked against the same reference tokens (the delta alone, no cache). The texts differ only in how
    the tokens are printed: the CLI strips the reply and applies the tokenizer's space clean-up; the API returns
    the continuation as generated (leading space included), as OpenAI's completions do."""
    from test_cli import run

    tokenizer = setup["engine"].shared.tokenizer
    for name in ("lora", "prefix"):
        reference(setup, name, [1], 1)  # loads the delta alone once
        for prompt in PROMPTS[:2]:
            proc = run("generate", str(setup["deltas"][name]), prompt, "--raw", "--max-new-tokens", "6",
                       "--model", setup["model"], "--device", "cpu", "--json")
            assert proc.returncode == 0, proc.stderr
            done = setup["client"].completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0)
            new, _ = greedy_alone(setup["refs"][name], prompt_ids(tokenizer, prompt, raw=True), 6,
                                  tokenizer.eos_token_id)
            assert done.usage.completion_tokens == len(new)
            assert done.choices[0].text == tokenizer.decode(new, skip_special_tokens=True,
                                                            clean_up_tokenization_spaces=False), (name, prompt)
            assert json.loads(proc.stdout)[0]["reply"] == tokenizer.decode(new, skip_special_tokens=True).strip()
