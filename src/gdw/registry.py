"""A name → factory registry, used for methods and for models.

A new method or model is one file that decorates its class or factory with
``@METHODS.register("name")`` (or ``@MODELS.register``) plus one import line.
"""

from __future__ import annotations

from typing import Callable, Dict, Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lower-case names to factories; unknown names raise UserError."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            key = name.lower()
            if key in self._items:
                raise RuntimeError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._items:
            raise UserError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return str(name).lower() in self._items
