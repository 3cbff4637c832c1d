"""`deltatune serve`: the registry's tasks over HTTP, on one frozen backbone."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

from deltatune.errors import UserError
from deltatune.options import AtLeastOne, TCPPort, option
from deltatune.serve.app import Limits


@dataclass
class Batching:
    max_batch_size: int = option(32, ge=1)
    """Rows per batch: a batch forms as soon as this many rows are queued."""
    max_wait_ms: float = option(5.0, ge=0)
    """Or this long after the oldest queued request arrived."""
    max_queue: int = option(256, ge=1)
    """Rows the queue holds; a request that does not fit answers 503 with Retry-After."""
    pass_overhead_tokens: int = option(128, ge=0)
    """Split a batch's mixed pass into passes of similar lengths when that saves more padded token
    positions than this per extra pass (0: always one pass; on a GPU, where padding is cheap, raise it)."""


ADMIN_TOKEN = "DELTATUNE_ADMIN_TOKEN"


def check_port(host: str, port: int) -> None:
    """A one-line UserError when host:port cannot be listened on (a port in use), bound as uvicorn binds."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: old TIME_WAIT sockets do not count
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise UserError(f"cannot listen on {host}:{port}: {reason} (another server there? choose another "
                            "--port)") from exc


def serve(*, registry: str, port: TCPPort = 8000, model: str | None = None, host: str = "127.0.0.1",
          device: str = "auto", batching: Batching, limits: Limits, threads: AtLeastOne | None = None,
          quantize: str | None = None) -> int:
    """Serve many task deltas on one frozen backbone over HTTP (admin token: $DELTATUNE_ADMIN_TOKEN).

    Args:
        registry: Registry directory (delta copies + catalog.sqlite); created if missing, kept across restarts.
        port: TCP port.
        model: Backbone folder or alias (default: the registry's model, else the packaged all-MiniLM-L6-v2).
        host: Interface to bind; the default keeps the server to this machine.
        device: auto, cpu or cuda.
        threads: torch intra-op threads (default: torch's choice).
        quantize: Store the shared backbone quantised: nf4, fp4, int8, 3bit, 2bit, q4_1 (deltas trained on another
            kind are refused; full-precision deltas load with a warning).
    """
    import uvicorn

    from deltatune.runtime import set_threads
    from deltatune.serve.app import create_app
    from deltatune.serve.batcher import Batcher
    from deltatune.serve.engine import Engine
    from deltatune.serve.registry import Registry
    from deltatune.serve.server import Server

    if limits.max_items > batching.max_queue:
        raise UserError(f"--max-items {limits.max_items} exceeds --max-queue {batching.max_queue}: "
                        "such a request could never be queued")
    check_port(host, port)  # before the model loads and the banner prints
    set_threads(threads)
    store = Registry(registry)
    engine = Engine(model or store.setting("model"), device=device,
                    pass_overhead_tokens=batching.pass_overhead_tokens or None, quantize=quantize)
    store.set_setting("model", engine.model_path)
    server = Server(engine, store, os.environ.get(ADMIN_TOKEN))
    for warning in server.load_registry():
        print(f"deltatune serve: warning: {warning}", file=sys.stderr)
    server.watch()  # replicas sharing the registry: another's admin changes are served within seconds
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
