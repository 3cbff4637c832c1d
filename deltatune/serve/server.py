"""The served state behind the HTTP API: the engine, the registry that persists it, the admin token.

Registering checks the delta against the served backbone and builds it first, then copies it into the
registry, then serves it; a failure at any step leaves both the engine and the catalog as they were.
Replicas sharing the registry folder pick up each other's changes with `sync` (every SYNC_SECONDS).
"""

from __future__ import annotations

import sys
import threading

from deltatune.errors import UserError
from deltatune.serve.engine import Engine, UnknownTask
from deltatune.serve.registry import Registry, check_name

SYNC_SECONDS = 2.0
"""How often a replica reads the catalog's revisions for tasks another replica added or removed."""


class Server:
    def __init__(self, engine: Engine, registry: Registry, admin_token: str | None = None):
        self.engine, self.registry, self.admin_token = engine, registry, admin_token or None
        self.admin_lock = threading.Lock()  # one registration at a time
        self.revisions: dict[str, int] = {}  # the catalog revision of each task this process serves

    def load_registry(self) -> list[str]:
        """Serve every task of the catalog; returns one warning per task that could not be loaded."""
        return self.sync()

    def sync(self) -> list[str]:
        """Serve what the catalog holds now (another replica may have added, replaced or removed tasks);
        returns one warning per task that could not be loaded (tried again only once it changes)."""
        warnings = []
        with self.admin_lock:
            wanted = self.registry.revisions()
            for name in [n for n in self.engine.tasks if n not in wanted]:
                self.engine.remove_task(name)
                self.revisions.pop(name, None)
            for name, revision in wanted.items():
                if self.revisions.get(name) == revision:
                    continue
                self.revisions[name] = revision
                try:
                    self.engine.add_task(name, self.registry.path_of(name))
                except UserError as exc:
                    warnings.append(f"task '{name}' not served: {exc}")
        return warnings

    def watch(self, seconds: float = SYNC_SECONDS) -> threading.Thread:
        """A daemon thread that syncs with the catalog every `seconds` (replicas behind one balancer)."""
        def loop() -> None:
            while not self.stopped.wait(seconds):
                for warning in self.sync():
                    print(f"deltatune serve: warning: {warning}", file=sys.stderr)

        self.stopped = threading.Event()
        thread = threading.Thread(target=loop, name="registry-sync", daemon=True)
        thread.start()
        return thread

    def register(self, name: str, path: str) -> dict:
        check_name(name)
        with self.admin_lock:
            task = self.engine.load_task(name, path)  # the fingerprint and the delta are checked here
            task.path = str(self.registry.add(name, path, task.meta))
            self.engine.install(task)
            self.revisions[name] = self.registry.revisions().get(name, 0)
        return task.describe()

    def unregister(self, name: str) -> None:
        with self.admin_lock:
            served = name in self.engine.tasks
            if served:
                self.engine.remove_task(name)
            self.revisions.pop(name, None)
            if not self.registry.remove(name) and not served:
                raise UnknownTask(f"unknown task '{name}'")

    def describe(self) -> list[dict]:
        described = []
        for task in list(self.engine.tasks.values()):
            try:
                described.append(task.describe())
            except FileNotFoundError:  # another replica removed it: this one drops it at its next sync
                continue
        return described
