"""Tasks: built-in corpora or a user's data file, split once into fixed train/validation/test sets.

``load_task("rotten-tomatoes", train_size=2000)`` or ``load_task(data="reviews.csv")``. The corpus is
split 80/10/10 with a fixed seed (stratified by label), so the test set never changes between runs;
``seed`` only picks which examples a smaller ``train_size`` / ``val_size`` / ``test_size`` keeps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from deltatune.data import builtin
from deltatune.data.chat import FORMATS, Message, conversation, detect_format, last_user
from deltatune.data.files import labelled_rows, read_raw_rows, task_name_for_file
from deltatune.data.split import split_indices, subsample_indices
from deltatune.errors import UserError
from deltatune.options import option

CLASSIFICATION = "classification"
GENERATION = "generation"
SUMMARY_MAX_LABELS = 8


@dataclass
class Example:
    text: str
    label: int | None = None  # index into TaskData.label_names (classification)
    text_pair: str | None = None  # second text of a pair task, else None
    target: str | None = None  # response text for generation tasks (the last assistant turn)
    messages: tuple[Message, ...] | None = None  # a whole conversation (role, content), ending with the target
    where: str = ""  # "line 4" of a user's file: named when the row is refused
    group: str = ""  # a sub-task scored apart ("rotten-tomatoes/unseen phrasing" in the instruct task)

    def turns(self) -> list[Message]:
        """The conversation: `messages`, or one user turn (text) and its answer (target)."""
        if self.messages is not None:
            return list(self.messages)
        return [("user", self.text), ("assistant", self.target or "")]


@dataclass
class TaskData:
    name: str  # "rotten-tomatoes", "bbc-news", "chatterbot", or the file stem
    kind: str  # "classification" | "generation"
    label_names: list[str]  # sorted, stable order; [] for generation
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    description: str = ""  # one sentence describing the task, used for prompts
    source_format: str = ""  # a user file's format ("chat", "alpaca", ...), named in the summary

    def summary(self) -> str:
        """E.g. "rotten-tomatoes: 2 labels (fresh, rotten), train 2000 / val 500 / test 1000"."""
        sizes = f"train {len(self.train)} / val {len(self.validation)} / test {len(self.test)}"
        shown_format = f" ({self.source_format} format)" if self.source_format else ""
        if self.kind == GENERATION:
            return f"{self.name}: generation{shown_format}, {sizes}"
        shown = ", ".join(self.label_names[:SUMMARY_MAX_LABELS])
        if len(self.label_names) > SUMMARY_MAX_LABELS:
            shown += f", ... {len(self.label_names) - SUMMARY_MAX_LABELS} more"
        return f"{self.name}: {len(self.label_names)} labels ({shown}), {sizes}"


TaskLoader = Callable[[], tuple[list[Example], list[str], str, str]]


def labelled_examples(texts_and_labels: Sequence[tuple[str, str]]) -> tuple[list[Example], list[str]]:
    """Examples with label indices into the sorted label names."""
    label_names = sorted({label for _, label in texts_and_labels})
    label_index = {name: index for index, name in enumerate(label_names)}
    return [Example(text=text, label=label_index[label]) for text, label in texts_and_labels], label_names


def load_rotten_tomatoes() -> tuple[list[Example], list[str], str, str]:
    examples, label_names = labelled_examples(builtin.read_rotten_tomatoes())
    description = "Classify whether a movie review snippet is fresh (positive) or rotten (negative)."
    return examples, label_names, CLASSIFICATION, description


def load_bbc_news() -> tuple[list[Example], list[str], str, str]:
    examples, label_names = labelled_examples(builtin.read_bbc_news())
    description = (
        "Classify the topic of a BBC news article: business, entertainment, politics, sports or tech."
    )
    return examples, label_names, CLASSIFICATION, description


def load_chatterbot() -> tuple[list[Example], list[str], str, str]:
    examples = [Example(text=prompt, target=reply) for prompt, reply in builtin.read_chatterbot()]
    description = "Reply to a message in a casual conversation with a chatbot."
    return examples, [], GENERATION, description


def load_instruct() -> tuple[list[Example], list[str], str, str]:
    from deltatune.data.instruct import raw_examples

    description = "Follow an instruction: classify a review or a news article, or reply in a conversation."
    examples = [Example(text=text, target=target, group=group) for text, target, group in raw_examples()]
    return examples, [], GENERATION, description


BUILTIN_TASKS: dict[str, TaskLoader] = {
    "rotten-tomatoes": load_rotten_tomatoes,
    "bbc-news": load_bbc_news,
    "chatterbot": load_chatterbot,
    "instruct": load_instruct,
}


def load_user_file(data: str, text_column: str, text_pair_column: str | None, label_column: str,
                   fmt: str = "auto", task_type: str | None = None, prompt_column: str = "prompt",
                   response_column: str = "response") -> tuple[list[Example], list[str], str, str, str]:
    """(examples, label names, kind, description, format) of a user's file, its format read from the columns."""
    path = Path(data)
    columns, rows = read_raw_rows(path)
    if not rows:
        raise UserError(f"{path} has no data rows")
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not '{fmt}'")
    if fmt == "auto" and text_pair_column is not None:
        fmt = "classification"
    fmt = detect_format(path, columns, fmt, task_type, prompt_column, response_column, text_column, label_column)
    if fmt != "classification":
        if task_type == CLASSIFICATION:
            raise UserError(f"{path}: --task-type classification does not fit --format {fmt}")
        examples = []
        for row in rows:
            turns = conversation(fmt, row.values, f"{path}: {row.location}", prompt_column, response_column)
            examples.append(Example(text=last_user(turns), target=turns[-1][1], messages=tuple(turns),
                                    where=row.location))
        return examples, [], GENERATION, "Reply as the assistant in the user's conversations.", fmt
    if task_type == GENERATION:
        raise UserError(f"{path}: --task-type generation needs a generation format, not --format classification")
    labelled = labelled_rows(path, columns, rows, text_column, text_pair_column, label_column)
    label_names = sorted({row.label for row in labelled})
    if len(label_names) < 2:
        raise UserError(
            f"{data}: classification needs at least 2 distinct labels in column '{label_column}', "
            f"found {len(label_names)}: {', '.join(label_names)}"
        )
    label_index = {name: index for index, name in enumerate(label_names)}
    examples = [Example(text=row.text, label=label_index[row.label], text_pair=row.text_pair) for row in labelled]
    subject = "pair of texts" if text_pair_column is not None else "text"
    shown = ", ".join(label_names[:SUMMARY_MAX_LABELS]) + (
        ", ..." if len(label_names) > SUMMARY_MAX_LABELS else ""
    )
    return examples, label_names, CLASSIFICATION, f"Classify each {subject} as one of: {shown}.", ""


