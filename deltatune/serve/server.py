"""The served state behind the HTTP API: the engine, the registry that persists it, the admin token.

Registering checks the delta against the served backbone and builds it first, then copies it into the
registry, then serves it; a failure at any step leaves both the engine and the catalog as they were.
"""

from __future__ import annotations

import threading

from deltatune.errors import UserError
from deltatune.serve.engine import Engine, UnknownTask
from deltatune.serve.registry import Registry, check_name


class Server:
    def __init__(self, engine: Engine, registry: Registry, admin_token: str | None = None):
        self.engine, self.registry, self.admin_token = engine, registry, admin_token or None
        self.admin_lock = threading.Lock()  # one registration at a time

    def load_registry(self) -> list[str]:
        """Serve every task of the catalog; returns one warning per task that could not be loaded."""
        warnings = []
        for entry in self.registry.entries():
            try:
                self.engine.add_task(entry["name"], entry["path"])
            except UserError as exc:
                warnings.append(f"task '{entry['name']}' not served: {exc}")
        return warnings

    def register(self, name: str, path: str) -> dict:
        check_name(name)
        with self.admin_lock:
            task = self.engine.load_task(name, path)  # the fingerprint and the delta are checked here
            task.path = str(self.registry.add(name, path, task.meta))
            self.engine.install(task)
        return task.describe()

    def unregister(self, name: str) -> None:
        with self.admin_lock:
            served = name in self.engine.tasks
            if served:
                self.engine.remove_task(name)
            if not self.registry.remove(name) and not served:
                raise UnknownTask(f"unknown task '{name}'")

    def describe(self) -> list[dict]:
        return [task.describe() for task in list(self.engine.tasks.values())]
