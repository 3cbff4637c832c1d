"""The HTTP API (FastAPI): many tasks on one frozen backbone, requests for different tasks batched together.

    POST   /v1/predict                 {"items": [{"task", "text"}, ...]}  -> {"results": [{task, label,
                                                                               probabilities}, ...]}
    POST   /v1/tasks/{task}/predict    {"text": ...} or {"texts": [...]}    -> the same shape
    POST   /v1/generate                {"items": [{"task", "text"}], "max_new_tokens"} (generation tasks)
    GET    /v1/tasks                   the served tasks: method, labels, metrics, group
    PUT    /v1/tasks/{task}            {"path": DELTA_DIR}   admin (Bearer DELTATUNE_ADMIN_TOKEN)
    DELETE /v1/tasks/{task}                                  admin
    GET    /healthz, /metrics (Prometheus text), / (page: try tasks, chat with deltas), /docs, /openapi.json
    POST   /v1/chat/completions, /v1/completions, GET /v1/models, POST /v1/(un)load_lora_adapter
                                       OpenAI-compatible, continuous batching (openai_api.py, scheduler.py)

Errors answer {"detail": "one line"}: 404 unknown task, 413 body too large, 422 bad input or limits,
409 a delta for another backbone, 401/403 admin refused, 503 + Retry-After when the queue is full.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from deltatune.errors import UserError
from deltatune.options import option
from deltatune.predict import check_texts
from deltatune.serve.batcher import Batcher, Overloaded
from deltatune.serve.engine import UnknownTask
from deltatune.serve.server import Server
from deltatune.serve.task import BackboneMismatch

PAGE = Path(__file__).with_name("page.html")


@dataclass
class Limits:
    max_items: int = option(64, ge=1)
    """Items per request (texts or predict items)."""
    max_text_chars: int = option(4000, ge=1)
    """Characters per text."""
    max_body_bytes: int = option(1_000_000, ge=1)
    """Request body size."""
    max_new_tokens: int = option(128, ge=1)
    """Generation: tokens per reply."""
    timeout_seconds: float = option(120.0, gt=0)
    """A queued request that has not finished by then answers 504."""
    max_kv_tokens: int = option(65536, ge=1)
    """Generation (OpenAI endpoints): KV-cache token slots of all running requests; past it, 503."""


class Item(BaseModel):
    task: str = Field(description="Name of a served task.")
    text: str = Field(description="The text to classify (or, for a generation task, the prompt).")


class PredictBody(BaseModel):
    items: list[Item] = Field(description="Items of any tasks, mixed; results come back in this order.")


class TaskPredictBody(BaseModel):
    text: str | None = Field(None, description="One text.")
    texts: list[str] | None = Field(None, description="Several texts (instead of `text`).")


class Result(BaseModel):
    task: str
    label: str
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    results: list[Result]


class GenerateBody(BaseModel):
    items: list[Item]
    max_new_tokens: int = Field(32, description="Most tokens generated per reply (greedy decoding).")


class Reply(BaseModel):
    task: str
    text: str


class GenerateResponse(BaseModel):
    results: list[Reply]


class RegisterBody(BaseModel):
    path: str = Field(description="A delta directory on the server (written by `deltatune train`).")


OFFLINE_NOTE = ('<p style="font-family: sans-serif; margin: 1em">This page loads Swagger UI from a CDN '
                '(cdn.jsdelivr.net): without network access it stays blank. The API description it shows is '
                'served by this server: <a href="/openapi.json">/openapi.json</a>.</p>')
"""No package here ships the Swagger UI assets, and deltatune takes no network dependency: the page says so."""


def docs_page(title: str) -> HTMLResponse:
    """FastAPI's Swagger UI page for /openapi.json, with a visible note that it needs the network."""
    html = get_swagger_ui_html(openapi_url="/openapi.json", title=f"{title} - API").body.decode()
    return HTMLResponse(html.replace("<body>", "<body>" + OFFLINE_NOTE, 1))


def check_servable(path: str) -> None:
    """icl / knn deltas hold an index or a prompt, not weights on the backbone: a one-line 422 that says so."""
    from deltatune.delta import read_meta
    from deltatune.methods import REGISTRY

    name = read_meta(path).get("method")
    if name in REGISTRY and REGISTRY[name].runs_own_job:
        raise UserError(f"{path} is a {name} delta: {name} predicts through its own pipeline (a saved index or "
                        f"prompt run by `deltatune predict`), not through weights on the shared backbone, so it "
                        f"cannot be served; use `deltatune predict {path} TEXT`")


def error_status(exc: Exception) -> int:
    if isinstance(exc, UnknownTask):
        return 404
    if isinstance(exc, BackboneMismatch):
        return 409
    return 422 if isinstance(exc, UserError) else 500


