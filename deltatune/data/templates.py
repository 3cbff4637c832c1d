"""Hard prompts: a template that places the input and the label, and a verbalizer naming each label.

    template    "Review: {text}\\nSentiment: {label}"
    verbalizer  fresh -> "positive", rotten -> "negative"          (LM-BFF, Gao et al. 2021: great/terrible)

    query       "Review: It is a gem.\\nSentiment:"                 everything before {label}
    label       " positive"                                          the spaces before {label} + the word
    demo        "Review: A dull mess.\\nSentiment: negative"         the filled template (a demonstration)

A decoder classifies by comparing log p(label continuation | prompt) across labels (scoring.py), never
by parsing generated text. `PromptArgs` are the CLI flags shared by `train` and `compare`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from deltatune.errors import UserError
from deltatune.options import option

TEXT, PAIR, LABEL = "{text}", "{text_pair}", "{label}"
CONTENT_FREE = ("N/A", "", "[MASK]")
"""Content-free inputs of contextual calibration (Zhao et al. 2021)."""

BUILTIN_PROMPTS: dict[str, tuple[str, dict[str, str]]] = {
    "rotten-tomatoes": ("Review: {text}\nSentiment: {label}", {"fresh": "positive", "rotten": "negative"}),
    "bbc-news": ("Article: {text}\nTopic: {label}",
                 {"business": "business", "entertainment": "entertainment", "politics": "politics",
                  "sports": "sport", "tech": "technology"}),
}
DEFAULT_TEMPLATE = "Text: {text}\nLabel: {label}"
DEFAULT_PAIR_TEMPLATE = "Text: {text}\nSecond text: {text_pair}\nLabel: {label}"


def unescape(text: str) -> str:
    """A template typed on the command line: the two characters \\n become a newline (and \\t a tab)."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


@dataclass(frozen=True)
class Template:
    text: str

    def __post_init__(self) -> None:
        source = self.text
        if source.count(TEXT) != 1:
            raise UserError(f"template must contain {TEXT} exactly once: {source!r}")
        if source.count(LABEL) != 1:
            raise UserError(f"template must contain {LABEL} exactly once: {source!r}")
        if source.count(PAIR) > 1:
            raise UserError(f"template may contain {PAIR} at most once: {source!r}")
        label_at = source.index(LABEL)
        if source.index(TEXT) > label_at or (PAIR in source and source.index(PAIR) > label_at):
            raise UserError(f"template must place {LABEL} after the input: {source!r} (a decoder scores "
                            "the label as the continuation of the prompt)")

    @property
    def has_pair(self) -> bool:
        return PAIR in self.text

    def _before_label(self) -> str:
        return self.text[:self.text.index(LABEL)]

    @property
    def label_prefix(self) -> str:
        """The spaces between the cue and {label}: they belong to the label continuation (' positive')."""
        before = self._before_label()
        return before[len(before.rstrip(" ")):]

    def query(self, text: str, text_pair: str | None = None) -> str:
        """The prompt for one input, up to (not including) the label continuation."""
        return self._fill(self._before_label().rstrip(" "), text, text_pair)

    def label(self, word: str) -> str:
        return self.label_prefix + word

    def demo(self, text: str, word: str, text_pair: str | None = None) -> str:
        """A demonstration: the whole template filled with the input and its label word."""
        return self._fill(self.text, text, text_pair).replace(LABEL, word)

    def _fill(self, part: str, text: str, text_pair: str | None) -> str:
        # str.replace, not str.format: other braces in a template stay literal
        return part.replace(TEXT, text).replace(PAIR, text_pair or "")


def parse_verbalizer(spec: str | dict[str, str] | None, label_names: list[str],
                     default: dict[str, str] | None = None) -> list[str]:
    """One word per label, in label order, from `fresh=great,rotten=terrible` (or a dict, or the default)."""
    if spec is None:
        mapping = dict(default) if default else {name: name.replace("_", " ") for name in label_names}
    elif isinstance(spec, dict):
        mapping = dict(spec)
    else:
        mapping = {}
        for pair in spec.split(","):
            label, sep, word = pair.partition("=")
            if not sep or not label.strip():
                raise UserError(f"verbalizer expects LABEL=WORD pairs separated by commas, got '{pair}'")
            mapping[label.strip()] = word.strip()
    unknown = sorted(set(mapping) - set(label_names))
    if unknown:
        raise UserError(f"verbalizer names label '{unknown[0]}', which the task does not have "
                        f"(labels: {', '.join(label_names)})")
    missing = [name for name in label_names if name not in mapping]
    if missing:
        raise UserError(f"label '{missing[0]}' is missing from the verbalizer (labels: {', '.join(label_names)})")
    for name in label_names:
        if not mapping[name].strip():
            raise UserError(f"the verbalizer word of label '{name}' is empty")
    return [mapping[name] for name in label_names]


