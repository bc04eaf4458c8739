"""One bounded cache for every result the pack keeps between runs (merges, verdicts, loaded hypernets, encodings,
ZipLoRA results, file hashes).

A cache says what invalidates an entry: its ``key`` is built only from what decides the result (files' sha256,
parameters, ...), and ``objects`` are live objects (a model, a CLIP) the entry is valid for, compared by identity
and held weakly, so a model let go is never kept alive here. Entries beyond ``size`` go, the least recently used
first, so ComfyUI's own cache settings still bound what stays in memory. Thread-safe: ComfyUI runs nodes and
HTTP handlers (IS_CHANGED hashes files) on several threads.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

Value = TypeVar("Value")


class BoundedCache(Generic[Value]):
    """At most ``size`` results; ``invalidated_by`` says in words what the keys hold (shown by ``repr``)."""

    def __init__(self, size: int, invalidated_by: str):
        if size < 1:
            raise ValueError("a cache holds at least one entry")
        self.size, self.invalidated_by = size, invalidated_by
        self._entries: "OrderedDict[Hashable, tuple[tuple, Value]]" = OrderedDict()
        self._lock = threading.RLock()
        self.made = 0  # how many times get_or_make called make, failed calls included (what a test of reuse counts)

    def __repr__(self) -> str:
        return f"BoundedCache({len(self._entries)}/{self.size}, keyed by {self.invalidated_by})"

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, objects: tuple = ()) -> Value | None:
        """The entry of ``key`` when it was stored for these same ``objects`` (identity), else None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not _same(entry[0], objects):
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: Hashable, value: Value, objects: tuple = ()) -> Value:
        with self._lock:
            self._entries[key] = (tuple(weakref.ref(o) if o is not None else None for o in objects), value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
            return value

    def get_or_make(self, key: Hashable, make: Callable[[], Value], objects: tuple = ()) -> tuple[Value, bool]:
        """(value, reused): the stored value, or ``make()`` stored now. A ``make`` that raises stores nothing."""
        found = self.get(key, objects)
        if found is not None:
            return found, True
        self.made += 1
        return self.put(key, make(), objects), False

    def find(self, matches: Callable[[Hashable, tuple], bool]) -> Value | None:
        """The most recent value whose (key, live objects) ``matches``; entries whose objects died are dropped."""
        with self._lock:
            for key in reversed(list(self._entries)):
                refs, value = self._entries[key]
                alive = tuple(ref() if ref is not None else None for ref in refs)
                if any(ref is not None and obj is None for ref, obj in zip(refs, alive)):
                    del self._entries[key]
                elif matches(key, alive):
                    self._entries.move_to_end(key)
                    return value
            return None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _same(refs: tuple, objects: tuple) -> bool:
    return len(refs) == len(objects) and all(
        (ref() if ref is not None else None) is obj for ref, obj in zip(refs, objects))
