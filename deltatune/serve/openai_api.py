"""OpenAI-compatible endpoints on the serve app: every generation delta is a `model`, decoded in one batch.

    POST /v1/chat/completions     messages -> the backbone's chat template -> the delta's reply
    POST /v1/completions          prompt (raw text, no template) -> its continuation
    GET  /v1/models               the bare backbone (alias and folder name) and every served delta
                                  (kind, method, parent = the backbone)
    POST /v1/load_lora_adapter    {"lora_name", "lora_path"}: serve a delta of ANY kind (admin, like PUT
    POST /v1/unload_lora_adapter  /v1/tasks/NAME: persisted in the registry); {"lora_name"}: stop it

`model` names a served generation delta or the bare backbone; a classification delta answers 400 (use
/v1/predict). max_tokens, temperature (0 = greedy), top_p, n, seed, stop, logprobs / top_logprobs and
stream (server-sent chunks ending `data: [DONE]`; stream_options.include_usage adds a usage chunk).
Requests go to the `Scheduler` (continuous batching): a request past the KV bound answers 503 with
Retry-After; a client that disconnects frees its rows at the next step. Errors use OpenAI's error
object: 400 bad parameters (these endpoints answer 400 where the others answer 422), 404 unknown model.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltatune.decoding.loop import Sampling
from deltatune.errors import UserError
from deltatune.serve.batcher import Overloaded
from deltatune.serve.engine import UnknownTask
from deltatune.serve.openai_schema import (
    APIError,
    ChatBody,
    CompletionBody,
    LoadBody,
    Sampled,
    TextTracker,
    UnloadBody,
    check_sampling,
    legacy_logprobs,
    raw_ids,
    render_chat,
    token_logprobs,
)
from deltatune.serve.scheduler import Job, Scheduler, reserved
from deltatune.serve.task import BackboneMismatch

PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/load_lora_adapter",
         "/v1/unload_lora_adapter")
MAX_N = 16
"""Choices per request."""


class OpenAIJob(Job):
    """A request's sequences; the decode thread's hooks become events on the request's asyncio queue."""

    def __init__(self, task, seqs, loop: asyncio.AbstractEventLoop, tokenizer, stops: list[str],
                 top: int | None, prompt_tokens: int):
        super().__init__(task, seqs)
        self.loop, self.queue, self.tokenizer, self.top = loop, asyncio.Queue(), tokenizer, top
        self.prompt_tokens = prompt_tokens
        self.trackers = [TextTracker(tokenizer, stops, s.sampling.stop_ids) for s in seqs]
        for seq in seqs:
            seq.logits = [] if top is not None else None

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def on_token(self, i, token, logits) -> bool:
        seq = self.seqs[i]
        text, stopped = self.trackers[i].push(seq.new, final=seq.done)
        logprobs = token_logprobs(self.tokenizer, logits, token, self.top) if logits is not None else None
        self.emit("delta", i, text, logprobs)
        return stopped

    def on_finish(self, i, reason) -> None:
        self.emit("finish", i, reason, len(self.seqs[i].new))

    def on_done(self) -> None:
        self.emit("done")

    def on_error(self, exc) -> None:
        self.emit("error", exc)


def as_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, Overloaded):
        return APIError(503, str(exc), headers={"Retry-After": str(int(exc.retry_after + 0.999))})
    if isinstance(exc, UnknownTask):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, BackboneMismatch):
        return APIError(409, str(exc))
    if isinstance(exc, UserError):
        return APIError(400, str(exc).splitlines()[0])
    return APIError(500, f"{type(exc).__name__}: {exc}")


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def backbone_names(model_path: str) -> list[str]:
    """The bare backbone's model ids: its alias (when it is one) and its folder name."""
    from deltatune.backbone import MODEL_ALIASES, default_model_path
    from deltatune.gguf_cache import cache_root, smollm2_folder

    path = Path(model_path).resolve()
    aliases = []
    for alias, resolve in (("minilm", default_model_path), ("smollm2", smollm2_folder)):
        if alias == "smollm2" and (cache_root() / "gguf").resolve() not in path.parents:
            continue  # resolving it would convert the GGUF file
        try:
            if alias in MODEL_ALIASES and Path(resolve()).resolve() == path:
                aliases.append(alias)
        except Exception:  # noqa: BLE001, S112 - an alias whose package is missing is not this model
            continue
    return aliases + [path.name]


