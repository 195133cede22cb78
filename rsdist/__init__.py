"""rsdist: pick the subset of a large image-text pool worth fine-tuning on, and fine-tune on it."""

__version__ = "0.1.0"
