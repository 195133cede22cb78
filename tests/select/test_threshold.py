"""The distributed radix select finds exactly the rows budget.top_global keeps."""

import numpy as np
import pytest

from rsdist.select.budget import top_global
from rsdist.select.threshold import find_cut, histogram


@pytest.mark.parametrize("kind", ["distinct", "rounded", "constant", "negative", "nan", "signed-zeros"])
def test_the_cut_keeps_the_rows_top_global_keeps(kind):
    rng = np.random.default_rng(len(kind))
    n = 2500
    key = {"distinct": rng.random(n), "rounded": np.round(rng.random(n), 1), "constant": np.full(n, 0.5), "negative": -rng.random(n) * 1e6}.get(kind, rng.random(n))
    if kind == "nan":
        key[rng.random(n) < 0.2] = np.nan
    if kind == "signed-zeros":
        key[::3], key[1::3] = -0.0, 0.0
    pos = np.arange(n)
    parts = np.array_split(rng.permutation(n), 7)  # rows spread over tasks in any order
    for count in (0, 1, 7, n // 3, n - 1, n):
        cut = find_cut(count, lambda prefix: sum(histogram(key[p], pos[p], prefix) for p in parts))
        kept = np.zeros(n, dtype=bool) if cut is None else cut.keep(key, pos)
        assert np.array_equal(kept, top_global(key, count)), count
