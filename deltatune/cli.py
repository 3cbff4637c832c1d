"""The `deltatune` command. COMMANDS maps each command to one function; its signature is the flags.

User errors (bad files, flags, deltas) print one line and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from deltatune.errors import UserError

COMMANDS: dict[str, str] = {
    "train": "deltatune.commands:train",
    "eval": "deltatune.commands:evaluate",
    "predict": "deltatune.commands:predict",
    "export": "deltatune.commands:export",
    "import": "deltatune.commands_lm:import_peft",
    "merge": "deltatune.merge:merge",
    "generate": "deltatune.commands_lm:generate",
    "chat": "deltatune.chat:chat",
    "compare": "deltatune.compare:compare",
    "estimate": "deltatune.estimate.cli:estimate",
    "intrinsic": "deltatune.intrinsic.run:intrinsic",
    "search": "deltatune.search:search",
    "index": "deltatune.notune.ask:index_command",
    "ask": "deltatune.notune.ask:ask",
    "serve": "deltatune.serve.cli:serve",
}

ARGV: list[str] = []
"""The command line being run (`train --nproc N` hands it to torchrun without the launch flags)."""


def _load(target: str):
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def make_parser() -> argparse.ArgumentParser:
    from deltatune.cliargs import build_parser, help_safe

    parser = argparse.ArgumentParser(prog="deltatune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, target in COMMANDS.items():
        try:
            func = _load(target)
        except ImportError:  # a command whose module is not there yet
            continue
        doc = (func.__doc__ or "").strip().splitlines()
        summary = doc[0] if doc else ""
        cmd = sub.add_parser(name, help=help_safe(summary), description=summary)  # help is %-formatted
        cmd.add_argument("--config", help="YAML/TOML/JSON file of flag defaults (flags on the command line win)")
        build_parser(cmd, func)
        cmd.set_defaults(_func=func)
    return parser


class Terminated(BaseException):
    """SIGTERM (a `kill`, a scheduler's time limit): raised where the process is, so every `finally` runs
    (temporary files removed, child processes stopped) before it exits with 128 + 15."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> None:
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        _main(argv)
        return
    previous = signal.signal(signal.SIGTERM, _terminate)  # `serve` (uvicorn) and torchrun install their own later
    try:
        _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() called in a process that goes on (tests)


def _main(argv: list[str] | None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = sys.argv[1:] if argv is None else argv
    ARGV[:] = argv
    try:
        from deltatune.cliargs import call_with, command_parsers, parse_command_line
        from deltatune.config import config_defaults, load_config_file

        parser = make_parser()
        args = parse_command_line(parser, argv)
        if args.command is None:
            parser.print_help()
            sys.exit(2)
        if args.config:
            sub = command_parsers(parser)[args.command]
            sub.set_defaults(**config_defaults(load_config_file(args.config), sub, args.config, args.command))
            args = parse_command_line(parser, argv)
        code = call_with(args._func, args)
    except UserError as exc:
        if not (os.environ.get("DELTATUNE_RANK_ERRORS") and _rank_reported(str(exc))):  # `--nproc` prints it
            print(f"deltatune: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("deltatune: interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("deltatune: terminated", file=sys.stderr)
        sys.exit(143)
    except BrokenPipeError:  # `deltatune predict ... | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout again at exit
        sys.exit(141)  # 128 + SIGPIPE, as a shell reports a command killed by it
    sys.exit(code or 0)


def _rank_reported(message: str) -> bool:
    from deltatune.distributed import report_rank_error

    return report_rank_error(message)


if __name__ == "__main__":
    main()
