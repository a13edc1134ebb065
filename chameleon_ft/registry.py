"""A registry of named extensions (tasks, data formats) filled by the modules of one package."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

from chameleon_ft.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name; :meth:`discover` imports every module of a package, whose import registers them.

    ``what`` names an entry in errors ("task", "data format"); ``setting`` the config key that chooses
    one (``task``, ``data.format``).
    """

    def __init__(self, what: str, setting: str, error: type[ConfigError] = ConfigError):
        self.what, self.setting, self.error = what, setting, error
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name`` (names are unique)."""
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._entries)

    def values(self) -> list[T]:
        return [self._entries[n] for n in self.names()]

    def get(self, name: str) -> T:
        """The entry ``name``; an unknown name raises ``error`` listing the valid ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise self.error(f"{self.setting}={name!r} is not a {self.what}; choose one of {self.names()}") from None

    @staticmethod
    def discover(package_name: str, package_path) -> None:
        """Import every module of a package (adding a module is all it takes to add an entry)."""
        for mod in pkgutil.iter_modules(package_path):
            importlib.import_module(f"{package_name}.{mod.name}")
