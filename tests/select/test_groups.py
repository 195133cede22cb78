"""A group's vectors: slices, takes and the whole group give each row the same values."""

import numpy as np
import pyarrow as pa

from rsdist.select.columns import embedding_of
from rsdist.select.groups import Group, is_range


def _group(rows: int = 50, dim: int = 6) -> Group:
    rng = np.random.default_rng(0)
    emb = lambda: pa.array(list(rng.standard_normal((rows, dim)).astype(np.float32)), pa.list_(pa.float32()))  # noqa: E731
    table = pa.table({"sample_id": [f"s{i}" for i in range(rows)], "pos": np.arange(rows), "image_emb": emb(), "text_emb": emb()})
    parts = pa.concat_tables([table.slice(0, 20), table.slice(20)]).combine_chunks()  # as load_group holds it
    return Group(0, parts, np.zeros(rows, dtype=np.int64), np.ones(rows, dtype=bool), None)


def test_is_range_tells_consecutive_rows_from_others():
    assert is_range(np.arange(3, 9))
    assert is_range(np.array([7]))
    assert not is_range(np.array([], dtype=np.int64))
    assert not is_range(np.array([1, 2, 4]))
    assert not is_range(np.array([3, 2, 1, 4]))  # spans 4 rows but is not ascending


def test_rows_of_a_slice_and_of_a_take_equal_the_whole_groups_rows():
    g = _group()
    for space in ("joint", "image", "text"):
        whole = embedding_of(g.table, space, "test")
        assert np.array_equal(g.x(space), whole)
        assert np.array_equal(g.x(space, np.arange(15, 35)), whole[15:35])  # a slice across the chunk edge
        scattered = np.array([40, 2, 19, 20, 33])
        assert np.array_equal(g.x(space, scattered), whole[scattered])