def create_app(server: Server, batcher: Batcher, limits: Limits | None = None) -> FastAPI:
    from deltatune.serve.openai_api import mount_openai
    from deltatune.serve.scheduler import Scheduler

    limits = limits or Limits()
    scheduler = Scheduler(server.engine, limits.max_kv_tokens)
    metrics = batcher.metrics
    app = FastAPI(title="deltatune serve", version="1", docs_url=None,
                  description="Many task deltas on one frozen backbone; requests for different tasks share a batch.")
    bearer = HTTPBearer(auto_error=False, description="DELTATUNE_ADMIN_TOKEN, set when the server started")

    def admin(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not server.admin_token:
            raise HTTPException(403, "admin endpoints are disabled: start the server with DELTATUNE_ADMIN_TOKEN set")
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(),
                                                          server.admin_token.encode()):
            raise HTTPException(401, "admin endpoints need 'Authorization: Bearer <DELTATUNE_ADMIN_TOKEN>'",
                                headers={"WWW-Authenticate": "Bearer"})

    def register(task: str, path: str) -> dict:
        """PUT /v1/tasks/NAME and POST /v1/load_lora_adapter: checked, built, persisted, served."""
        check_servable(path)
        return server.register(task, path)

    def check(items: list[tuple[str, str]]) -> None:
        if not items:
            raise HTTPException(422, "no items: give at least one text")
        if len(items) > limits.max_items:
            metrics.rejected.inc(reason="items")
            raise HTTPException(422, f"{len(items)} items in one request; the limit is {limits.max_items}")
        try:
            check_texts([text for _, text in items], "text of item", first=0)  # the CLI's rule: no empty text
        except UserError as exc:
            raise HTTPException(422, str(exc)) from exc
        for i, (task, text) in enumerate(items):
            if len(text) > limits.max_text_chars:
                metrics.rejected.inc(reason="text_length")
                raise HTTPException(422, f"text of item {i} has {len(text)} characters; the limit is "
                                         f"{limits.max_text_chars}")
            if task not in server.engine.tasks:
                raise HTTPException(404, f"unknown task '{task}'")

    async def run(kind: str, items: list[tuple]) -> list[dict]:
        try:
            future = batcher.submit(kind, items)
        except Overloaded as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": str(int(exc.retry_after + 0.999))}) from exc
        try:
            results = await asyncio.wait_for(asyncio.wrap_future(future), limits.timeout_seconds)
        except TimeoutError as exc:
            raise HTTPException(504, f"no result within {limits.timeout_seconds:.0f} s") from exc
        for result in results:
            if isinstance(result, Exception):
                raise HTTPException(error_status(result), str(result).splitlines()[0] if str(result) else
                                    type(result).__name__)
        return results

    async def classify(items: list[tuple[str, str]]) -> dict:
        check(items)
        results = await run("classify", items)
        return {"results": [{k: r[k] for k in ("task", "label", "probabilities")} for r in results]}

    @app.post("/v1/predict", response_model=PredictResponse, summary="Classify items of any tasks, mixed")
    async def predict(body: PredictBody) -> dict:
        return await classify([(item.task, item.text) for item in body.items])

    @app.post("/v1/tasks/{task}/predict", response_model=PredictResponse, summary="Classify texts with one task")
    async def predict_task(task: str, body: TaskPredictBody) -> dict:
        if (body.text is None) == (body.texts is None):
            raise HTTPException(422, "give exactly one of 'text' or 'texts'")
        return await classify([(task, text) for text in ([body.text] if body.text is not None else body.texts)])

    @app.post("/v1/generate", response_model=GenerateResponse, summary="Reply with generation tasks, mixed")
    async def generate(body: GenerateBody) -> dict:
        if not 1 <= body.max_new_tokens <= limits.max_new_tokens:
            raise HTTPException(422, f"max_new_tokens must be between 1 and {limits.max_new_tokens}")
        items = [(item.task, item.text) for item in body.items]
        check(items)
        return {"results": await run("generate", [(t, text, body.max_new_tokens) for t, text in items])}

    @app.get("/v1/tasks", summary="The served tasks")
    def list_tasks() -> dict:
        return {"model": server.engine.model_path, "fingerprint": server.engine.fingerprint,
                "tasks": server.describe()}

    @app.put("/v1/tasks/{task}", dependencies=[Depends(admin)], summary="Register a delta directory (admin)")
    def put_task(task: str, body: RegisterBody) -> dict:
        try:
            return register(task, body.path)
        except UserError as exc:
            raise HTTPException(error_status(exc), str(exc)) from exc

    @app.delete("/v1/tasks/{task}", dependencies=[Depends(admin)], summary="Stop serving a task (admin)")
    def delete_task(task: str) -> dict:
        try:
            server.unregister(task)
        except UserError as exc:
            raise HTTPException(error_status(exc), str(exc)) from exc
        return {"deleted": task}

    @app.get("/healthz", summary="Liveness and what is served")
    def healthz() -> dict:
        return {"status": "ok", "tasks": len(server.engine.tasks), "queue_rows": batcher.queued_rows,
                "generation": scheduler.stats()}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    def prometheus() -> PlainTextResponse:
        for group in ("shared", "own"):
            metrics.tasks.set(sum(t.group == group for t in server.engine.tasks.values()), group=group)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> HTMLResponse:
        return docs_page(app.title)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    mount_openai(app, server, scheduler, limits, admin, register)
    app.router.on_shutdown.append(scheduler.stop)
    app.state.scheduler = scheduler
    return Guard(app, metrics, limits.max_body_bytes)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes")


class Guard:
    """ASGI wrapper: refuse bodies over the limit (413), count requests and time them (/metrics)."""

    def __init__(self, app: FastAPI, metrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    def __getattr__(self, name: str):  # app.openapi(), app.routes, ... stay reachable
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, received = time.perf_counter(), [500], [0]

        async def limited_receive():
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > self.max_body_bytes:  # FastAPI answers an HTTPException raised here
                self.metrics.rejected.inc(reason="body_size")
                raise BodyTooLarge(self.max_body_bytes)
            return message

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            self.metrics.rejected.inc(reason="body_size")
            too_large = BodyTooLarge(self.max_body_bytes)
            await JSONResponse({"detail": too_large.detail}, status_code=413)(scope, receive, recording_send)
        else:
            await self.app(scope, limited_receive, recording_send)
        endpoint = getattr(scope.get("route"), "path", "other")
        self.metrics.requests.inc(endpoint=endpoint, code=str(status[0]))
        self.metrics.latency.observe(time.perf_counter() - start, endpoint=endpoint)
