"""Extension points: named implementations that users add without editing gridswarm.

Each extension point is a `Registry` bound to one Python entry-point group. The built-ins register
themselves when their module is imported; anything else is found through the installed packages'
entry points, loaded on first use, e.g. in a plugin package's `pyproject.toml`:

    [project.entry-points."gridswarm.aggregators"]
    my-median = "my_package.rules:MyMedian"

A run's configuration is validated against what is registered, so an unknown name is refused with
the list of known ones before any run is created. The groups (see docs/extending.md for a worked
example of each):

- `gridswarm.aggregators` — a `train.aggregate.Aggregator` subclass (robust aggregation rules)
- `gridswarm.codecs` — a callable `(block_size) -> train.codecs.Codec` (update compression)
- `gridswarm.signals` — a callable `(SignalTable) -> SignalProvider` (carbon-intensity sources for
  nodes and the hub)
- `gridswarm.energy_policies` — an `energy.policy.HubEnergyPolicy` subclass (how the hub spreads a
  run's tokens over nodes and time)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class UnknownPlugin(ValueError):
    """A name that no built-in and no installed entry point provides."""


class Registry(Generic[T]):
    """Named objects of one kind: built-ins registered in code, plus the entry-point group `group`.

    Entry points are read once, on the first lookup or listing, so importing gridswarm costs
    nothing. A plugin whose import fails is logged and left out rather than taking the rest down;
    a plugin may not replace a built-in of the same name (that would change a run silently).
    """

    def __init__(self, group: str, what: str) -> None:
        self.group = group
        self.what = what
        self._items: dict[str, T] = {}
        self._builtin: set[str] = set()
        self._plugins: set[str] = set()  # names that came from entry points
        self._loaded = False

    def register(self, name: str, obj: T, *, builtin: bool = False) -> T:
        """Add `obj` as `name`; returns it so it can be used as a decorator's tail."""
        if name in self._builtin:
            raise ValueError(f"{self.what} {name!r} is built in and cannot be replaced")
        self._items[name] = obj
        if builtin:
            self._builtin.add(name)
        return obj

    def _load_entry_points(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for ep in entry_points(group=self.group):
            if ep.name in self._builtin:
                log.warning("%s plugin %r ignored: the name is built in", self.what, ep.name)
                continue
            try:
                self._items[ep.name] = ep.load()
                self._plugins.add(ep.name)
            except Exception as exc:  # one broken plugin must not take the others down
                log.warning(
                    "%s plugin %r (%s) failed to load: %s", self.what, ep.name, ep.value, exc
                )

    def get(self, name: str) -> T:
        """The object registered as `name`; `UnknownPlugin` lists the known names otherwise."""
        self._load_entry_points()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownPlugin(
                f"unknown {self.what} {name!r}; choose one of {self.names()}"
                f" (or install a plugin in the {self.group!r} entry-point group)"
            ) from None

    def names(self) -> list[str]:
        """Built-ins in the order they were registered, then plugins."""
        self._load_entry_points()
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def reload(self) -> None:
        """Read the entry points again (after installing a plugin into a running process)."""
        for name in self._plugins:
            self._items.pop(name, None)
        self._plugins.clear()
        self._loaded = False
