"""OpenAI's request bodies, error object, chat rendering and streamed text, for serve/openai_api.py.

    error        {"error": {"message", "type", "param", "code"}}: 400 invalid_request_error, 404
                 model_not_found, 503 server_error (+ Retry-After)
    chat         messages -> rendering.prompt_ids: the backbone's chat template (+ the generation prompt),
                 or the plain template; the same ids `deltatune generate` gives those turns
    text         TextTracker: a choice's text grows token by token; stop strings are matched across token
                 boundaries (a possible start of one is held back) and cut, never sent
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from deltatune.rendering import prompt_ids


class APIError(Exception):
    """An error answered in OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @property
    def kind(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampled(BaseModel):
    """What chat and completion requests share."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(description="A served delta, or the bare backbone (see GET /v1/models).")
    max_tokens: int | None = Field(None, description="Most tokens generated per choice.")
    temperature: float = Field(1.0, description="0: greedy; else sampling from softmax(logits / temperature).")
    top_p: float = Field(1.0, description="Nucleus sampling.")
    n: int = Field(1, description="Choices per prompt.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end a choice (not included).")
    seed: int | None = Field(None, description="Seed of choice i's generator: seed + i.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(Sampled):
    messages: list[Message]
    logprobs: bool = False
    top_logprobs: int | None = Field(None, description="0-20 most likely tokens per position (with logprobs).")
    max_completion_tokens: int | None = None


class CompletionBody(Sampled):
    prompt: str | list[str] = Field(description="Raw text (no chat template), or several.")
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, description="0-5 most likely tokens per position.")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class LoadBody(BaseModel):
    lora_name: str = Field(description="The model name requests use (any delta kind, not only LoRA).")
    lora_path: str = Field(description="A delta directory on the server.")


class UnloadBody(BaseModel):
    lora_name: str
    lora_path: str | None = None


def check_sampling(body: Sampled, max_n: int) -> list[str]:
    """400 for parameters out of range or not supported; returns the stop strings."""
    def bad(param: str, message: str) -> APIError:
        return APIError(400, message, param=param)

    if not 0 <= body.temperature <= 2:
        raise bad("temperature", f"temperature must be between 0 and 2, got {body.temperature}")
    if not 0 < body.top_p <= 1:
        raise bad("top_p", f"top_p must be in (0, 1], got {body.top_p}")
    if not 1 <= body.n <= max_n:
        raise bad("n", f"n must be between 1 and {max_n}, got {body.n}")
    if body.max_tokens is not None and body.max_tokens < 1:
        raise bad("max_tokens", f"max_tokens must be at least 1, got {body.max_tokens}")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise bad(name, f"{name} is not supported by this server (leave it 0)")
    if body.logit_bias:
        raise bad("logit_bias", "logit_bias is not supported by this server")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise bad("stop", "stop takes up to 4 non-empty strings")
    return stops


def content_text(message: Message, i: int) -> str:
    if isinstance(message.content, str):
        return message.content
    parts = message.content or []
    if any(p.get("type") != "text" for p in parts):
        raise APIError(400, f"messages[{i}]: only text content is supported", param="messages")
    return "".join(str(p.get("text", "")) for p in parts)


def render_chat(tokenizer, messages: list[Message]) -> list[int]:
    """Prompt ids of a conversation: the chat template with the generation prompt (or the plain one)."""
    if not messages:
        raise APIError(400, "messages must hold at least one message", param="messages")
    turns = [(m.role, content_text(m, i)) for i, m in enumerate(messages)]
    try:
        return prompt_ids(tokenizer, turns)
    except Exception as exc:  # noqa: BLE001 - a template's own check (roles, order)
        raise APIError(400, f"messages: the chat template refused them: {exc}", param="messages") from exc


def raw_ids(tokenizer, text: str) -> list[int]:
    """A completion prompt: the text as it is (the tokenizer's own BOS), as `deltatune generate --raw`."""
    return prompt_ids(tokenizer, text, raw=True) if text else []


class TextTracker:
    """One choice's text, token by token, with stop strings matched across token boundaries."""

    def __init__(self, tokenizer, stops: list[str], stop_ids: tuple[int, ...]):
        self.tokenizer, self.stops, self.stop_ids = tokenizer, stops, stop_ids
        self.sent = 0  # characters of the text already handed out
        self.text = ""

    def push(self, tokens: list[int], final: bool) -> tuple[str, bool]:
        """The text to send after these tokens (all generated so far), and whether a stop string ended it."""
        if tokens and tokens[-1] in self.stop_ids:
            tokens = tokens[:-1]
        full = self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        hits = [p for p in (full.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops) if p >= 0]
        if hits:
            end, stopped = max(min(hits), self.sent), True
        else:
            end, stopped = len(full), False
            if not final:
                end -= self._held(full)
        out = full[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        self.text += out
        return out, stopped

    def _held(self, full: str) -> int:
        """Characters at the end that may still become a stop string or a multi-byte character."""
        held = len(full) - len(full.rstrip("\ufffd"))
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(full)), 0, -1):
                if full.endswith(stop[:k]):
                    held = max(held, k)
                    break
        return held


def token_logprobs(tokenizer, logits: torch.Tensor, token: int, top: int) -> dict:
    """{token, logprob, bytes, top_logprobs: [...]} of one position (chat's shape) from (V,) logits."""
    lp = logits.float().log_softmax(-1)  # (V,)

    def entry(t: int, value: float) -> dict:
        text = tokenizer.decode([t])
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    out = entry(token, float(lp[token]))
    values, ids = lp.topk(top) if top > 0 else (lp[:0], lp[:0].long())
    out["top_logprobs"] = [entry(int(i), float(v)) for v, i in zip(values, ids)]
    return out


def legacy_logprobs(entries: list[dict], offset: int) -> dict:
    """The completions endpoint's logprobs object from chat-shaped entries."""
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}
