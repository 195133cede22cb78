"""Distributed k-means over the features' embeddings: shard actors on Ray, torch | cupy | cuml math."""

from rsdist.cluster.stage import run

__all__ = ["run"]
