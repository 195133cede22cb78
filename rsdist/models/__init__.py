"""Model adapters. Every encoder implements the DualEncoder protocol of `rsdist.models.dual`."""

from rsdist.models.dual import DualEncoder
from rsdist.models.encoders import build_encoder

__all__ = ["DualEncoder", "build_encoder"]
