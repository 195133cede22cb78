"""The assign interface: chunked torch arithmetic equals a brute-force reference for both metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsdist.cluster.backends import TorchBackend, make_backend, rows_per_chunk


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_chunked_assign_matches_brute_force(metric):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 24)).astype(np.float32)
    c = rng.standard_normal((37, 24)).astype(np.float32)
    if metric == "cosine":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        ref = 1 - x @ c.T
    else:
        ref = ((x[:, None] - c[None]) ** 2).sum(-1)
    chunk = 8 * 37 * 50  # 50 rows per block
    assert rows_per_chunk(37, chunk) == 50
    labels, dists = TorchBackend(metric, chunk_bytes=chunk).assign(torch.from_numpy(x), torch.from_numpy(c))
    np.testing.assert_array_equal(labels.numpy(), ref.argmin(1))
    np.testing.assert_allclose(dists.numpy(), ref.min(1), rtol=1e-4, atol=1e-4)


def test_gpu_backends_fall_back_without_a_gpu():
    for name in ("auto", "torch", "cupy", "cuml"):
        assert make_backend(name, "euclidean", 1 << 20, has_gpu=False).name == "torch-cpu"
    with pytest.raises(ValueError, match="cluster.backend: 'jax'"):
        make_backend("jax", "euclidean", 1 << 20, has_gpu=False)
