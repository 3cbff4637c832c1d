"""icl: in-context learning with a frozen decoder (Brown et al. 2020) — no parameter is trained.

    [task description] [k demonstrations: template filled with input + label word] [query] -> label word?

    prediction = argmax_y Σ_j log p(l_y,j | prompt, l_y,<j)    over each label's verbalizer tokens

Demonstrations are random (seeded) or retrieved (nearest training examples by MiniLM embedding);
calibration (Zhao et al. 2021) is an option. The shared prefix's K/V is computed once. The "delta" is
delta.json: template, verbalizer, the chosen demonstrations (and DELTA/index/ for retrieval).
The code lives in deltatune/notune/ (icl.py, prompts.py, scoring.py) and deltatune/data/templates.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from deltatune.backbone import TaskModel
from deltatune.data.templates import PromptSpec, prompt_spec
from deltatune.options import option

NAME = "icl"
DEFAULT_LR = 0.0


@dataclass
class Config:
    shots: int = option(0, ge=0)
    """Demonstrations in the prompt: 0 (zero-shot), 1 (one-shot) or k (few-shot)."""
    demos: str = option("random", choices=("random", "retrieved"))
    """How demonstrations are chosen: random (seeded, one shared prompt prefix) or retrieved (nearest by embedding)."""
    template: str | None = None
    """Prompt template with {text} and {label}; None: the task's built-in one."""
    verbalizer: str | None = None
    """LABEL=WORD,... ; None: the task's built-in words (a data file: its label names)."""
    calibrate: bool = False
    """Contextual calibration: divide by the label probabilities of content-free inputs."""
    description: bool = True
    """Start the prompt with the task's one-sentence description."""
    max_prompt_tokens: int = option(2048, ge=1)
    """Prompt budget in tokens (also capped by the model's context window)."""
    demo_max_tokens: int = option(128, ge=1)
    """Each demonstration's input is cut to this many tokens."""
    encoder: str | None = None
    """Encoder for retrieved demonstrations (default: all-MiniLM-L6-v2)."""


def apply(task_model: TaskModel, config: Config) -> None:
    """Nothing to add: icl has no parameters; it predicts through its strategy (`run_job`), not this model."""


def run_job(job, config: Config, out) -> dict:
    """The workflow hook of no-tuning methods: build the prompt, test, save (deltatune/notune/job.py)."""
    from deltatune.notune.job import run_strategy_job

    return run_strategy_job(job, sys.modules[__name__], config, out)


def make_strategy(config: Config, context):
    from deltatune.notune.icl import ICL
    from deltatune.notune.scoring import load_language_model

    lm = load_language_model(context.model, context.device, context.train.seed)
    if context.saved:
        spec = PromptSpec.from_dict(context.saved["prompt"], context.label_names)
    else:
        spec = prompt_spec(context.task_name, context.label_names,
                           context.description if config.description else "", config.template,
                           config.verbalizer, context.pair)
    train = context.train
    return ICL(lm, spec, config, train.eval_batch_size, train.precision, train.length_for("classification"), progress=train.progress)
