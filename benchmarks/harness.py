"""Shared benchmark machinery: interleaved timing rounds in one process, peak memory per variant in a child.

Timing: every variant is built once, warmed up, then the variants take turns (round-robin), each
round running `steps` training steps; the median round gives tokens/s. Interleaving spreads any
background noise over all variants alike. Memory: each variant runs alone in a fresh child process
(3 steps) and reports its peak resident memory above the process's baseline before the model was
built, so earlier variants' freed memory cannot hide a later one's peak.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from deltatune.memory import PeakMemory, rss_mb

StepFn = Callable[[], None]


def time_interleaved(builders: dict[str, Callable[[], StepFn]], rounds: int = 5, steps: int = 3,
                     warmup: int = 2) -> dict[str, float]:
    """Median seconds per step for each variant, measured round-robin."""
    step_fns = {}
    for name, build in builders.items():
        step_fns[name] = build()
        for _ in range(warmup):
            step_fns[name]()
    per_round: dict[str, list[float]] = {name: [] for name in builders}
    for _ in range(rounds):
        for name, step in step_fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            per_round[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(times) for name, times in per_round.items()}


def memory_in_child(script: str, variant: str, extra_args: list[str]) -> dict:
    """Run `script --memory-child VARIANT` in a fresh process; it prints a JSON dict."""
    proc = subprocess.run([sys.executable, script, "--memory-child", variant, *extra_args],
                          capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory_here(build: Callable[[], StepFn], steps: int = 3) -> dict:
    baseline = rss_mb()
    with PeakMemory() as peak:
        step = build()
        for _ in range(steps):
            step()
    return {"peak_mb": peak.peak_mb, "increase_mb": peak.peak_mb - baseline,
            "cuda_peak_mb": peak.cuda_peak_mb}


def cpu_model() -> str:
    """The CPU's model name (speed figures are recorded with the chip they ran on)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def matmul_peak(dtype: torch.dtype, hidden: int, rows: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of an (rows x H) @ (H x 4H) matmul (the FFN's shape) on this process's threads: the chip's
    peak as a step sees it, printed beside every speed figure."""
    a = torch.randn(rows, hidden).to(dtype)  # (rows, H)
    b = torch.randn(hidden, 4 * hidden).to(dtype)  # (H, 4H)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * rows * hidden * 4 * hidden * count / (time.perf_counter() - start) / 1e9


def machine_note() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
            f"load average at start {load:.2f}")


def wait_for_server(command: list[str], env: dict, port: int, timeout_s: float = 300):
    """Start `deltatune serve ...` as a child and return it once /healthz answers 200 on 127.0.0.1."""
    import subprocess

    import httpx

    process = subprocess.Popen(command, env={**os.environ, **env})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("server did not start")


def random_generation_delta(model: str, kind: str, options: dict, name: str, seed: int, out) -> None:
    """A generation delta of `kind` whose trainable tensors are moved off their start (speed benchmarks
    need deltas that change the output, not trained ones), saved with this checkout's `save_delta`."""
    from deltatune.backbone import load_task_model
    from deltatune.delta import save_delta
    from deltatune.methods import resolve_method

    torch.manual_seed(seed)
    method, config = resolve_method(kind, dict(options))
    tm = load_task_model(model, 0, pooling="lm")
    method.apply(tm, config)
    with torch.no_grad():
        for p in tm.module.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    meta = {"task": {"name": name, "kind": "generation", "label_names": []},
            "train_config": {"max_length": 256}, "metrics": {}, "head_names": tm.head_names}
    save_delta(out, tm, method, config, meta)
