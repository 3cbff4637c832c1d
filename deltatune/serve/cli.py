"""`deltatune serve`: the registry's tasks over HTTP, on one frozen backbone."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from deltatune.errors import UserError
from deltatune.serve.app import Limits


@dataclass
class Batching:
    max_batch_size: int = 32
    """Rows per batch: a batch forms as soon as this many rows are queued."""
    max_wait_ms: float = 5.0
    """Or this long after the oldest queued request arrived."""
    max_queue: int = 256
    """Rows the queue holds; a request that does not fit answers 503 with Retry-After."""
    pass_overhead_tokens: int = 128
    """Split a batch's mixed pass into passes of similar lengths when that saves more padded token
    positions than this per extra pass (0: always one pass; on a GPU, where padding is cheap, raise it)."""


ADMIN_TOKEN = "DELTATUNE_ADMIN_TOKEN"


def serve(*, registry: str, port: int = 8000, model: str | None = None, host: str = "127.0.0.1",
          device: str = "auto", batching: Batching, limits: Limits, threads: int | None = None) -> int:
    """Serve many task deltas on one frozen backbone over HTTP (admin token: $DELTATUNE_ADMIN_TOKEN).

    Args:
        registry: Registry directory (delta copies + catalog.sqlite); created if missing, kept across restarts.
        port: TCP port.
        model: Backbone folder or alias (default: the registry's model, else the packaged all-MiniLM-L6-v2).
        host: Interface to bind; the default keeps the server to this machine.
        device: auto, cpu or cuda.
        threads: torch intra-op threads (default: torch's choice).
    """
    import uvicorn

    from deltatune.serve.app import create_app
    from deltatune.serve.batcher import Batcher
    from deltatune.serve.engine import Engine
    from deltatune.serve.registry import Registry
    from deltatune.serve.server import Server
    from deltatune.workflow import set_threads

    if limits.max_items > batching.max_queue:
        raise UserError(f"--max-items {limits.max_items} exceeds --max-queue {batching.max_queue}: "
                        "such a request could never be queued")
    if not 0 < port < 65536:
        raise UserError(f"--port {port} is not a TCP port")
    set_threads(threads)
    store = Registry(registry)
    engine = Engine(model or store.setting("model"), device=device,
                    pass_overhead_tokens=batching.pass_overhead_tokens or None)
    store.set_setting("model", engine.model_path)
    server = Server(engine, store, os.environ.get(ADMIN_TOKEN))
    for warning in server.load_registry():
        print(f"deltatune serve: warning: {warning}", file=sys.stderr)
    batcher = Batcher(engine, batching.max_batch_size, batching.max_wait_ms, batching.max_queue).start()
    app = create_app(server, batcher, limits)
    admin = "enabled" if server.admin_token else f"disabled (set {ADMIN_TOKEN})"
    print(f"deltatune serve: {len(engine.tasks)} tasks on {engine.model_path} at http://{host}:{port} "
          f"(admin endpoints {admin})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        batcher.stop()
    return 0
