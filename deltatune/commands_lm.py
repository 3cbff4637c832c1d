"""generate, import: one function per command; each signature is that command's flags."""

from __future__ import annotations

import json
import sys

from deltatune.errors import UserError


def generate(delta: str, prompts: list[str] = (), *, max_new_tokens: int = 64, sample: bool = False,
             temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, model: str | None = None,
             device: str = "auto", json_: bool = False, quantize: str | None = None, raw: bool = False) -> int:
    """Reply to prompts with a generation delta applied (greedy decoding unless --sample).

    Args:
        delta: Delta directory written by `deltatune train` on a generation task (e.g. chatterbot).
        prompts: Prompts; none given: read standard input, one prompt per line.
        max_new_tokens: Most tokens generated per reply.
        sample: Sample with --temperature and --top-p instead of greedy decoding.
        temperature: Sampling temperature (with --sample).
        top_p: Nucleus sampling mass (with --sample).
        seed: Random seed for sampling.
        model: Backbone folder, if not the one recorded in the delta.
        device: auto, cpu or cuda.
        json_: Print a JSON list of {prompt, reply}.
        quantize: Backbone storage: as the delta was trained (default), none (full precision), or nf4, fp4,
            int8, 3bit, 2bit, q4_1.
        raw: Give each prompt to the model as it is, without the chat template (a plain continuation).
    """
    from deltatune.backbone import pick_device
    from deltatune.delta import read_meta
    from deltatune.generation import generate_texts
    from deltatune.loading import load_delta

    meta = read_meta(delta)
    if meta["backbone"].get("pooling") != "lm":
        raise UserError(f"{delta} is a classification delta ({meta['task']['name']}): use `deltatune predict`")
    prompts = list(prompts) or [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not prompts:
        raise UserError("no prompt: give prompts as arguments or lines on standard input")
    loaded = load_delta(delta, model=model, device=pick_device(device), quantize=quantize)
    replies = generate_texts(loaded.task_model, prompts, max_new_tokens=max_new_tokens, sample=sample,
                             temperature=temperature, top_p=top_p, seed=seed, raw=raw)
    if json_:
        print(json.dumps([{"prompt": p, "reply": r} for p, r in zip(prompts, replies)], indent=2,
                         ensure_ascii=False))
    else:
        for reply in replies:
            print(reply)
    return 0


def import_peft(peft_dir: str, out: str, *, model: str | None = None, labels: str | None = None,
                quantize: str | None = None) -> int:
    """Import a peft adapter directory (adapter_config.json + adapter_model.safetensors) as a delta.

    Args:
        peft_dir: Directory written by peft's save_pretrained (LoRA, AdaLoRA, and the peft types of
            other methods that can read them).
        out: Output delta folder: a new path, an empty folder, or a delta deltatune wrote (replaced
            atomically); a file or any other folder is refused.
        model: Backbone folder or alias, if not the adapter's base_model_name_or_path.
        labels: Comma-separated label names for a classifier, when the peft directory has no
            config.json with id2label (default: label_0..K-1).
        quantize: The quantisation the adapter was trained on (a peft QLoRA adapter: the base loaded with
            BitsAndBytesConfig, 4-bit nf4 -> nf4, fp4 -> fp4, 8-bit -> int8); the delta records that quantised
            backbone. Default: none (the base as stored).
    """
    from deltatune.io import claim_output
    from deltatune.peft_format import import_peft as run_import

    claim_output(out, "delta")
    run_import(peft_dir, out, model=model, labels=labels, quantize=quantize)
    print(f"wrote {out} (delta imported from {peft_dir})")
    return 0


def evaluate_generation(delta: str, task, split: str, model: str | None, batch_size: int, precision: str,
                        device: str, quantize: str | None = None) -> tuple[dict, int]:
    """`deltatune eval` of a generation delta: (metrics: loss per answer token, perplexity, exact match,
    ROUGE-L, chrF and label accuracy of greedy replies; examples)."""
    from deltatune.backbone import pick_device
    from deltatune.config import GENERATION_MAX_LENGTH
    from deltatune.generation import encode_lm, evaluate_lm, is_seq2seq
    from deltatune.generation_metrics import generation_metrics
    from deltatune.loading import load_delta

    if task.kind != "generation":
        raise UserError(f"{delta} is a generation delta; task '{task.name}' has no target texts to score")
    loaded = load_delta(delta, model=model, device=pick_device(device), quantize=quantize)
    max_length = loaded.meta.get("train_config", {}).get("max_length") or GENERATION_MAX_LENGTH
    examples = getattr(task, split)
    rows = encode_lm(loaded.task_model.tokenizer, examples, max_length, split, seq2seq=is_seq2seq(loaded.task_model))
    metrics = evaluate_lm(loaded.task_model, rows, batch_size, precision)
    metrics.update(generation_metrics(loaded.task_model, examples))  # exact match, ROUGE-L, chrF, accuracy
    return metrics, len(rows)
