"""End to end over HTTP: `deltatune serve` in one process, a load generator in this one, on 127.0.0.1.

    .venv/bin/python benchmarks/serve_http.py [--tasks 16] [--concurrency 1,4,16,64,256] [--seconds 10]
                                              [--max-queue 64] [--threads 1]

The server serves N random MiniLM deltas (LoRA and soft prompts in turn), registered through the admin
API. At each concurrency level, that many closed-loop clients send one-text requests for random tasks
until the time is up (bounded: also at most --max-requests per level). Reported: requests/s answered
200, p50 / p99 latency of those, and how many were refused with 503 (the bounded queue: past saturation
the server sheds load at once instead of building a backlog, and its throughput holds).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import wait_for_server  # noqa: E402
from serve_engine import make_deltas  # noqa: E402

from deltatune.data import load_task  # noqa: E402

TOKEN = "benchmark-token"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(registry: Path, port: int, args) -> subprocess.Popen:
    command = [sys.executable, "-m", "deltatune", "serve", "--registry", str(registry), "--port", str(port),
               "--model", "minilm", "--threads", str(args.threads), "--max-queue", str(args.max_queue),
               "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)]
    return wait_for_server(command, {"DELTATUNE_ADMIN_TOKEN": TOKEN}, port)


async def level(url: str, tasks: list[str], texts: list[str], concurrency: int, seconds: float,
                max_requests: int) -> dict:
    latencies: list[float] = []
    codes: dict[int, int] = {}
    sent = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker(seed: int):
            nonlocal sent
            rng = random.Random(seed)
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                start = time.perf_counter()
                response = await client.post(f"/v1/tasks/{rng.choice(tasks)}/predict", json={"text": rng.choice(texts)})
                codes[response.status_code] = codes.get(response.status_code, 0) + 1
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                elif response.status_code == 503:
                    await asyncio.sleep(float(response.headers.get("Retry-After", 1)))  # as HTTP asks

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    pick = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000) if latencies else (
        lambda q: float("nan"))
    return {"ok_per_s": codes.get(200, 0) / elapsed, "p50_ms": pick(0.5), "p99_ms": pick(0.99),
            "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
            "ok": codes.get(200, 0), "rejected_503": codes.get(503, 0),
            "other": sum(v for k, v in codes.items() if k not in (200, 503))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--concurrency", default="1,4,16,64,256")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    texts = [e.text for e in load_task("rotten-tomatoes", test_size=500).test]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_deltas(Path(tmp) / "deltas", ["lora" if i % 2 == 0 else "prompt" for i in range(args.tasks)])
        port = free_port()
        server = start_server(Path(tmp) / "registry", port, args)
        url = f"http://127.0.0.1:{port}"
        try:
            names = []
            for i, path in enumerate(paths):
                name = f"{'lora' if i % 2 == 0 else 'prompt'}{i}"
                response = httpx.put(f"{url}/v1/tasks/{name}", json={"path": str(path)},
                                     headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
                response.raise_for_status()
                names.append(name)
            asyncio.run(level(url, names, texts, 4, 3.0, 200))  # warm-up
            print(f"# serve over HTTP: MiniLM, {len(names)} tasks (LoRA / soft prompts), one text per request, "
                  f"server --threads {args.threads} --max-batch-size {args.max_batch_size} --max-wait-ms "
                  f"{args.max_wait_ms} --max-queue {args.max_queue}; {args.seconds:.0f} s per level; cpus "
                  f"{os.cpu_count()}, load average at start {load:.2f}")
            print("| concurrency | requests/s (200) | p50 ms | p99 ms | answered 200 | refused 503 | other |")
            print("|---|---|---|---|---|---|---|")
            for concurrency in [int(c) for c in args.concurrency.split(",")]:
                r = asyncio.run(level(url, names, texts, concurrency, args.seconds, args.max_requests))
                print(f"| {concurrency} | {r['ok_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['ok']} | "
                      f"{r['rejected_503']} | {r['other']} |", flush=True)
            metrics = httpx.get(f"{url}/metrics").text
            print("\n" + "\n".join(line for line in metrics.splitlines()
                                   if line.startswith(("deltatune_batch_tasks_sum", "deltatune_batch_tasks_count",
                                                       "deltatune_batch_rows_sum", "deltatune_batch_rows_count",
                                                       "deltatune_passes_total", "deltatune_rejected_total"))))
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
