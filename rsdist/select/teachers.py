"""Teachers `select.teacher` may name (rsdist/select/error_driven.py): functions
`(failure_embeddings, failure_ids) -> (query_embeddings, weights)` marked with `@teacher`.

`each_failure` is the reference: every failure is its own query, weight 1 (what error-driven
selection does without a teacher). A teacher that, say, embeds the skills a stronger model names as
missing goes here, so that what a config can make rsdist run is only code of the package.
"""

from __future__ import annotations

import numpy as np

from rsdist.select.error_driven import teacher


@teacher
def each_failure(failure_embeddings: np.ndarray, failure_ids: list) -> tuple[np.ndarray, np.ndarray]:
    """Every failure as its own retrieval query, weight 1."""
    return failure_embeddings, np.ones(len(failure_embeddings), dtype=np.float64)
