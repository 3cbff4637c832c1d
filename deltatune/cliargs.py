"""Turn a function's signature into argparse flags: the signature is the command line.

- parameters before `*` are positional (a list -> nargs='*', a default -> nargs='?');
- `name: int = 3` -> `--name 3`; `snake_case` -> `--snake-case`; a trailing `_` is dropped (`json_` -> `--json`);
- `bool` -> a switch (`--no-x` form when the default is True); `list[str]` -> repeatable flag; a choice
  among off/on/... (`option("off", choices=("off", "on", "auto"))`) -> the bare flag means on;
- a dataclass-typed parameter expands into one flag per field, documented by the field's docstring;
- help text comes from the docstring's `Args:` section;
- valid ranges (deltatune/options.py) come from `option(...)` fields and `Annotated[int, Range(ge=1)]`
  parameters: shown in --help, checked before the command runs (a one-line UserError).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from collections.abc import Callable
from functools import cache
from typing import Annotated, Any

from deltatune.errors import UserError
from deltatune.options import Range, describe, is_integer_type, range_of, validate


def flag(name: str) -> str:
    return "--" + name.rstrip("_").replace("_", "-")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (`x: int = 1` then `\"\"\"doc\"\"\"`)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def arg_docs(func: Callable) -> dict[str, str]:
    doc = inspect.getdoc(func) or ""
    docs: dict[str, str] = {}
    if "Args:" not in doc:
        return docs
    current = None
    for line in doc.split("Args:", 1)[1].splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        head, sep, rest = stripped.partition(":")
        if sep and " " not in head and line.startswith("    ") and not line.startswith("        "):
            current = head
            docs[current] = rest.strip()
        elif current:
            docs[current] += " " + stripped
    return docs


def _base_type(hint: Any) -> Any:
    if typing.get_origin(hint) is Annotated:
        return _base_type(typing.get_args(hint)[0])
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return _base_type(args[0])
    return hint


def param_range(hint: Any) -> Range | None:
    """The Range of an `Annotated[int, Range(...)]` parameter (also inside `| None`), or None."""
    if typing.get_origin(hint) is Annotated:
        return next((m for m in typing.get_args(hint)[1:] if isinstance(m, Range)), None)
    return next((r for r in map(param_range, typing.get_args(hint)) if r is not None), None)


def help_safe(text: str) -> str:
    """Help text with `%` doubled: argparse %-formats help strings ("0.5%" would crash --help)."""
    return text.replace("%", "%%")


def _add(parser: argparse.ArgumentParser, name: str, hint: Any, default: Any, help_text: str,
         positional: bool, dest: str, bounds: Range | None = None) -> None:
    help_text = help_safe(" ".join(t for t in (help_text, describe(bounds)) if t))
    base = _base_type(hint)
    origin = typing.get_origin(base)
    if positional:
        kwargs: dict[str, Any] = {"help": help_text}
        if origin in (list, tuple):
            kwargs.update(nargs="*", default=list(default) if default is not inspect.Parameter.empty else [])
        elif default is not inspect.Parameter.empty:
            kwargs.update(nargs="?", default=default)
        parser.add_argument(dest, metavar=name.upper(), **kwargs)
        return
    shown = "" if default in (None, inspect.Parameter.empty, False, ()) else help_safe(f" (default: {default})")
    if base is bool:
        action = argparse.BooleanOptionalAction if default is True else "store_true"
        parser.add_argument(flag(name), dest=dest, action=action, default=bool(default), help=help_text)
    elif origin in (list, tuple):
        parser.add_argument(flag(name), dest=dest, action="append", default=None, metavar="VALUE",
                            help=help_text + " (repeatable)")
    else:
        kind = base if base in (int, float, str) else str
        required = default is inspect.Parameter.empty
        short = [f"-{name}"] if len(name) == 1 and name != "h" else []  # a one-letter flag also works as -k
        bare = {"nargs": "?", "const": "on"} if bounds is not None and "on" in (bounds.choices or ()) else {}
        parser.add_argument(flag(name), *short, dest=dest, type=kind, required=required, metavar=name.rstrip("_").upper(),
                            default=None if required else default, help=help_text + shown, **bare)


def build_parser(parser: argparse.ArgumentParser, func: Callable) -> None:
    docs = arg_docs(func)
    hints = typing.get_type_hints(func, include_extras=True)
    for name, param in inspect.signature(func).parameters.items():
        hint = hints.get(name, str)
        if dataclasses.is_dataclass(hint):
            group = parser.add_argument_group(name)
            fdocs, fhints = field_docs(hint), typing.get_type_hints(hint)
            for f in dataclasses.fields(hint):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                _add(group, f.name, fhints[f.name], default, fdocs.get(f.name, ""), False, f"{name}.{f.name}",
                     range_of(f))
            continue
        positional = param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        _add(parser, name, hint, param.default, docs.get(name, ""), positional, name, param_range(hint))


def call_with(func: Callable, namespace: argparse.Namespace) -> Any:
    """Call `func` with the parsed flags, every value checked against its declared range first."""
    values = vars(namespace)
    hints = typing.get_type_hints(func, include_extras=True)
    kwargs: dict[str, Any] = {}
    for name in inspect.signature(func).parameters:
        hint = hints.get(name, str)
        if dataclasses.is_dataclass(hint):
            prefix = name + "."
            kwargs[name] = hint(**{k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)})
            validate(kwargs[name], name=flag)
        else:
            kwargs[name] = values[name]
            bounds = param_range(hint)
            problem = bounds.problem(kwargs[name], is_integer_type(hint)) if bounds is not None else None
            if problem is not None:
                raise UserError(f"{flag(name)} {problem}")
    return func(**kwargs)


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `COMMAND ...` with options and positionals in any order (`predict DELTA --json "text"`).

    argparse cannot intermix across subparsers, so the command's own parser does the intermixed parse."""
    commands = command_parsers(parser)
    if not argv or argv[0] not in commands:
        return parser.parse_args(argv)  # --help, or a missing/unknown command: argparse's own message
    namespace = commands[argv[0]].parse_intermixed_args(argv[1:])
    namespace.command = argv[0]
    return namespace


def command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-parsers of a parser built with add_subparsers, by command name."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def to_argv(instance: Any) -> list[str]:
    """Flags that reproduce a dataclass instance's non-default fields (for a child process)."""
    argv: list[str] = []
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if value == default:
            continue
        if isinstance(value, bool):
            argv.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
        elif value is not None:
            argv += [flag(f.name), str(value)]
    return argv
