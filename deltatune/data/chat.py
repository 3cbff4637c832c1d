"""A user's generation file: prompt/response columns, alpaca rows, chat `messages` or ShareGPT `conversations`.

    format           columns                                   one row becomes
    prompt-response  prompt, response (--prompt-column ...)    user: prompt            assistant: response
    alpaca           instruction, [input], output              user: instruction\\n\\ninput  assistant: output
    chat             messages: [{role, content}, ...]          the turns as given (system / user / assistant)
    sharegpt         conversations: [{from, value}, ...]       human -> user, gpt -> assistant, system

Every format becomes the same `Example`: a conversation (`messages`, ending with an assistant turn), the
last user turn as `text` and the last assistant turn as `target`, so the same conversation gives the
same token ids whatever file it came from. The format is read from the columns; more than one match is
refused (`--format` picks). Every problem is a one-line UserError naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deltatune.errors import UserError

CLASSIFICATION_FORMAT = "classification"
GENERATION_FORMATS = ("prompt-response", "alpaca", "chat", "sharegpt")
FORMATS = ("auto", CLASSIFICATION_FORMAT, *GENERATION_FORMATS)
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
                  "model": "assistant"}
Message = tuple[str, str]  # (role, content)


def format_columns(fmt: str, prompt_column: str, response_column: str, text_column: str,
                   label_column: str) -> tuple[str, ...]:
    """The columns a format needs."""
    return {CLASSIFICATION_FORMAT: (text_column, label_column), "prompt-response": (prompt_column, response_column),
            "alpaca": ("instruction", "output"), "chat": ("messages",), "sharegpt": ("conversations",)}[fmt]


def detect_format(path: Path, columns: list[str], requested: str, task_type: str | None, prompt_column: str,
                  response_column: str, text_column: str, label_column: str) -> str:
    """The file's format: `requested` (checked against the columns), else the one whose columns are present."""
    def needs(fmt: str) -> tuple[str, ...]:
        return format_columns(fmt, prompt_column, response_column, text_column, label_column)

    shown = ", ".join(repr(c) for c in columns) or "none"
    if requested != "auto":
        missing = [c for c in needs(requested) if c not in columns]
        if missing:
            raise UserError(f"{path}: --format {requested} needs column(s) {', '.join(map(repr, missing))} "
                            f"(columns found: {shown})")
        return requested
    kinds = {"classification": (CLASSIFICATION_FORMAT,), "generation": GENERATION_FORMATS, None: FORMATS[1:]}
    matches = [f for f in kinds[task_type] if all(c in columns for c in needs(f))]
    if len(matches) > 1:
        raise UserError(f"{path}: the columns fit more than one format ({', '.join(matches)}): "
                        f"give --format {' or --format '.join(matches)}")
    if not matches:
        wanted = {f: " + ".join(map(repr, needs(f))) + f" ({f})" for f in kinds[task_type]}
        raise UserError(f"{path}: no known format: expected {', '.join(wanted.values())} "
                        f"(columns found: {shown})")
    return matches[0]


def _text(value: Any, what: str, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise UserError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return str(value).strip()


def _turns(value: Any, column: str, where: str, role_key: str, content_key: str,
           roles: dict[str, str]) -> list[Message]:
    """A list of {role, content} objects (a JSON string in a CSV cell too), roles mapped to ours."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, list):
        raise UserError(f"{where}: '{column}' must be a list of {{{role_key}, {content_key}}} objects, "
                        f"got {type(value).__name__}")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: {column}[{i}] must be an object with '{role_key}' and '{content_key}'")
        role = turn.get(role_key)
        if role not in roles:
            raise UserError(f"{where}: {column}[{i}] has unknown {role_key} {role!r} "
                            f"(known: {', '.join(sorted(set(roles)))})")
        content = _text(turn.get(content_key), f"{column}[{i}].{content_key}", where)
        if not content:
            raise UserError(f"{where}: {column}[{i}] ({role}) has empty '{content_key}'")
        turns.append((roles[role], content))
    return turns


def conversation(fmt: str, values: dict[str, Any], where: str, prompt_column: str,
                 response_column: str) -> list[Message]:
    """One row as a conversation ending with an assistant turn (later turns have nothing to learn)."""
    if fmt == "chat":
        turns = _turns(values.get("messages"), "messages", where, "role", "content", {r: r for r in ROLES})
    elif fmt == "sharegpt":
        turns = _turns(values.get("conversations"), "conversations", where, "from", "value", SHAREGPT_ROLES)
    else:
        if fmt == "alpaca":
            prompt_col, response_col = "instruction", "output"
            prompt = _text(values.get("instruction"), "'instruction'", where)
            extra = _text(values.get("input"), "'input'", where)
            prompt = f"{prompt}\n\n{extra}" if prompt and extra else prompt
        else:
            prompt_col, response_col = prompt_column, response_column
            prompt = _text(values.get(prompt_column), f"'{prompt_column}'", where)
        response = _text(values.get(response_col), f"'{response_col}'", where)
        for column, text in ((prompt_col, prompt), (response_col, response)):
            if not text:
                raise UserError(f"{where}: empty '{column}'")
        turns = [("user", prompt), ("assistant", response)]
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        raise UserError(f"{where}: the conversation has no assistant turn (nothing to learn)")
    return turns[:last + 1]


def last_user(turns: list[Message]) -> str:
    """The last user turn before the final answer (the row's `text`: what `generate` would be asked)."""
    return next((content for role, content in reversed(turns[:-1]) if role == "user"), "")
