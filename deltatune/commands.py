"""train, eval, predict, export: one function per command; each signature is that command's flags."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from deltatune.commands_lm import evaluate_generation
from deltatune.config import TrainConfig
from deltatune.data import TaskArgs, TaskData
from deltatune.data.templates import PromptArgs, prompt_options
from deltatune.distributed import LaunchArgs
from deltatune.errors import UserError
from deltatune.generation_metrics import describe as describe_generation
from deltatune.io import claim_output
from deltatune.options import AtLeastOne, NonNegative

DEFAULT_TASK = "rotten-tomatoes"
"""`train`'s task when neither --task nor --data is given (as compare's)."""


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """`--set r=16 --set target_modules=query,value` -> {"r": "16", "target_modules": "query,value"}."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got '{pair}'")
        options[key.strip().replace("-", "_")] = value.strip()
    return options


def train(*, method: str = "lora", out: str, data: TaskArgs, training: TrainConfig, prompt: PromptArgs,
          model: str | None = None,
          pooling: str = "hf", unfreeze_last: NonNegative | None = None, set_: list[str] | None = None,
          threads: AtLeastOne | None = None, json_: bool = False, resume: str | None = None,
          launch: LaunchArgs) -> int:
    """Train one method on a task (default: rotten-tomatoes, as compare) and write its delta directory.

    Args:
        method: Adaptation method (features, head, last2, full, lora, bitfit, ...).
        out: Output delta folder: a new path, an empty folder, or a delta deltatune wrote (replaced
            atomically); a file or any other folder is refused before training.
        model: Hugging Face model folder or alias (default: the packaged all-MiniLM-L6-v2).
        pooling: hf (transformers' own head, the default: peft-exportable), mean, cls, last, or auto (the model's
            sentence-transformers pooling if it declares one, else hf).
        unfreeze_last: With head: also train the last N transformer layers.
        set_: Method option KEY=VALUE, e.g. r=16 or target_modules=query,key,value.
        threads: torch intra-op threads (default: torch's choice).
        json_: Print the metrics as JSON.
        resume: Continue a killed run from OUT's newest complete checkpoint (--resume OUT) or from
            OUT/checkpoints/step-N, with the same settings (written with --save-steps).
    """
    from deltatune import cli, distributed
    from deltatune.methods import resolve_method
    from deltatune.runtime import set_threads
    from deltatune.workflow import TrainJob, run_train_job

    claim_output(out, "delta")
    if launch.nproc is not None or launch.nnodes > 1:  # torchrun starts N of this command (docs/scaling.md)
        return distributed.launch(distributed.strip_launch_flags(cli.ARGV), launch, "train")
    set_threads(threads)
    prompt_opts, prompt = prompt_options(resolve_method(method)[0], prompt)  # icl/knn options; --objective
    options = {**prompt_opts, **parse_options(set_)}
    if unfreeze_last is not None:
        options["unfreeze_last"] = unfreeze_last
    resolve_method(method, options)  # every option within its range before the data loads
    task = data.load(training.seed, default_task=DEFAULT_TASK)  # chatterbot: an LM trained on the answers
    main = distributed.rank_in_environment() == 0
    if main:
        print(task.summary(), file=sys.stderr)
    metrics = run_train_job(TrainJob(method=method, task=task, model=model, pooling=pooling,
                                     options=options, train=training, prompt=prompt, resume=resume), out)
    if not main:
        return 0  # rank 0 reports
    quality = (f"test loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}" if "loss" in metrics
               else f"test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}")
    if "loss" in metrics and "rouge_l" in metrics:
        from deltatune.generation_metrics import describe

        quality += ", " + describe(metrics)
    return print_metrics(metrics, json_, lambda: (
        f"{method}: {quality}, "
        f"{metrics['trainable_params']:,} trainable parameters ({metrics['trainable_pct']:.3f}%), "
        f"{metrics['train_seconds']:.1f} s; delta written to {out} ({metrics['delta_bytes']:,} bytes)"))


def print_metrics(metrics: dict, json_: bool, summary: Callable[[], str]) -> int:
    """A command's result: the metrics as JSON (--json) or its one-line summary; the exit code (0)."""
    print(json.dumps(metrics, indent=2) if json_ else summary())
    return 0


def print_eval(metrics: dict, meta: dict, task: TaskData, split: str, examples: int, json_: bool,
               scores: Callable[[], str]) -> int:
    """`deltatune eval`'s output: the metrics tagged with task, split, example count and method; `scores`
    gives the summary's quality part (accuracy, or loss of a generation delta)."""
    metrics.update(task=task.name, split=split, examples=examples, method=meta["method"])
    return print_metrics(metrics, json_, lambda: (
        f"{meta['method']} on {task.name}/{split} ({examples} examples): {scores()}, "
        f"{metrics['inference_ms_per_example']:.2f} ms/example"))