def check_requested_size(name: str, size: int | None) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise UserError(f"{name} must be a positive integer, got {size!r}")


def stratum(example: Example):
    """What splits and subsamples keep in proportion: the label, or a generation example's group."""
    return example.label if example.label is not None else example.group


def take_subsample(examples: list[Example], size: int | None, seed: int, split_name: str) -> list[Example]:
    if size is None:
        return examples
    chosen = subsample_indices([stratum(example) for example in examples], size, seed, split_name)
    return [examples[index] for index in chosen]


def check_splits(task: TaskData) -> None:
    """Every split non-empty; every label of validation/test also present in train."""
    corpus_size = len(task.train) + len(task.validation) + len(task.test)
    for split_name, split in (("train", task.train), ("validation", task.validation), ("test", task.test)):
        if not split:
            raise UserError(
                f"{task.name}: the {split_name} split is empty: {corpus_size} examples are too few "
                f"for an 80/10/10 split (need at least a handful per label)"
            )
    if task.kind != CLASSIFICATION:
        return
    train_labels = Counter(example.label for example in task.train)
    for split_name, split in (("validation", task.validation), ("test", task.test)):
        for example in split:
            if example.label not in train_labels:
                label_name = task.label_names[example.label] if example.label is not None else "None"
                raise UserError(
                    f"{task.name}: label '{label_name}' appears in the {split_name} split but never in train "
                    f"({len(task.train)} train examples for {len(task.label_names)} labels)"
                )


