"""The global top-B of a score spread over many files, found by a distributed radix select.

A global strategy (random, scalselect's global top leverage, semdedup, the near-duplicate filter's
readmission) keeps the B rows of highest key, ties to the lower pool position, NaN last, exactly as
`rsdist.select.budget.top_global` does in one process. Here each row's (key, pos) is mapped to a
pair of unsigned integers whose ascending order is that order; the B-th smallest pair T is found
digit by digit (16 bits a round): each round, every task returns a 65,536-bin histogram of the rows
that share the digits found so far, and the driver sums them and picks the next digit. A row is
kept when its pair is <= T. The driver holds 65,536 counts a round, never a row; a pool of
distinct scores needs two to four rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

DIGIT = 16
BINS = 1 << DIGIT
POS_BITS = 48


def order_key(key: np.ndarray) -> np.ndarray:
    """uint64 per row whose ascending order is descending `key` (NaN last; -0.0 equals 0.0)."""
    k = np.asarray(key, dtype=np.float64)
    k = np.where(np.isnan(k), -np.inf, k) + 0.0
    bits = (-k).view(np.uint64)
    sign = (bits >> np.uint64(63)).astype(bool)
    return np.where(sign, ~bits, bits | np.uint64(1 << 63))


@dataclass(frozen=True)
class Prefix:
    """The digits found so far: the top `ubits` of the key, then the top `pbits` of the position."""

    ubits: int = 0
    uprefix: int = 0
    pbits: int = 0
    pprefix: int = 0

    def match(self, u: np.ndarray, pos: np.ndarray) -> np.ndarray:
        m = np.ones(len(u), dtype=bool)
        if self.ubits:
            m &= (u >> np.uint64(64 - self.ubits)) == np.uint64(self.uprefix)
        if self.pbits:
            m &= (pos.astype(np.uint64) >> np.uint64(POS_BITS - self.pbits)) == np.uint64(self.pprefix)
        return m

    def next_digits(self, u: np.ndarray, pos: np.ndarray) -> np.ndarray:
        if self.ubits < 64:
            return ((u >> np.uint64(64 - self.ubits - DIGIT)) & np.uint64(BINS - 1)).astype(np.int64)
        return ((pos.astype(np.uint64) >> np.uint64(POS_BITS - self.pbits - DIGIT)) & np.uint64(BINS - 1)).astype(np.int64)

    def extend(self, digit: int) -> "Prefix":
        if self.ubits < 64:
            return Prefix(self.ubits + DIGIT, (self.uprefix << DIGIT) | digit, 0, 0)
        return Prefix(self.ubits, self.uprefix, self.pbits + DIGIT, (self.pprefix << DIGIT) | digit)

    def bound(self) -> "Cut":
        """The largest (u, pos) with these digits."""
        rest = 64 - self.ubits
        u = (self.uprefix << rest) | ((1 << rest) - 1) if rest < 64 else (1 << 64) - 1
        if self.ubits < 64:
            return Cut(u, (1 << POS_BITS) - 1)
        prest = POS_BITS - self.pbits
        return Cut(u, (self.pprefix << prest) | ((1 << prest) - 1))


@dataclass(frozen=True)
class Cut:
    """Rows with (order_key, pos) <= (u, pos) are kept; None keeps nothing."""

    u: int
    pos: int

    def keep(self, key: np.ndarray, pos: np.ndarray) -> np.ndarray:
        u = order_key(key)
        cu = np.uint64(self.u)
        return (u < cu) | ((u == cu) & (pos <= self.pos))


def histogram(key: np.ndarray, pos: np.ndarray, prefix: Prefix) -> np.ndarray:
    """BINS counts of the next digit among the rows that share `prefix`."""
    u = order_key(key)
    m = prefix.match(u, pos)
    return np.bincount(prefix.next_digits(u[m], pos[m]), minlength=BINS).astype(np.int64)


def find_cut(count: int, histograms: Callable[[Prefix], np.ndarray]) -> Cut | None:
    """The Cut that keeps exactly `count` rows; `histograms(prefix)` sums `histogram` over all rows."""
    if count <= 0:
        return None
    prefix, need = Prefix(), count
    while prefix.ubits < 64 or prefix.pbits < POS_BITS:
        hist = histograms(prefix)
        cum = np.cumsum(hist)
        if cum[-1] < need:
            raise RuntimeError(f"select: {int(cum[-1])} rows left where {need} more are to be kept")
        d = int(np.searchsorted(cum, need))
        need -= int(cum[d - 1]) if d > 0 else 0
        prefix = prefix.extend(d)
        if need == hist[d]:  # every row with these digits is kept
            return prefix.bound()
    return prefix.bound()
