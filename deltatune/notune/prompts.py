"""Few-shot prompts as token ids, built to fit the context window.

    [start tokens] [description + "\\n\\n"] [demo 1 + "\\n\\n"] ... [demo k + "\\n\\n"] [query] -> label?
    └──────────────────────── prefix: shared by every query, K/V cached ────────────┘

Each segment is tokenized on its own and the ids are concatenated, so the prefix is a fixed token
sequence that both the cached and the full-prompt scorer see. Fitting to the budget (the context
window, or a smaller `max_prompt_tokens`): demonstrations are dropped first (the last random one, or
the least similar retrieved one), then the input is truncated; `shots_used` says how many fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.data import Example
from deltatune.data.templates import PromptSpec
from deltatune.errors import UserError
from deltatune.notune.scoring import start_ids

SEPARATOR = "\n\n"


@dataclass
class Prompt:
    prefix: list[int]
    query: list[int]
    shots_used: int


class PromptBuilder:
    def __init__(self, tokenizer, spec: PromptSpec, budget: int, text_max_tokens: int, demo_max_tokens: int,
                 max_label_tokens: int):
        self.tokenizer = tokenizer
        self.spec = spec
        self.budget = budget
        self.text_max_tokens = text_max_tokens
        self.demo_max_tokens = demo_max_tokens
        self.label_extra = max_label_tokens - 1  # label tokens the model reads (all but the last)
        self.start = start_ids(tokenizer)
        self.head = self._ids(spec.description + SEPARATOR) if spec.description else []
        self.overhead = len(self._ids(spec.template.query("", "" if spec.template.has_pair else None)))

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate(self, text: str, max_tokens: int) -> str:
        """The text cut to its first max_tokens tokens (decoded back to a string)."""
        ids = self._ids(text)
        if len(ids) <= max_tokens:
            return text
        return self.tokenizer.decode(ids[:max(0, max_tokens)]) if max_tokens > 0 else ""

    def demo(self, example: Example) -> list[int]:
        """A demonstration's ids: the filled template, the input cut to demo_max_tokens, then the separator."""
        n = self.demo_max_tokens // (2 if example.text_pair is not None else 1)
        text = self.truncate(example.text, n)
        pair = self.truncate(example.text_pair, n) if example.text_pair is not None else None
        return self._ids(self.spec.template.demo(text, self.spec.words[example.label], pair) + SEPARATOR)

    def prefix(self, demos: list[list[int]]) -> list[int]:
        return self.start + self.head + [t for d in demos for t in d]

    def query(self, example: Example, prefix_len: int) -> list[int]:
        """The query's ids, its input truncated so that prefix + query + label fit the budget."""
        room = self.budget - prefix_len - self.label_extra  # tokens left for the query
        max_text = min(self.text_max_tokens, room - self.overhead)
        for _ in range(4):  # re-tokenizing a cut text can add a token or two: cut further until it fits
            if max_text < 1:
                raise UserError(f"the prompt prefix takes {prefix_len} tokens and the template {self.overhead}: "
                                f"no room for the input within {self.budget} tokens (raise max_prompt_tokens "
                                "or shorten the task description)")
            n = max_text // (2 if example.text_pair is not None else 1)
            pair = self.truncate(example.text_pair, n) if example.text_pair is not None else None
            ids = self._ids(self.spec.template.query(self.truncate(example.text, n), pair))
            if len(ids) <= room:
                return ids
            max_text -= len(ids) - room
        raise UserError(f"cannot fit the input into {self.budget} prompt tokens")

    def fit_shared(self, demos: list[Example]) -> tuple[list[int], int]:
        """(prefix, shots used) for demonstrations shared by every query: room is kept for the longest input."""
        reserve = self.overhead + self.text_max_tokens + self.label_extra
        ids = [self.demo(d) for d in demos]
        while ids and len(self.prefix(ids)) + reserve > self.budget:
            ids.pop()  # drop the last demonstration first
        return self.prefix(ids), len(ids)

    def fit_one(self, demos: list[Example], example: Example) -> Prompt:
        """A prompt for one input with its own demonstrations (most similar last): drop from the front."""
        ids = [self.demo(d) for d in demos]
        query = self.query(example, len(self.prefix([])))
        while ids and len(self.prefix(ids)) + len(query) + self.label_extra > self.budget:
            ids.pop(0)  # drop the least similar demonstration first
        return Prompt(self.prefix(ids), query, len(ids))
