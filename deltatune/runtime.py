"""Process-wide runtime settings a command applies before it loads anything (below every other layer)."""

from __future__ import annotations

import torch


def set_threads(threads: int | None) -> None:
    """--threads: torch's intra-op threads for this process (None or 0: torch's default)."""
    if threads:
        torch.set_num_threads(threads)
