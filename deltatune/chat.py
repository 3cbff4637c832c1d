"""`deltatune chat DELTA`: a conversation in the terminal, each reply streamed token by token.

    you> hi                       the turn joins the history: [system] + the last --history exchanges
    bot> Hello! How can I help?   prompt = chat template(history) + generation prompt, decoded by
                                  deltatune's loop (decoding/loop.py), text printed as tokens arrive

Lines starting with / are commands: /reset forgets the history, /exit (or end of input) leaves. Read
from a pipe, each reply is one line on stdout (the prompts go to stderr only on a terminal).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from deltatune.errors import UserError
from deltatune.options import AtLeastOne
from deltatune.rendering import Message, prompt_ids

REPLACEMENT = "\ufffd"
"""What a partial UTF-8 character decodes to: held back until its next token completes it."""


def reply_stream(task_model, turns: list[Message], max_new_tokens: int = 256, sample: bool = False,
                 temperature: float = 0.7, top_p: float = 0.9, seed: int = 0) -> Iterator[str]:
    """The reply to `turns` (ending with a user turn) as text pieces, one per decoded token that adds text."""
    from deltatune.decoding.loop import Decoder
    from deltatune.generation import decodes_alone, generate_texts, is_seq2seq, sequence

    module, tokenizer = task_model.module, task_model.tokenizer
    if decodes_alone(module) is not None:  # T5: transformers' generate, the whole reply at once
        yield generate_texts(task_model, [turns], max_new_tokens, sample, temperature, top_p, seed)[0]
        return
    module.eval()
    seq = sequence(task_model, prompt_ids(tokenizer, turns, is_seq2seq(task_model)), max_new_tokens, sample,
                   temperature, top_p, seed)
    shown = ""
    with Decoder(task_model.backbone, head=module.get_output_embeddings()) as decoder:
        decoder.add(seq)
        while not seq.done:
            decoder.step()
            text = tokenizer.decode(seq.new, skip_special_tokens=True).lstrip()
            if len(text) > len(shown) and not text.endswith(REPLACEMENT):
                yield text[len(shown):]
                shown = text


def window(system: str | None, turns: list[Message], history: int) -> list[Message]:
    """The system turn and the last `history` exchanges (the newest user turn included)."""
    kept = turns[-(2 * history - 1):]
    return ([("system", system)] if system else []) + kept


def chat(delta: str, *, system: str | None = None, history: AtLeastOne = 8, max_new_tokens: AtLeastOne = 256,
         sample: bool = False, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
         model: str | None = None, device: str = "auto", quantize: str | None = None) -> int:
    """Chat with a generation delta in the terminal: multi-turn, replies streamed as they are decoded.

    Args:
        delta: Delta directory written by `deltatune train` on a generation task.
        system: A system message placed before the conversation.
        history: Exchanges (user turn + reply) kept in the prompt; older ones are dropped.
        max_new_tokens: Most tokens per reply.
        sample: Sample with --temperature and --top-p instead of greedy decoding.
        temperature: Sampling temperature (with --sample).
        top_p: Nucleus sampling mass (with --sample).
        seed: Random seed for sampling (turn i uses seed + i).
        model: Backbone folder, if not the one recorded in the delta.
        device: auto, cpu or cuda.
        quantize: Backbone storage: as the delta was trained (default), none, or nf4, fp4, int8, 3bit, 2bit, q4_1.
    """
    from deltatune.backbone import pick_device
    from deltatune.delta import read_meta
    from deltatune.loading import load_delta

    meta = read_meta(delta)
    if meta["backbone"].get("pooling") != "lm":
        raise UserError(f"{delta} is a classification delta ({meta['task']['name']}): use `deltatune predict`")
    if sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise UserError("sampling needs --temperature > 0 and 0 < --top-p <= 1")
    task_model = load_delta(delta, model=model, device=pick_device(device), quantize=quantize).task_model
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {delta} ({meta['method']}); /reset forgets, /exit leaves", file=sys.stderr)
    turns: list[Message] = []
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            turns = []
            continue
        if not text:
            continue
        turns.append(("user", text))
        if interactive:
            print("bot> ", end="", file=sys.stderr, flush=True)
        pieces = []
        for piece in reply_stream(task_model, window(system, turns, history), max_new_tokens, sample, temperature,
                                  top_p, seed + len(turns) // 2):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        turns.append(("assistant", "".join(pieces).strip()))
    return 0
