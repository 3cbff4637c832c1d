"""Output paths and atomic writes: deltatune replaces only what deltatune wrote.

    claim_output(path, kind)      at argument time, before any work: the path must be new, an empty
                                  folder, or a folder holding deltatune's manifest of the same kind;
                                  anything else (a file, a folder of the user's) is a one-line UserError
    atomic_directory(path, kind)  write into a temporary sibling, then rename it into place
    claim_run, run_folder         a folder that a command writes into (compare, search, intrinsic):
                                  claimed with its DIR/deltas/NAME at argument time, created before training

    OUT/.deltatune.json           {"format": "deltatune.output", "kind": "delta", "deltatune_version", "created_at"}

Temporary names carry their owner (`.NAME@host@pid@start@random.tmp`: the process's host, id and start
time), so `remove_stale_temporaries` can delete what a killed process left without touching the copy of a
live one. Everything written is chmod-ed to what the umask allows (mkdtemp/mkstemp create 0700/0600).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deltatune.errors import UserError

MANIFEST = ".deltatune.json"
MANIFEST_FORMAT = "deltatune.output"
KINDS = {"delta": "delta", "peft": "peft export", "merged": "merged model export", "index": "index",
         "compare": "compare run", "search": "search run", "intrinsic": "intrinsic run"}
"""Every kind of output folder deltatune writes, and how a message names it."""
TEMP_SUFFIXES = (".tmp", ".old")
TARGET_CHARS = 96
"""A temporary name keeps this much of its target's name (a file name holds 255 bytes)."""


# ---- permissions ---------------------------------------------------------------------------------------

def _umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it (os.umask would, for a moment, in every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def respect_umask(path: str | Path) -> None:
    """Give `path` (and, for a folder, everything in it) the modes a plain mkdir/open would: 0o777/0o666 & ~umask."""
    mask = _umask()
    path = Path(path)
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in items:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


# ---- temporary names that say whose they are -----------------------------------------------------------

def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is told apart; else "0"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22, starttime
    except (OSError, IndexError):
        return "0"


def _owner() -> str:
    return f"{socket.gethostname()}@{os.getpid()}@{_start_time(os.getpid())}"


def _owner_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists: another user's process
    now = _start_time(pid)
    return start == "0" or now == "0" or now == start


def temporary_name(target: str) -> str:
    """`.TARGET@host@pid@start@random` (add .tmp or .old): a sibling name that records its owner process."""
    return f".{target[:TARGET_CHARS]}@{_owner()}@{secrets.token_hex(4)}"


def remove_stale_temporaries(folder: str | Path, target: str | None = None) -> list[Path]:
    """Remove the temporary copies in `folder` (of `target` only, if given) that a dead process of this host
    left; a live process's copy, another host's, and every name deltatune did not make are kept."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    host = socket.gethostname()
    for item in folder.iterdir():
        name = item.name
        if not (name.startswith(".") and name.endswith(TEMP_SUFFIXES)):
            continue
        parts = name[1:-4].rsplit("@", 4)  # target, host, pid, start, random
        if len(parts) != 5 or not parts[2].isdigit() or (target is not None and parts[0] != target[:TARGET_CHARS]):
            continue
        if parts[1] != host or _owner_alive(int(parts[2]), parts[3]):
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
        removed.append(item)
    return removed


# ---- files ---------------------------------------------------------------------------------------------

def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_name(path.name) + "-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        respect_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


# ---- output folders ------------------------------------------------------------------------------------

def manifest(kind: str) -> dict[str, str]:
    from deltatune import __version__

    return {"format": MANIFEST_FORMAT, "kind": kind, "deltatune_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def manifest_kind(folder: str | Path) -> str | None:
    """The kind recorded in `folder`'s manifest; None when it has none (or not one deltatune wrote)."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return legacy_kind(Path(folder))
    if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT and data.get("kind") in KINDS:
        return data["kind"]
    return legacy_kind(Path(folder))


LEGACY_MARKERS = {"delta": ("delta.json", "deltatune.delta"), "index": ("index.json", "deltatune.index")}
"""Folders written before the manifest existed carry their own format marker: a rerun may replace them."""


def legacy_kind(folder: Path) -> str | None:
    """The kind of an output an earlier deltatune wrote without a manifest (a delta or an index by their
    format field; a compare run by its results.json + results.md + deltas/), or None."""
    for kind, (name, marker) in LEGACY_MARKERS.items():
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == marker:
            return kind
    if all((folder / n).is_file() for n in ("results.json", "results.md")) and (folder / "deltas").is_dir():
        return "compare"
    return None


def claim_output(path: str | Path, kind: str) -> Path:
    """Check that a `kind` output may be written at `path`; nothing is created. Returns the absolute path.

    Allowed: a new path, an empty folder, a folder holding deltatune's manifest of this kind (replaced, or
    written into). Refused with one line: a file, a folder deltatune did not write, another kind's folder."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    given, path = str(path), Path(os.path.abspath(path))
    if os.path.islink(path):
        path = path.resolve()  # a link to a folder: the folder is the output
    cwd = Path.cwd().resolve()
    if path == path.parent or path.resolve() == cwd or path.resolve() in cwd.parents:
        raise UserError(f"refusing to write over {given}: it is the current folder or holds it; give a new folder")
    if path.exists() and not path.is_dir():
        raise UserError(f"refusing to write over {given}: it is a file, not a folder; give a new folder path")
    if path.is_dir() and any(path.iterdir()):
        found = manifest_kind(path)
        if found is None:
            raise UserError(f"refusing to write over {given}: a non-empty folder deltatune did not write "
                            f"(no {MANIFEST}); give a new or empty folder")
        if found != kind:
            raise UserError(f"refusing to write a {KINDS[kind]} over {given}: it holds a deltatune "
                            f"{KINDS[found]}; give another path")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write {given}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {given}: no permission to write in {ancestor}")
    return path


def claim_run(path: str | Path, kind: str, deltas: list[str] = ()) -> None:
    """claim_output for a run folder and for the deltas its children will write into DIR/deltas/NAME."""
    claim_output(path, kind)
    for name in deltas:
        claim_output(Path(path) / "deltas" / name, "delta")


def run_folder(path: str | Path, kind: str) -> Path:
    """A folder a command writes its results into (compare, search, intrinsic): claimed, created, marked."""
    path = claim_output(path, kind)
    path.mkdir(parents=True, exist_ok=True)
    if manifest_kind(path) is None:
        write_json_atomic(path / MANIFEST, manifest(kind))
    return path


@contextlib.contextmanager
def atomic_directory(path: str | Path, kind: str | None = None, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path`, on failure it is removed.

    kind: an output the user named (see KINDS): the folder gets deltatune's manifest, and an existing `path`
        is replaced only if claim_output allows it (checked again here: something may have appeared since).
        None: a path only deltatune writes (the model cache, the serve registry's copies), replaced as it is.
    keep_existing: a `path` that exists by then (another process won the race) is kept, ours removed."""
    if kind is not None:
        path = claim_output(path, kind)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_name(path.name) + "-", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if kind is not None:
            write_json_atomic(tmp / MANIFEST, manifest(kind))
            claim_output(path, kind)
        respect_umask(tmp)
        if keep_existing and path.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        elif path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            os.replace(tmp, path)  # POSIX: a directory may replace an empty one
        elif path.exists() or path.is_symlink():  # ours (claimed above, or a deltatune-only path)
            old = path.with_name(temporary_name(path.name) + ".old")
            path.rename(old)
            tmp.rename(path)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