def load_task(
    task: str | None = None,
    *,
    data: str | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    fmt: str = "auto",
    task_type: str | None = None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Load a built-in task by name or a user data file, split 80/10/10 and optionally subsample."""
    if (task is None) == (data is None):
        raise UserError("give exactly one of a built-in task name or a data file")
    for size_name, size in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
        check_requested_size(size_name, size)

    if task is not None:
        name = task.strip().lower().replace("_", "-")
        if name not in BUILTIN_TASKS:
            raise UserError(f"unknown task '{task}' (known tasks: {', '.join(BUILTIN_TASKS)})")
        examples, label_names, kind, description = BUILTIN_TASKS[name]()
        source_format = ""
    else:
        assert data is not None
        name = task_name_for_file(Path(data))
        examples, label_names, kind, description, source_format = load_user_file(
            data, text_column, text_pair_column, label_column, fmt, task_type, prompt_column, response_column
        )

    train_indices, validation_indices, test_indices = split_indices([stratum(example) for example in examples])
    task_data = TaskData(
        name=name,
        kind=kind,
        label_names=label_names,
        train=take_subsample([examples[i] for i in train_indices], train_size, seed, "train"),
        validation=take_subsample([examples[i] for i in validation_indices], val_size, seed, "validation"),
        test=take_subsample([examples[i] for i in test_indices], test_size, seed, "test"),
        description=description,
        source_format=source_format,
    )
    if name == "instruct":  # the instructions, one phrasing per task held out of training
        from deltatune.data.instruct import phrase

        for split in ("train", "validation", "test"):
            setattr(task_data, split, phrase(getattr(task_data, split), split))
    check_splits(task_data)
    return task_data


@dataclass
class TaskArgs:
    task: str | None = None
    """Built-in task: rotten-tomatoes, bbc-news, chatterbot, instruct (the first two as instructions + chatterbot)."""
    data: str | None = None
    """A CSV, TSV or JSONL file of your own (instead of --task)."""
    text_column: str = "text"
    """Column holding the text (with --data)."""
    text_pair_column: str | None = None
    """Column holding the second text of a pair task (with --data)."""
    label_column: str = "label"
    """Column holding the label (with --data)."""
    prompt_column: str = "prompt"
    """Column holding the prompt of a prompt/response generation file (with --data)."""
    response_column: str = "response"
    """Column holding the response of a prompt/response generation file (with --data)."""
    format: str = option("auto", choices=FORMATS)
    """Format of --data: auto (read from the columns), classification (text + label), prompt-response,
    alpaca (instruction, input, output), chat (messages: [{role, content}]) or sharegpt (conversations)."""
    task_type: str | None = option(None, choices=(CLASSIFICATION, GENERATION))
    """Treat --data as a classification or a generation task (default: what its columns say)."""
    train_size: int | None = option(None, ge=1)
    """Subsample the training split to N examples (stratified)."""
    val_size: int | None = option(None, ge=1)
    """Subsample the validation split to N examples (stratified)."""
    test_size: int | None = option(None, ge=1)
    """Subsample the test split to N examples (stratified)."""

    def load(self, seed: int = 0, default_task: str | None = None) -> TaskData:
        task = self.task if (self.task or self.data) else default_task
        return load_task(task, data=self.data, text_column=self.text_column,
                         text_pair_column=self.text_pair_column, label_column=self.label_column,
                         fmt=self.format, task_type=self.task_type, prompt_column=self.prompt_column,
                         response_column=self.response_column,
                         train_size=self.train_size, val_size=self.val_size, test_size=self.test_size,
                         seed=seed)

    def default_to(self, task: str, sizes: dict[str, int]) -> None:
        """With neither --task nor --data: `task`, subsampled to `sizes` where no size was given."""
        if not (self.task or self.data):
            self.task = task
            for key, value in sizes.items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
