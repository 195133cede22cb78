"""Compact bookkeeping for repeated keys and exact duplicates, so the driver's memory stays small.

`KeySet` remembers record keys as 64-bit digests: a sorted numpy array (8 bytes a key) plus a
small Python set of recent keys merged into it every `merge_every` additions. Two different keys
share a digest with probability about n^2 / 2^65 (3e-10 for 10^5 keys, 3e-6 for 10^7).

`ContentIndex` collects one 64-bit content-hash prefix and one (chunk, row) position per written
row (16 bytes a row) and, at the end, returns the groups of positions that share a prefix: the
only rows worth a look at their full content hash.
"""

from __future__ import annotations

import hashlib

import numpy as np


def digest64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class KeySet:
    """A set of strings kept as 64-bit digests; `add` says whether the key was new."""

    def __init__(self, merge_every: int = 1 << 16):
        self.merge_every = merge_every
        self._sorted = np.empty(0, np.uint64)
        self._recent: set[int] = set()

    def __len__(self) -> int:
        return int(self._sorted.size) + len(self._recent)

    def add(self, key: str) -> bool:
        d = digest64(key)
        if d in self._recent:
            return False
        if self._sorted.size:
            i = int(np.searchsorted(self._sorted, np.uint64(d)))
            if i < self._sorted.size and int(self._sorted[i]) == d:
                return False
        self._recent.add(d)
        if len(self._recent) >= self.merge_every:
            self._merge()
        return True

    def _merge(self) -> None:
        recent = np.fromiter(self._recent, np.uint64, len(self._recent))
        self._sorted = np.union1d(self._sorted, recent)
        self._recent = set()


class ContentIndex:
    """(content-hash prefix, chunk, row) of every written row, in growing numpy buffers."""

    def __init__(self):
        self._parts: list[np.ndarray] = []  # structured arrays, one per chunk

    def add_chunk(self, chunk: int, prefixes: list[str]) -> None:
        """`prefixes`: the first 16 hex digits of each row's content_sha1, in row order."""
        part = np.empty(len(prefixes), dtype=[("h", np.uint64), ("chunk", np.int64), ("row", np.int64)])
        part["h"] = [int(p, 16) for p in prefixes]
        part["chunk"] = chunk
        part["row"] = np.arange(len(prefixes))
        self._parts.append(part)

    def __len__(self) -> int:
        return sum(p.size for p in self._parts)

    def candidate_groups(self) -> list[list[tuple[int, int]]]:
        """Positions sharing a prefix, each group in source order (chunk, then row)."""
        if not self._parts:
            return []
        allrows = np.concatenate(self._parts)
        self._parts = [allrows]
        order = np.lexsort((allrows["row"], allrows["chunk"], allrows["h"]))
        h = allrows["h"][order]
        same = h[1:] == h[:-1]
        if not same.any():
            return []
        groups: list[list[tuple[int, int]]] = []
        current: list[tuple[int, int]] = []
        for k in np.flatnonzero(same):
            a, b = order[k], order[k + 1]
            if not current or current[-1] != (int(allrows["chunk"][a]), int(allrows["row"][a])):
                if current:
                    groups.append(current)
                current = [(int(allrows["chunk"][a]), int(allrows["row"][a]))]
            current.append((int(allrows["chunk"][b]), int(allrows["row"][b])))
        groups.append(current)
        return groups
