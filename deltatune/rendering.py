"""A conversation -> token ids and labels: the chat template, the answer-only labels, one truncation rule.

    turns:   system · user · assistant · user · assistant
    segments  └──── prompt ────┘ answer  └prompt┘ answer        each rendered by the chat template
    labels    -100 ...            ids      -100     ids         every assistant turn learned, nothing else
                                                                (--train-on-prompt: every token)

The chat template renders the conversation up to each assistant turn with the generation prompt, then
with that turn: the text between is the answer (SmolLM2: "Hello!<|im_end|>\\n"), the text before it
the prompt. Each segment is tokenized alone, so the same conversation gives the same ids whatever file
format it came from. A tokenizer without a chat template gets the plain template:

    [BOS] system\\n user\\n  answer [EOS]  user\\n  answer [EOS]

Encoder-decoders (T5): the turns before the last answer, one per line, are the source; the last answer
(with </s>) is the target.

Truncation (one rule for every generation task): a row longer than max_length loses tokens from the
left, so the final answer survives whole; a row whose final answer alone is longer is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from deltatune.errors import UserError

IGNORE = -100
SEPARATOR = "\n"
SHOWN_REFUSED = 5
Message = tuple[str, str]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, turns: Sequence[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns],
                                         add_generation_prompt=generation_prompt, tokenize=False)


def segments(tokenizer, turns: Sequence[Message]) -> list[tuple[list[int], bool]]:
    """A decoder's conversation as (token ids, is an assistant answer) pieces, in order."""
    answers = [i for i, (role, _) in enumerate(turns) if role == "assistant"]
    pieces: list[tuple[list[int], bool]] = []
    if has_chat_template(tokenizer):
        done = ""
        for a in answers:
            prompt, full = _render(tokenizer, turns[:a], True), _render(tokenizer, turns[:a + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise UserError("the tokenizer's chat template renders earlier turns differently once a later "
                                "turn follows, so the answers cannot be located: train on single-turn rows")
            pieces += [(_ids(tokenizer, prompt[len(done):], False), False),
                       (_ids(tokenizer, full[len(prompt):], False), True)]
            done = full
        return [(ids, answer) for ids, answer in pieces if ids or answer]
    start = 0
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for a in answers:
        text = "".join(content + SEPARATOR for _, content in turns[start:a])
        pieces += [(_ids(tokenizer, text, start == 0), False),
                   (_ids(tokenizer, turns[a][1], False) + eos, True)]
        start = a + 1
    return pieces


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"] if text or special else []


def prompt_ids(tokenizer, prompt: str | Sequence[Message], seq2seq: bool = False, raw: bool = False) -> list[int]:
    """What the model reads before its answer: a text (one user turn) or the turns so far; `raw`: the text
    as it is, no template."""
    turns = [("user", prompt)] if isinstance(prompt, str) else list(prompt)
    if raw or seq2seq:
        text = prompt if isinstance(prompt, str) else SEPARATOR.join(c for _, c in turns)
        return tokenizer(text)["input_ids"]  # BOS (decoders) or </s> (T5): the tokenizer's own specials
    if has_chat_template(tokenizer):
        return _ids(tokenizer, _render(tokenizer, turns, True), False)
    return _ids(tokenizer, "".join(c + SEPARATOR for _, c in turns), True)


class Fitter:
    """The truncation rule, counting what it cut and what it refused (`report`, `check`)."""

    def __init__(self, max_length: int, split: str):
        self.max_length, self.split = max_length, split
        self.cut, self.rows, self.refused = 0, 0, []

    def fit(self, ids: list[int], labels: list[int], answer: int, where: str) -> tuple[list[int], list[int]]:
        """Keep the last max_length tokens; `answer`: the final answer's length, which must fit whole."""
        self.rows += 1
        if answer > self.max_length:
            self.refused.append(where)
        if len(ids) <= self.max_length:
            return ids, labels
        self.cut += 1
        return ids[-self.max_length:], labels[-self.max_length:]

    def check(self) -> None:
        if self.refused:
            shown = ", ".join(self.refused[:SHOWN_REFUSED]) + (", ..." if len(self.refused) > SHOWN_REFUSED else "")
            raise UserError(f"{self.split}: {len(self.refused)} row(s) have a response longer than --max-length "
                            f"{self.max_length} tokens ({shown}): raise --max-length or shorten them")

    def report(self) -> None:
        if self.cut:
            print(f"{self.split}: {self.cut} of {self.rows} rows longer than --max-length {self.max_length} "
                  "tokens: their prompts were cut from the left", file=sys.stderr)


def encode_turns(tokenizer, turns: Sequence[Message], fitter: Fitter, where: str, seq2seq: bool = False,
                 train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one conversation; seq2seq: (source ids, target ids)."""
    if seq2seq:
        source = prompt_ids(tokenizer, list(turns[:-1]), seq2seq=True)
        target = tokenizer(turns[-1][1])["input_ids"]  # T5's tokenizer appends </s>
        if len(target) > fitter.max_length:
            fitter.refused.append(where)
        fitted, _ = fitter.fit(source, source, 0, where)
        return fitted, target
    pieces = segments(tokenizer, turns)
    ids = [t for piece, _ in pieces for t in piece]
    labels = [t if answer or train_on_prompt else IGNORE for piece, answer in pieces for t in piece]
    return fitter.fit(ids, labels, len(pieces[-1][0]), where)
