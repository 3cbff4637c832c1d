"""The task registry: the served deltas and an SQLite catalog, so that tasks survive restarts.

    REGISTRY/
      catalog.sqlite   tasks: name, method, backbone fingerprint, labels, metrics, created-at (the delta's),
                              registered-at, the directory it was registered from
                       settings: the served model (a restart without --model serves the same one)
      deltas/NAME/     a copy of each registered delta directory (written atomically)
      deltas/.NAME@host@pid@start@random.tmp   a copy being written; a restart removes those whose process
                       died (same host, pid gone or reused), never a live process's (replicas may share it)

The catalog is written only after the delta has been checked against the served backbone and copied,
so it never names a delta that is not there.

Replicas: several `deltatune serve` processes on one host may share one registry folder. The catalog runs
in SQLite's WAL mode (readers never wait for a writer; one writer at a time, others wait up to 30 s), and
every add or remove stamps the task's revision (`revisions`: name -> a nanosecond clock). Each replica polls
`revisions()` every few seconds and serves what changed (`Server.sync`). SQLite's locks need one host's
kernel: a registry on NFS/SMB shared by several hosts is unsafe (docs/scaling.md).
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from deltatune.errors import UserError
from deltatune.io import atomic_directory, remove_stale_temporaries

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    name TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    labels TEXT NOT NULL,
    metrics TEXT NOT NULL,
    created_at TEXT,
    registered_at TEXT NOT NULL,
    source TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revisions (name TEXT PRIMARY KEY, revision INTEGER NOT NULL);
"""


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise UserError(f"invalid task name '{name}': use 1-64 letters, digits, '_', '-' or '.', "
                        "starting with a letter or digit")
    return name


class Registry:
    """Delta store + catalog under one directory; safe to use from several threads (one connection per call)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.deltas = self.root / "deltas"
        self.deltas.mkdir(parents=True, exist_ok=True)
        self.removed_temporaries = remove_stale_temporaries(self.deltas)  # a killed registration's partial copy
        self.file = self.root / "catalog.sqlite"
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent in the file: every replica's connection uses it
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.file, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def path_of(self, name: str) -> Path:
        return self.deltas / check_name(name)

    def add(self, name: str, source: str | Path, meta: dict) -> Path:
        """Copy a (checked) delta directory into the store and record it; returns the stored directory."""
        stored, source = self.path_of(name), Path(source)
        if source.resolve() != stored.resolve():
            with atomic_directory(stored) as tmp:
                shutil.copytree(source, tmp, dirs_exist_ok=True)
        row = (name, meta["method"], meta.get("backbone", {}).get("fingerprint", ""),
               json.dumps(meta.get("task", {}).get("label_names", [])), json.dumps(meta.get("metrics", {})),
               meta.get("created_at"), time.strftime("%Y-%m-%dT%H:%M:%S%z"), str(source))
        with closing(self._connect()) as db, db:
            db.execute("INSERT OR REPLACE INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
            db.execute("INSERT OR REPLACE INTO revisions VALUES (?, ?)", (name, time.time_ns()))
        return stored

    def remove(self, name: str) -> bool:
        with closing(self._connect()) as db, db:
            found = db.execute("DELETE FROM tasks WHERE name = ?", (name,)).rowcount > 0
            db.execute("DELETE FROM revisions WHERE name = ?", (name,))
        shutil.rmtree(self.path_of(name), ignore_errors=True)
        return found

    def entries(self) -> list[dict]:
        """Catalog rows, oldest registration first."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT * FROM tasks ORDER BY registered_at, name").fetchall()
        return [{**dict(r), "labels": json.loads(r["labels"]), "metrics": json.loads(r["metrics"]),
                 "path": str(self.deltas / r["name"])} for r in rows]

    def revisions(self) -> dict[str, int]:
        """Each catalogued task's revision (changed by every add): what a replica compares to what it serves.
        A task catalogued before revisions existed counts as revision 0."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT tasks.name, COALESCE(revisions.revision, 0) FROM tasks "
                              "LEFT JOIN revisions ON revisions.name = tasks.name").fetchall()
        return {name: revision for name, revision in rows}

    def setting(self, key: str) -> str | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def set_setting(self, key: str, value: str) -> None:
        with closing(self._connect()) as db, db:
            db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))