def evaluate(delta: str, *, data: TaskArgs, split: str = "test", model: str | None = None,
             batch_size: AtLeastOne = 64, precision: str = "fp32", device: str = "auto", progress: bool = True,
             json_: bool = False, quantize: str | None = None) -> int:
    """Evaluate a delta on a task's split (default: the delta's own task).

    Args:
        delta: Delta directory written by `deltatune train`.
        split: Which split to evaluate: train, validation or test.
        model: Backbone folder, if not the one recorded in the delta.
        batch_size: Evaluation batch size.
        precision: fp32 or bf16.
        device: auto, cpu or cuda.
        progress: Show a progress bar (on stderr).
        json_: Print the metrics as JSON.
        quantize: Backbone storage: as the delta was trained (default), none (full precision), or nf4, fp4, int8, 3bit, 2bit, q4_1.
    """
    from deltatune.backbone import pick_device
    from deltatune.batching import encode
    from deltatune.delta import read_meta
    from deltatune.evaluate import evaluate as run_eval
    from deltatune.loading import load_delta, load_strategy
    from deltatune.notune.job import strategy_metrics

    meta = read_meta(delta)
    task = data.load(default_task=meta["task"]["name"] if not (data.task or data.data) else None)
    if split not in ("train", "validation", "test"):
        raise UserError(f"--split must be train, validation or test, not '{split}'")
    if meta["backbone"].get("pooling") == "lm":  # a generation delta: loss and perplexity of the answers
        metrics, examples = evaluate_generation(delta, task, split, model, batch_size, precision, device, quantize)
        return print_eval(metrics, meta, task, split, examples, json_,
                          lambda: f"loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}, "
                                  + describe_generation(metrics))
    examples = remap_labels(getattr(task, split), task.label_names, meta["task"]["label_names"])
    strategy = load_strategy(delta, meta, model, pick_device(device), precision, batch_size)  # icl, knn
    if strategy is not None:
        metrics, rows = strategy_metrics(strategy, examples, meta["num_labels"]), examples
    else:
        loaded = load_delta(delta, model=model, device=pick_device(device), quantize=quantize)
        max_length = meta.get("train_config", {}).get("max_length", 128)
        rows = encode(loaded.task_model.tokenizer, examples, max_length, split)
        metrics = run_eval(loaded.task_model, rows, batch_size, precision, progress=progress)
    return print_eval(metrics, meta, task, split, len(rows), json_,
                      lambda: f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}")


def remap_labels(examples, data_labels: list[str], delta_labels: list[str]):
    """Re-index labels from the data's label order to the delta's; unknown labels are an error."""
    from dataclasses import replace

    index = {name: i for i, name in enumerate(delta_labels)}
    unknown = sorted(set(data_labels) - set(index))
    if unknown:
        raise UserError(f"label '{unknown[0]}' is not one of the delta's labels ({', '.join(delta_labels)})")
    return [replace(e, label=index[data_labels[e.label]]) for e in examples]


def predict(delta: str, texts: list[str] = (), *, file: str | None = None, model: str | None = None,
            batch_size: AtLeastOne = 64, device: str = "auto", json_: bool = False, quantize: str | None = None) -> int:
    """Predict labels for texts given as arguments, in a file (one per line), or on stdin.

    Args:
        delta: Delta directory written by `deltatune train`.
        texts: Texts to classify; none given: read --file or standard input, one text per line.
        file: A file with one text per line.
        model: Backbone folder, if not the one recorded in the delta.
        batch_size: Batch size.
        device: auto, cpu or cuda.
        json_: Print a JSON list of {text, label, probabilities}.
        quantize: Backbone storage: as the delta was trained (default), none (full precision), or nf4, fp4, int8, 3bit, 2bit, q4_1.
    """
    from deltatune.backbone import pick_device
    from deltatune.data.files import read_text
    from deltatune.delta import read_meta
    from deltatune.loading import load_delta, load_strategy
    from deltatune.notune.job import predict_with_strategy
    from deltatune.predict import check_texts, predict_texts

    texts = list(texts)
    check_texts(texts)  # `predict ""`: nothing to classify
    if not texts:
        lines = read_text(file).splitlines() if file else sys.stdin.read().splitlines()  # strict UTF-8, as --data
        texts = [line for line in lines if line.strip()]
    if not texts:
        raise UserError("no text to predict: give texts as arguments, --file, or lines on stdin")
    meta = read_meta(delta)
    if meta["backbone"].get("pooling") == "lm":
        raise UserError(f"{delta} is a generation delta: use `deltatune generate`")
    strategy = load_strategy(delta, meta, model, pick_device(device), batch_size=batch_size)  # icl, knn
    if strategy is not None:
        results = predict_with_strategy(strategy, texts, meta["task"]["label_names"])
    else:
        results = predict_texts(load_delta(delta, model=model, device=pick_device(device), quantize=quantize),
                                texts, batch_size)
    if json_:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        for r in results:
            probs = " ".join(f"{k}={v:.3f}" for k, v in r["probabilities"].items())
            print(f"{r['label']}\t{probs}\t{r['text']}")
    return 0


def export(delta: str, out: str, *, format: str = "peft") -> int:  # noqa: A002 - the flag is --format
    """Export a delta: a peft adapter, or a transformers model folder with the delta merged into its weights.

    Args:
        delta: Delta directory written by `deltatune train`.
        out: Output folder: a new path, an empty folder, or an export of the same format deltatune wrote
            (replaced atomically); a file or any other folder is refused.
        format: peft (adapter_config.json + adapter_model.safetensors) or merged (config.json, model.safetensors
            and the tokenizer: loads with transformers' Auto classes; LoRA, AdaLoRA, IA3, BitFit, full, head).
    """
    if format not in ("peft", "merged"):
        raise UserError(f"unknown export format '{format}': supported: peft, merged")
    claim_output(out, format)
    if format == "merged":
        from deltatune.delta import read_meta
        from deltatune.export_merged import check_mergeable, export_merged

        check_mergeable(delta, read_meta(delta))  # refused before the model loads
        export_merged(delta, out)
        print(f"wrote {out} (transformers model with the {read_meta(delta)['method']} delta merged)")
        return 0
    from deltatune.peft_format import export_peft

    export_peft(delta, out)
    print(f"wrote {out} (peft format)")
    return 0
