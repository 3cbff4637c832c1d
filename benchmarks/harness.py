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


def machine_note() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
            f"load average at start {load:.2f}")