def label_token_ids(tokenizer, template: Template, words: list[str], label_names: list[str]) -> list[list[int]]:
    """Token ids of each label continuation; a word that tokenizes to nothing or like another is an error."""
    ids = [tokenizer(template.label(word), add_special_tokens=False)["input_ids"] for word in words]
    seen: dict[tuple[int, ...], str] = {}
    for name, word, tokens in zip(label_names, words, ids):
        if not tokens:
            raise UserError(f"the verbalizer word '{word}' of label '{name}' tokenizes to nothing")
        if tuple(tokens) in seen:
            raise UserError(f"labels '{seen[tuple(tokens)]}' and '{name}' have the same verbalizer tokens")
        seen[tuple(tokens)] = name
    return ids


@dataclass
class PromptSpec:
    """A task's resolved prompt: template, one word per label, the task description."""

    template: Template
    words: list[str]
    label_names: list[str]
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"template": self.template.text, "verbalizer": dict(zip(self.label_names, self.words)),
                "description": self.description}

    @classmethod
    def from_dict(cls, data: dict[str, Any], label_names: list[str]) -> PromptSpec:
        return cls(Template(data["template"]), parse_verbalizer(data["verbalizer"], label_names),
                   label_names, data.get("description", ""))


def prompt_spec(task_name: str, label_names: list[str], description: str = "", template: str | None = None,
                verbalizer: str | dict[str, str] | None = None, pair: bool = False) -> PromptSpec:
    """The task's built-in template/verbalizer, or the user's (a user file: its label names as words)."""
    builtin_template, builtin_words = BUILTIN_PROMPTS.get(task_name, (None, None))
    text = unescape(template) if template else (builtin_template or (DEFAULT_PAIR_TEMPLATE if pair
                                                                     else DEFAULT_TEMPLATE))
    spec = PromptSpec(Template(text), parse_verbalizer(verbalizer, label_names, builtin_words), label_names,
                      description)
    if pair and not spec.template.has_pair:
        raise UserError(f"the task has text pairs but the template has no {PAIR}: {text!r}")
    return spec


@dataclass
class PromptArgs:
    template: str | None = None
    """Prompt template with {text} and {label} (\\n for a newline); default: the task's own."""
    verbalizer: str | None = None
    """Label words as LABEL=WORD,..., e.g. fresh=great,rotten=terrible; default: the task's own."""
    shots: int | None = option(None, ge=0)
    """icl: demonstrations in the prompt (0 zero-shot, 1 one-shot, k few-shot)."""
    demos: str | None = option(None, choices=("random", "retrieved"))
    """icl: how demonstrations are chosen: random (seeded) or retrieved (nearest training examples)."""
    calibrate: bool = False
    """icl: contextual calibration (Zhao et al. 2021) against content-free inputs."""
    objective: str = option("head", choices=("head", "verbalizer"))
    """Tuned methods on decoders: head (a new classifier) or verbalizer (PET/LM-BFF: LM-head logits at the label words)."""

    def given(self) -> dict[str, Any]:
        """The flags the user set (differing from their defaults)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}


def is_no_tuning(method: Any) -> bool:
    return method.runs_own_job


def split_prompt_args(method: Any, prompt: PromptArgs) -> tuple[dict[str, Any], PromptArgs, list[str]]:
    """(method options, prompt args for a tuned method, flags that do not apply to this method).

    No-tuning methods take the flags as options of their Config; tuned methods take --objective, and
    --template/--verbalizer only with --objective verbalizer.
    """
    if prompt.objective not in ("head", "verbalizer"):
        raise UserError(f"--objective must be head or verbalizer, not '{prompt.objective}'")
    given = prompt.given()
    if is_no_tuning(method):
        fields = {f.name for f in dataclasses.fields(method.Config)}
        options = {k: v for k, v in given.items() if k in fields}
        return options, PromptArgs(), sorted(set(given) - set(options))
    tuned = set() if method.fit is not None else (  # features fits its own head: no objective to choose
        {"objective"} | ({"template", "verbalizer"} if prompt.objective == "verbalizer" else set()))
    kept = {k: v for k, v in given.items() if k in tuned}
    return {}, PromptArgs(**kept), sorted(set(given) - set(kept))


def prompt_options(method: Any, prompt: PromptArgs) -> tuple[dict[str, Any], PromptArgs]:
    """Like split_prompt_args, but a flag that does not apply to the method is an error (for `train`)."""
    options, tuned, unused = split_prompt_args(method, prompt)
    if unused:
        hint = " (it needs --objective verbalizer)" if unused[0] in ("template", "verbalizer") else ""
        raise UserError(f"--{unused[0]} does not apply to method '{method.NAME}'{hint}")
    return options, tuned


def prompt_argv(method: Any, prompt: PromptArgs) -> list[str]:
    """The prompt flags of a `compare` child process: only those that apply to its method."""
    from deltatune.cliargs import to_argv

    options, tuned, _ = split_prompt_args(method, prompt)
    return to_argv(PromptArgs(**options) if is_no_tuning(method) else tuned)