def mount_openai(app: FastAPI, server, scheduler: Scheduler, limits, admin, register) -> None:
    """Add the OpenAI-compatible routes and their error handling to the serve app (`admin`: its admin
    dependency; `register(name, path)`: its registration, as PUT /v1/tasks/NAME)."""
    engine = server.engine
    names = backbone_names(engine.model_path)
    tokenizer = engine.shared.tokenizer
    config = engine.shared.module.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def ours(request: Request) -> bool:
        return request.url.path in PATHS

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        if not ours(request):
            return await request_validation_exception_handler(request, exc)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}"))
        return error_response(APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if not ours(request):
            return await http_exception_handler(request, exc)
        return error_response(APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)))

    def resolve(model: str):
        task = engine.tasks.get(model)
        if task is not None:
            if task.kind != "generation":
                raise APIError(400, f"model '{model}' is a {task.kind} delta: classify with POST /v1/predict",
                               param="model", code="wrong_model_kind")
            return task
        if model in names or model == engine.model_path:
            return None
        raise APIError(404, f"the model '{model}' does not exist (GET /v1/models lists the served ones)",
                       param="model", code="model_not_found")

    def make_job(body: Sampled, prompts: list[list[int]], top: int | None, explicit_max: bool) -> OpenAIJob:
        stops = check_sampling(body, MAX_N)
        task = resolve(body.model)
        eos = tokenizer.eos_token_id
        seqs = []
        for p, ids in enumerate(prompts):
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + j
                sampling = Sampling(max_new_tokens=body.max_tokens or limits.max_new_tokens,
                                    temperature=body.temperature, top_p=body.top_p, seed=seed,
                                    stop_ids=() if eos is None else (eos,))
                try:
                    seq = scheduler.sequence(task, ids, sampling)
                except UserError as exc:
                    raise APIError(400, str(exc), param="model") from exc
                used = reserved(seq) - sampling.max_new_tokens
                if not ids or (context is not None and used >= context):
                    raise APIError(400, f"prompt {p} has {used} tokens (with the delta's soft tokens / prefix); the "
                                        f"model's context is {context}", param="messages" if top is None else "prompt",
                                   code="context_length_exceeded")
                room = limits.max_new_tokens if context is None else min(limits.max_new_tokens, context - used)
                if explicit_max and sampling.max_new_tokens > room:
                    raise APIError(400, f"max_tokens {sampling.max_new_tokens} is over {room}: the server's limit is "
                                        f"{limits.max_new_tokens}, the context {context} with {used} prompt tokens",
                                   param="max_tokens", code="context_length_exceeded")
                sampling.max_new_tokens = min(sampling.max_new_tokens, room)
                seqs.append(seq)
        job = OpenAIJob(task, seqs, asyncio.get_running_loop(), tokenizer, stops, top, sum(map(len, prompts)))
        try:
            return scheduler.submit(job)
        except Exception as exc:  # noqa: BLE001 - KV bound (503) or a request too large (400)
            raise as_api_error(exc) from exc

    async def events(job: OpenAIJob, request: Request | None) -> AsyncIterator[tuple]:
        """The job's events until it is done; a non-streamed request whose client left is cancelled."""
        deadline = time.monotonic() + limits.timeout_seconds
        checked = time.monotonic()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.queue.get(), 1.0)
                except TimeoutError:
                    event = None
                if time.monotonic() > deadline:
                    raise APIError(504, f"no result within {limits.timeout_seconds:.0f} s")
                if request is not None and time.monotonic() - checked > 1.0:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if event is None:
                    continue
                if event[0] == "error":
                    raise as_api_error(event[1])
                yield event
                if event[0] == "done":
                    return
        finally:
            if any(r is None for r in job.finished):
                scheduler.cancel(job)  # the client left (or timed out): its rows leave at the next step

    async def collect(job: OpenAIJob, request: Request) -> tuple[list[dict], dict]:
        k = len(job.seqs)
        out = [{"text": "", "logprobs": [], "finish_reason": None} for _ in range(k)]
        completion = 0
        async for event in events(job, request):
            if event[0] == "delta":
                out[event[1]]["text"] += event[2]
                if event[3] is not None:
                    out[event[1]]["logprobs"].append(event[3])
            elif event[0] == "finish":
                out[event[1]]["finish_reason"] = event[2]
                completion += event[3]
        return out, usage(job, completion)

    def usage(job: OpenAIJob, completion: int) -> dict:
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
                "total_tokens": job.prompt_tokens + completion}

    async def stream(job: OpenAIJob, chat: bool, model: str, include_usage: bool) -> AsyncIterator[str]:
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model, "object": "chat.completion.chunk" if chat else "text_completion"}
        extra = {"usage": None} if include_usage else {}
        offsets, completion = [0] * len(job.seqs), 0

        def chunk(choices: list[dict], **fields) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **extra, **fields})}\n\n"

        def choice(i: int, text: str | None, logprobs, reason: str | None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": i, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs},
                        "finish_reason": reason}
            legacy = None if logprobs is None else legacy_logprobs(logprobs, offsets[i])
            return {"index": i, "text": text or "", "logprobs": legacy, "finish_reason": reason}

        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(job.seqs))])
            async for event in events(job, None):
                if event[0] == "delta" and (event[2] or event[3] is not None):
                    yield chunk([choice(event[1], event[2], None if event[3] is None else [event[3]], None)])
                    offsets[event[1]] += len(event[2])
                elif event[0] == "finish":
                    completion += event[3]
                    yield chunk([choice(event[1], None, None, event[2])])
            if include_usage:
                yield chunk([], usage=usage(job, completion))
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"

    async def answer(request: Request, body: Sampled, job: OpenAIJob, chat: bool):
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(job, chat, body.model, include), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        out, counts = await collect(job, request)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                        "logprobs": {"content": c["logprobs"]} if job.top is not None else None,
                        "finish_reason": c["finish_reason"]} for i, c in enumerate(out)]
        else:
            choices = [{"index": i, "text": c["text"], "finish_reason": c["finish_reason"],
                        "logprobs": legacy_logprobs(c["logprobs"], 0) if job.top is not None else None}
                       for i, c in enumerate(out)]
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body.model, "choices": choices, "usage": counts}

    @app.post("/v1/chat/completions", summary="OpenAI chat completions with a served delta")
    async def chat_completions(body: ChatBody, request: Request):
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        top = None
        if body.logprobs:
            top = body.top_logprobs or 0
            if not 0 <= top <= 20:
                raise APIError(400, "top_logprobs must be between 0 and 20", param="top_logprobs")
        elif body.top_logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        resolve(body.model)  # 404 / 400 before the prompt is rendered
        job = make_job(body, [render_chat(tokenizer, body.messages)], top, body.max_tokens is not None)
        return await answer(request, body, job, chat=True)

    @app.post("/v1/completions", summary="OpenAI completions (raw prompt) with a served delta")
    async def completions(body: CompletionBody, request: Request):
        if body.echo or body.suffix or (body.best_of or 1) != 1:
            raise APIError(400, "echo, suffix and best_of are not supported by this server")
        if body.logprobs is not None and not 0 <= body.logprobs <= 5:
            raise APIError(400, "logprobs must be between 0 and 5", param="logprobs")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or len(prompts) * body.n > MAX_N:
            raise APIError(400, f"give 1 to {MAX_N} prompts (times n)", param="prompt")
        resolve(body.model)
        ids = [raw_ids(tokenizer, p) for p in prompts]
        job = make_job(body, ids, body.logprobs, "max_tokens" in body.model_fields_set)
        return await answer(request, body, job, chat=False)

    @app.get("/v1/models", summary="The bare backbone and every served delta (OpenAI's model list)")
    def models() -> dict:
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "deltatune",
                 "root": engine.model_path, "parent": None, "kind": "backbone"} for name in names]
        for task in list(engine.tasks.values()):
            data.append({"id": task.name, "object": "model", "created": created, "owned_by": "deltatune",
                         "root": task.path, "parent": names[0], "kind": task.kind, "method": task.method})
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(admin)], response_class=PlainTextResponse,
              summary="Serve a delta of any kind by path (vLLM's shape; admin)")
    def load_adapter(body: LoadBody) -> str:
        if body.lora_name in engine.tasks:
            raise APIError(400, f"the adapter '{body.lora_name}' is already loaded", param="lora_name")
        try:
            register(body.lora_name, body.lora_path)
        except UserError as exc:
            raise as_api_error(exc) from exc
        return f"Success: adapter '{body.lora_name}' added successfully."

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(admin)], response_class=PlainTextResponse,
              summary="Stop serving a delta (vLLM's shape; admin)")
    def unload_adapter(body: UnloadBody) -> str:
        try:
            server.unregister(body.lora_name)
        except UserError as exc:
            raise as_api_error(exc) from exc
        return f"Success: adapter '{body.lora_name}' removed successfully."
